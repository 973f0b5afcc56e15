import io
import json
import os
import re
import time
import uuid

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from diffusers import Mel
from PIL import Image

from audiodiff import progress, storage
from audiodiff.audio import load_audio
from audiodiff.cli import main
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelConfig
from audiodiff.synth import synthesize

TINY = MelConfig(x_res=64, y_res=64)  # the tiny preset's mel config: 1.49 s slices, fast tests


def write(path, audio, rate=44100, subtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, audio, rate, subtype=subtype)
    return path


def run(*args):
    assert main(["preprocess", *map(str, args), "--model", "tiny"]) == 0


def read_output(output):
    fs, data = storage.resolve(f"{output}/data")
    slices = pq.read_table(data, filesystem=fs)
    rejects = pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/rejects.parquet")))
    stats = json.loads(storage.read_bytes(f"{output}/stats.json"))
    return slices, {r["source"]: r["reason"] for r in rejects.to_pylist()}, stats


def expected_slices(path) -> int:
    """What diffusers' Mel makes of the same audio, less the silent (all white) slices."""
    mel = Mel(**vars(TINY))
    mel.load_audio(raw_audio=load_audio(path, TINY.sample_rate))
    images = [np.asarray(mel.audio_slice_to_image(i)) for i in range(mel.get_number_of_slices())]
    return sum(image.min() < 255 for image in images)


@pytest.fixture
def genre_folder(tmp_path):
    root = tmp_path / "music"
    for genre, seconds in (("drone", 7.3), ("beats", 4.1), ("arpeggio", 10.0)):
        for i, ext in enumerate(("wav", "flac", "ogg", "mp3")):
            write(root / genre / f"{genre} {i}.{ext}", synthesize(genre, seconds + i, 44100, seed=i))
    return root


def test_audio_folder_with_genres_from_folders(local_ray, genre_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "0")  # a line each time more is done
    output = tmp_path / "out"
    run(genre_folder, "--output", output, "--genre-from-folder", "--genre", "drone", "--genre", "arpeggio")
    printed = capsys.readouterr().out
    assert "beats                           4" in printed and "drone                           4 *" in printed
    assert "preprocess: 8/8 tracks (100%)" in printed  # the chosen genres' tracks
    slices, rejects, stats = read_output(output)
    assert rejects == {}
    assert stats["tracks_read"] == stats["tracks_written"] == 8
    assert set(slices["genre"].to_pylist()) == {"drone", "arpeggio"}
    per_file = {}
    for source in slices["audio_file"].to_pylist():
        per_file[source] = per_file.get(source, 0) + 1
    assert len(per_file) == 8
    for source, count in per_file.items():
        assert count == expected_slices(source), source
    assert stats["slices_written"] == len(slices) == sum(g["slices"] for g in stats["per_genre"].values())
    assert stats["per_genre"]["drone"]["tracks"] == 4
    assert MelConfig.from_json((output / "mel_config.json").read_text()) == TINY


def test_output_loads_in_datasets_with_an_image_column(local_ray, genre_folder, tmp_path):
    output = tmp_path / "out"
    # a fixed pool of one actor per CPU with --limit: light steps must still find a CPU (no stall)
    run(genre_folder / "beats", "--output", output, "--limit", "2", "--num-cpus", "2")
    loaded = datasets.load_dataset("parquet", data_files=str(output / "data" / "*.parquet"), split="train")
    assert isinstance(loaded.features["image"], datasets.Image)
    image = loaded[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (64, 64) and image.mode == "L"
    assert json.loads((output / "stats.json").read_text())["tracks_read"] == 2


def test_random_slice_takes_one_slice_per_track(local_ray, genre_folder, tmp_path):
    output = tmp_path / "out"
    run(genre_folder / "arpeggio", "--output", output, "--slices", "random")
    slices, _, stats = read_output(output)
    assert len(slices) == stats["tracks_written"] == 4
    assert len(set(slices["audio_file"].to_pylist())) == 4


def _hf_dataset(tmp_path) -> datasets.Dataset:
    """Shaped like lewtun/music_genres: `audio` holds encoded bytes and a path, `genre` a string."""
    audio = []
    for i in range(4):
        path = write(tmp_path / "hf" / f"song{i}.mp3", synthesize("beats", 5 + i, 44100, seed=i))
        audio.append({"bytes": path.read_bytes(), "path": path.name})
    table = pa.table({"audio": pa.array(audio, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "song_id": list(range(4)), "genre": ["Hip Hop", "Rock", "Hip Hop", "Pop"]})
    # built from Arrow: datasets' own audio encoding needs torchcodec, which audiodiff does not use
    features = datasets.Features({"audio": datasets.Audio(decode=False), "song_id": datasets.Value("int64"),
                                  "genre": datasets.Value("string")})
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def test_hf_style_parquet_and_genre_filter(local_ray, tmp_path):
    _hf_dataset(tmp_path).to_parquet(str(tmp_path / "parquet" / "data" / "train-00000-of-00001.parquet"))
    output = tmp_path / "out"
    run(tmp_path / "parquet", "--output", output, "--genre", "Hip Hop")
    slices, rejects, stats = read_output(output)
    assert rejects == {} and stats["tracks_read"] == 2
    assert set(slices["genre"].to_pylist()) == {"Hip Hop"}
    assert sorted(set(slices["audio_file"].to_pylist())) == ["song0.mp3", "song2.mp3"]


def test_saved_dataset_and_several_sources(local_ray, tmp_path, genre_folder):
    _hf_dataset(tmp_path).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": _hf_dataset(tmp_path).select([0]), "test": _hf_dataset(tmp_path)}).save_to_disk(
        str(tmp_path / "saved splits"))
    output = tmp_path / "out"
    run(tmp_path / "saved", tmp_path / "saved splits", genre_folder / "drone", "--output", output)
    slices, rejects, stats = read_output(output)
    assert rejects == {} and stats["tracks_read"] == 4 + 1 + 4
    assert {"Hip Hop", "Rock", "Pop", None} == set(slices["genre"].to_pylist())


def test_s3_source_and_s3_output(local_ray, s3_bucket, genre_folder, tmp_path):
    for path in sorted((genre_folder / "drone").iterdir())[:2]:
        storage.write_bytes(f"{s3_bucket}/in/drone/{path.name}", path.read_bytes())
    storage.write_bytes(f"{s3_bucket}/in/drone/bad.wav", b"RIFF....WAVEnot really")
    run(f"{s3_bucket}/in", "--output", f"{s3_bucket}/out", "--genre-from-folder")
    slices, rejects, stats = read_output(f"{s3_bucket}/out")
    assert stats["tracks_read"] == 3 and stats["tracks_written"] == 2
    assert list(rejects) == [f"{s3_bucket}/in/drone/bad.wav"]
    assert all(s.startswith(f"{s3_bucket}/in/drone/") for s in slices["audio_file"].to_pylist())


def test_bad_input_is_rejected_with_reasons_and_odd_input_is_processed(local_ray, tmp_path):
    src = tmp_path / "mixed"
    tone = synthesize("drone", 3, 44100, seed=9)
    good = {
        "8 bit.wav": (tone, 44100, "PCM_U8"), "24 bit.wav": (tone, 44100, "PCM_24"),
        "float.wav": (tone, 44100, "FLOAT"), "8 kHz.flac": (synthesize("beats", 3, 8000), 8000, None),
        "96 kHz.wav": (synthesize("beats", 3, 96000), 96000, "PCM_16"),
        "six channels.wav": (np.tile(tone[:, None], (1, 6)), 44100, "PCM_16"),
        "ünïcödé 日本.ogg": (tone, 44100, None), "short.wav": (tone[:20000], 44100, None),
    }
    for name, (audio, rate, subtype) in good.items():
        write(src / name, audio, rate, subtype)
    nan = tone.copy()
    nan[7] = np.nan
    write(src / "nan.wav", nan, 44100, "FLOAT")
    (src / "empty.wav").write_bytes(b"")
    (src / "text.mp3").write_bytes(b"not an mp3 at all" * 40)
    whole = (src / "24 bit.wav").read_bytes()
    (src / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    write(src / "silence.flac", np.zeros(44100 * 4, dtype=np.float32))
    output = tmp_path / "out"
    run(src, "--output", output)
    slices, rejects, stats = read_output(output)
    reasons = {k.rsplit("/", 1)[-1]: v for k, v in rejects.items()}
    assert reasons.keys() == {"nan.wav", "empty.wav", "text.mp3", "truncated.wav", "silence.flac"}
    assert "non-finite" in reasons["nan.wav"] and "empty file" in reasons["empty.wav"]
    assert "not decodable" in reasons["text.mp3"] and "truncated" in reasons["truncated.wav"]
    assert "entirely silent" in reasons["silence.flac"]
    assert {s.rsplit("/", 1)[-1] for s in slices["audio_file"].to_pylist()} == set(good)
    assert stats["tracks_read"] == stats["tracks_written"] + stats["tracks_rejected"] == len(good) + 5


def test_missing_source_and_unwritable_output_stop_with_a_message(local_ray, tmp_path, genre_folder, capsys):
    assert main(["preprocess", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 1
    assert "nowhere: source not found" in capsys.readouterr().err
    (tmp_path / "a file").write_text("x")
    assert main(["preprocess", str(genre_folder), "--output", str(tmp_path / "a file" / "out")]) == 1
    assert "cannot write" in capsys.readouterr().err
    run(genre_folder / "beats", "--output", tmp_path / "twice", "--limit", "1")
    assert main(["preprocess", str(genre_folder / "beats"), "--output", str(tmp_path / "twice")]) == 1
    assert "already holds a spectrogram dataset" in capsys.readouterr().err


def test_hub_dataset_id_that_cannot_be_reached_is_a_clear_error(local_ray, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no hub here; offline mode fails at once
    assert main(["preprocess", "lewtun/music_genres", "--output", str(tmp_path / "out")]) == 1
    assert "hf://datasets/lewtun/music_genres: cannot list the dataset on the Hugging Face Hub" in capsys.readouterr().err


def _dies_once(base, marker, when):
    """`base` (a class Ray runs in its workers) whose process exits, once in the whole run, where `when` says:
    a killed worker, which Ray restarts and retries. Local classes and functions travel by value to the workers."""

    def first_time() -> bool:
        try:
            open(marker, "x").close()
            return True
        except FileExistsError:
            return False

    class DiesOnce(base):
        def __call__(self, batch):
            if when(batch) and first_time():
                os._exit(1)
            return super().__call__(batch)

        def write(self, blocks, ctx):
            seen = super().write(blocks, ctx)
            if when(seen) and first_time():
                os._exit(1)  # after its part is written, before Ray hears of it: the retry writes it again
            return seen

    return DiesOnce


def _always_dies_on(base, poison, deaths):
    """`base` (SpectrogramMaker) whose process exits whenever it starts on the track `poison` (as a crash in a
    decoder would), leaving a file in the folder `deaths` each time."""

    class AlwaysDies(base):
        def _track(self, source, data, uri):
            if source == poison:
                open(os.path.join(deaths, uuid.uuid4().hex), "x").close()
                os._exit(1)
            return super()._track(source, data, uri)

    return AlwaysDies


def test_killed_workers_and_retried_writes_leave_every_slice_once_and_a_track_killing_every_worker_is_a_reject(
        local_ray, genre_folder, tmp_path, monkeypatch):
    from audiodiff import preprocess

    victim = str(genre_folder / "drone" / "drone 2.ogg")
    poison = str(genre_folder / "beats" / "beats 1.flac")
    (tmp_path / "deaths").mkdir()
    monkeypatch.setattr(preprocess, "SpectrogramMaker", _dies_once(
        _always_dies_on(preprocess.SpectrogramMaker, poison, str(tmp_path / "deaths")), tmp_path / "actor died",
        lambda batch: victim in batch["source"].to_pylist()))
    monkeypatch.setattr(preprocess, "SpectrogramSink", _dies_once(
        preprocess.SpectrogramSink, tmp_path / "writer died", lambda seen: bool(seen["tracks"])))
    output = tmp_path / "out"
    run(genre_folder, "--output", output, "--max-seconds", 12.5)
    assert (tmp_path / "actor died").exists() and (tmp_path / "writer died").exists()
    slices, rejects, stats = read_output(output)
    keys = list(zip(slices["audio_file"].to_pylist(), slices["slice"].to_pylist()))
    assert len(keys) == len(set(keys)) == stats["slices_written"]
    too_long = str(genre_folder / "arpeggio" / "arpeggio 3.mp3")  # 13 s
    assert sorted(rejects) == sorted([too_long, poison])
    assert rejects[too_long].startswith("longer than --max-seconds 12.5")
    # a track that kills every worker it meets is tried WORKER_RETRIES times, then rejected: the job ends
    assert rejects[poison].startswith(f"its worker died {preprocess.WORKER_RETRIES} times while making its images")
    assert len(os.listdir(tmp_path / "deaths")) == preprocess.WORKER_RETRIES
    assert stats["tracks_read"] == stats["tracks_written"] + stats["tracks_rejected"] == 12
    assert len({source for source, _ in keys}) == stats["tracks_written"] == 10 and victim in dict(keys)


def test_track_tries_count_dead_workers_only_and_leave_no_files(tmp_path, monkeypatch):
    import tempfile

    from audiodiff.errors import BadAudioError
    from audiodiff.preprocess import WORKER_RETRIES, TrackTries

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tries = TrackTries("run")

    def worker_dies_on(source):
        pid = os.fork()  # the child only touches files, then exits as a crashed worker would
        if pid == 0:
            with tries.track(source):
                os._exit(1)
        os.waitpid(pid, 0)

    # WORKER_RETRIES - 1 workers died on the track, and another worker is making it right now (the track was given
    # twice): that one is no death, so this try goes ahead
    started, release = os.pipe(), os.pipe()
    other = os.fork()
    if other == 0:
        with tries.track("track"):
            os.write(started[1], b"x")
            os.read(release[0], 1)
        os._exit(0)
    os.read(started[0], 1)
    for _ in range(WORKER_RETRIES - 1):
        worker_dies_on("track")
    with tries.track("track"):
        pass
    os.write(release[1], b"x")
    os.waitpid(other, 0)
    # a success forgets the deaths before it; WORKER_RETRIES deaths in a row make the track a reject
    for _ in range(WORKER_RETRIES):
        worker_dies_on("track")
    with pytest.raises(BadAudioError, match=f"its worker died {WORKER_RETRIES} times"):
        with tries.track("track"):
            pass
    assert os.listdir(tries.folder) == []


def test_a_long_track_is_cut_block_by_block_into_the_images_of_the_whole_track(tmp_path):
    from audiodiff.audio import resample, to_mono
    from audiodiff.mel import MelCodec
    from audiodiff.preprocess import SpectrogramMaker
    from audiodiff.sources import TRACK_SCHEMA

    # 60 s: 40 slices, two of the codec's 32-slice batches, each made of many decoded blocks
    stereo = np.stack([synthesize("arpeggio", 60, 44100, seed=5), synthesize("beats", 60, 44100, seed=6)], 1)
    path = str(write(tmp_path / "long.flac", stereo))
    track = pa.table({"source": [path], "bytes": [None], "genre": [None], "uri": [path]}, schema=TRACK_SCHEMA)
    row = SpectrogramMaker(TINY, "all", 0)(track).to_pylist()[0]
    whole = MelCodec(TINY).audio_to_images(resample(to_mono(soundfile.read(path, dtype="float32")[0]), 44100,
                                                    TINY.sample_rate)).numpy()
    audible = [i for i, image in enumerate(whole) if image.min() < 255]
    assert row["reason"] is None and row["slices"] == audible and len(audible) > 32
    # soxr's streaming resampler gives the whole-track resampler's samples, so the images are the very same
    assert all(np.array_equal(np.asarray(Image.open(io.BytesIO(png))), whole[i])
               for i, png in zip(row["slices"], row["pngs"]))
    rejected = SpectrogramMaker(TINY, "all", 0, max_seconds=30)(track).to_pylist()[0]
    assert rejected["reason"] == "longer than --max-seconds 30 (60 s); raise --max-seconds to keep it"
    assert rejected["slices"] == [] and rejected["seconds"] == 0


def test_storage_going_away_mid_job_stops_it_naming_the_file(local_ray, s3_bucket, genre_folder, tmp_path,
                                                              free_port, monkeypatch, capsys):
    import ray

    from audiodiff import preprocess
    from audiodiff.runtime import init_ray

    for path in sorted((genre_folder / "drone").iterdir()):
        storage.write_bytes(f"{s3_bucket}/in/{path.name}", path.read_bytes())
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    class Outage(preprocess.SpectrogramMaker):
        """The endpoint goes away once the job has listed its files and its workers have started."""

        def __call__(self, batch):
            os.environ["AWS_ENDPOINT_URL"] = gone
            return super().__call__(batch)

    monkeypatch.setattr(preprocess, "SpectrogramMaker", Outage)
    started = time.monotonic()
    try:
        assert main(["preprocess", f"{s3_bucket}/in", "--output", str(tmp_path / "out"), "--model", "tiny"]) == 1
    finally:
        # the failed run's actors (endpoint switched off) can outlive it in this session's shared Ray, holding
        # CPUs that later tests wait for forever (seen: a fine-tune test hung in CI); start that Ray afresh
        ray.shutdown()
        init_ray()
    assert time.monotonic() - started < 90  # pyarrow's three tries per request, then Ray's error reaches the driver
    error = capsys.readouterr().err
    assert re.search(rf"audiodiff preprocess: error: {s3_bucket}/in/drone \d\.\w+: cannot read \(", error), error
    assert not (tmp_path / "out" / "stats.json").exists()  # incomplete, and readers refuse it


def test_opus_m4a_aiff_and_webm_are_read_and_other_files_are_counted_by_extension(local_ray, tmp_path, capsys):
    from test_audio import _ffmpeg_encoded

    source = tmp_path / "library"
    source.mkdir()
    soundfile.write(source / "a.opus", synthesize("drone", 3, 48000, seed=1), 48000, format="OGG", subtype="OPUS")
    write(source / "b.aiff", synthesize("beats", 3, 44100, seed=2))
    (source / "c.m4a").write_bytes(_ffmpeg_encoded("ipod", "aac", seconds=3))  # through PyAV's FFmpeg
    (source / "d.webm").write_bytes(_ffmpeg_encoded("webm", "libopus", seconds=3))
    for name in ("cover.jpg", "notes.txt", "lyrics.TXT", "README"):
        (source / name).write_bytes(b"not audio")
    run(source, "--output", tmp_path / "out")
    slices, rejects, stats = read_output(tmp_path / "out")
    assert not rejects and stats["tracks_written"] == 4
    assert set(slices["audio_file"].to_pylist()) == {str(source / n) for n in ("a.opus", "b.aiff", "c.m4a", "d.webm")}
    assert stats["skipped_by_extension"] == {"(none)": 1, ".jpg": 1, ".txt": 2}
    assert "4 tracks read, 4 written, 0 rejected, 4 files of other types (.txt 2, (none) 1, .jpg 1) skipped;" \
        in capsys.readouterr().out


def test_a_folder_without_audio_says_what_it_holds(tmp_path):
    from audiodiff.sources import TrackSettings, open_source

    for name in ("a.txt", "b.txt", "c.jpg"):
        (tmp_path / name).write_text("x")
    with pytest.raises(AudiodiffError, match=r"no audio or parquet files found \(only 3 files of other types "
                                             r"\(\.txt 2, \.jpg 1\)\)"):
        open_source(str(tmp_path), TrackSettings())
