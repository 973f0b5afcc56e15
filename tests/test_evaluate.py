import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from audiodiff import storage
from audiodiff.audio import load_audio, resample
from audiodiff.encode import png_bytes, wav_bytes
from audiodiff.errors import AudiodiffError
from audiodiff import metrics
from audiodiff.evaluate import EvaluateConfig, run_evaluate, summary_line
from audiodiff.mel import MelCodec, MelConfig
from audiodiff.metrics import (MEL_DIM, distances, embedding_statistics, frechet_distance, halves, kernel_distance,
                               median_bandwidth, mel_embedding)
from audiodiff.synth import GENRES, synthesize

FULL = MelConfig()  # the evaluation config for audio against audio
TINY = MelConfig(x_res=64, y_res=64)  # the tiny model's: a spectrogram dataset of it sets the evaluation config
CLIP_SAMPLES = FULL.samples_for_width(FULL.x_res)  # a generated standard clip of a 256-frame model: 5.92 s


def noise(seconds: float, seed: int, rate: int = FULL.sample_rate) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def write_audio_folder(uri: str, tracks: list[np.ndarray], rate: int = FULL.sample_rate) -> str:
    for n, audio in enumerate(tracks):
        storage.write_bytes(storage.join(uri, f"track-{n}.wav"), wav_bytes(audio, rate))
    return uri


def write_generate_output(uri: str, clips: list[np.ndarray]) -> str:
    """What `audiodiff generate` leaves: clips/<id>.wav and .png, and manifest.parquet naming them."""
    codec = MelCodec(FULL)
    rows = []
    for n, audio in enumerate(clips):
        clip_id = f"standard-{n:05d}"
        storage.write_bytes(storage.join(uri, "clips", f"{clip_id}.wav"), wav_bytes(audio, FULL.sample_rate))
        image = codec.audio_to_images(audio)[0].numpy()
        storage.write_bytes(storage.join(uri, "clips", f"{clip_id}.png"), png_bytes(image))
        rows.append({"clip_id": clip_id, "kind": "standard", "seconds": len(audio) / FULL.sample_rate,
                     "wav": f"clips/{clip_id}.wav", "png": f"clips/{clip_id}.png"})
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(storage.join(uri, "manifest.parquet"), buffer.getvalue())
    return uri


def write_spectrogram_dataset(uri: str, tracks: list[np.ndarray], mel: MelConfig = TINY) -> np.ndarray:
    """A spectrogram dataset in preprocess's layout; returns its images."""
    images = np.concatenate([MelCodec(mel).audio_to_images(audio).numpy() for audio in tracks])
    rows = [{"image": {"bytes": png_bytes(image), "path": f"slice-{i}.png"}, "audio_file": f"track-{i}",
             "slice": 0, "genre": None} for i, image in enumerate(images)]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(storage.join(uri, "data", "part-00000-test.parquet"), buffer.getvalue())
    storage.write_bytes(storage.join(uri, "mel_config.json"), mel.to_json().encode())
    storage.write_bytes(storage.join(uri, "stats.json"), b"{}\n")
    return images


def vectors_of_files(files: list[str], mel: MelConfig) -> np.ndarray:
    """The built-in embedding of audio files with the pure functions alone, as a training loop would."""
    codec = MelCodec(mel)
    return np.concatenate([mel_embedding(codec.audio_to_images(load_audio(f, mel.sample_rate)), mel) for f in files])


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*embedding_statistics(a), *embedding_statistics(b))


@pytest.fixture(scope="module")
def music(synthetic_audio, tmp_path_factory):
    """Reference tracks of every genre (12 s at 44.1 kHz, wav/flac/mp3), and folders of other audio."""
    root = tmp_path_factory.mktemp("music")
    shutil.copytree(synthetic_audio, root / "reference")
    # other tracks of the reference genre, as a generate output of 256-frame clips
    write_generate_output(str(root / "generated"), [synthesize("drone", CLIP_SAMPLES / FULL.sample_rate,
                                                               FULL.sample_rate, seed=1000 + n) for n in range(6)])
    write_audio_folder(str(root / "noise"), [noise(12.0, seed=n) for n in range(4)])
    write_audio_folder(str(root / "beats"), [synthesize("beats", 12.0, seed=1000 + n) for n in range(4)])
    return root


@pytest.fixture(scope="module")
def good(music, local_ray, tmp_path_factory):
    """The generated drone clips against the drone reference, on Ray, with the JSON written."""
    output = tmp_path_factory.mktemp("evaluation") / "result.json"
    config = EvaluateConfig(clips=str(music / "generated"), reference=str(music / "reference" / "drone"),
                            output=str(output))
    return config, run_evaluate(config)


# the pure functions


def test_a_set_against_itself_is_at_zero_and_the_distance_is_symmetric():
    codec = MelCodec(FULL)
    a = mel_embedding(torch.cat([codec.audio_to_images(synthesize("arpeggio", 12.0, seed=n)) for n in range(3)]), FULL)
    b = mel_embedding(torch.cat([codec.audio_to_images(synthesize("beats", 12.0, seed=n)) for n in range(3)]), FULL)
    assert a.shape == (3 * 2 * 16, MEL_DIM)  # 12 s: 2 slices of 256 frames, 16 windows each
    scale = np.trace(embedding_statistics(a)[1])  # the set's own spread: what "about 0" is measured against
    assert distance(a, a) < 1e-9 * scale
    assert distance(a, b) == pytest.approx(distance(b, a), rel=1e-9)
    assert distance(a, b) > scale


def test_frechet_distance_is_exact_for_rank_deficient_covariances():
    # diagonal covariances, some variances 0: the distance is |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    v1, v2 = np.array([4.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.0, 9.0, 0.0])
    mu1, mu2 = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 0.0, 3.0, 5.0])
    expected = 5.0 + (2 - 1) ** 2 + (1 - 0) ** 2 + (0 - 3) ** 2
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    # 5 vectors in 64 dimensions: covariances of rank 4, still finite, 0 against itself, symmetric
    rng = np.random.default_rng(0)
    few, other = rng.normal(size=(5, 64)), rng.normal(1.0, 2.0, size=(5, 64))
    assert distance(few, few) < 1e-9 * np.trace(embedding_statistics(few)[1])
    assert distance(few, other) == pytest.approx(distance(other, few), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 vectors"):
        embedding_statistics(few[:1])


def test_mel_embedding_puts_each_genre_nearest_its_own_kind():
    codec, tiny = MelCodec(FULL), MelCodec(TINY)

    def embed(make, seeds, codec=codec):
        return mel_embedding(torch.cat([codec.audio_to_images(make(seed)) for seed in seeds]), codec.config)

    kinds = {genre: (lambda seed, g=genre: synthesize(g, 6.0, seed=seed)) for genre in GENRES}
    kinds["noise"] = lambda seed: noise(6.0, seed)
    references = {kind: embed(make, range(4)) for kind, make in kinds.items()}
    references["silence"] = mel_embedding(np.full((4, FULL.y_res, FULL.x_res), 255, np.uint8), FULL)
    for genre in GENRES:
        candidate = embed(kinds[genre], range(100, 104))
        others = {kind: distance(candidate, reference) for kind, reference in references.items()}
        nearest, *rest = sorted(others, key=others.get)
        # other tracks of a genre differ in key and tempo; the other kinds of sound differ in everything
        assert nearest == genre and others[rest[0]] > 5 * others[genre], others
        # a 64-bin tiny model's images of the genre land nearer its 256-bin reference than any other kind
        from_tiny = embed(kinds[genre], range(100, 104), codec=tiny)
        assert distance(from_tiny, references[genre]) < min(others[kind] for kind in rest), genre


def genre_tracks(genre: str, seeds, seconds: float = 6.0, codec: MelCodec = MelCodec(FULL)):
    """The vectors of one synthetic track per seed, and each vector's track."""
    vectors = [mel_embedding(codec.audio_to_images(synthesize(genre, seconds, seed=seed)), codec.config)
               for seed in seeds]
    return np.concatenate(vectors), np.repeat(np.arange(len(vectors)), [len(v) for v in vectors])


def test_kernel_distance_is_the_unbiased_mmd_of_its_formula():
    rng = np.random.default_rng(1)
    x, y, bandwidth = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(5, 3)), 1.3

    def k(a, b):
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * bandwidth ** 2))

    def within(a, groups):
        pairs = groups[:, None] != groups[None]
        return k(a, a)[pairs].mean()

    plain = within(x, np.arange(7)) + within(y, np.arange(5)) - 2 * k(x, y).mean()
    assert kernel_distance(x, y, bandwidth) == pytest.approx(plain, rel=1e-12)
    # grouped (a track per vector group): the pairs of one group are left out of the within-set means
    gx, gy = np.array([0, 0, 1, 1, 1, 2, 2]), np.array([0, 1, 1, 2, 2])
    grouped = within(x, gx) + within(y, gy) - 2 * k(x, y).mean()
    assert kernel_distance(x, y, bandwidth, gx, gy) == pytest.approx(grouped, rel=1e-12)
    assert kernel_distance(x, y, bandwidth) == pytest.approx(kernel_distance(y, x, bandwidth), rel=1e-12)
    # the median heuristic: the bandwidth is the median distance between distinct reference vectors
    distances_y = np.sqrt(((y[:, None] - y[None]) ** 2).sum(-1))[np.triu_indices(5, 1)]
    assert median_bandwidth(y) == pytest.approx(np.median(distances_y), rel=1e-9)
    assert kernel_distance(x, y) == pytest.approx(kernel_distance(x, y, np.median(distances_y)), rel=1e-9)


def test_kernel_distance_is_the_same_computed_block_by_block(monkeypatch):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(30, 4))
    whole = kernel_distance(x, y, 2.0, np.arange(50) // 5, np.arange(30) // 3)
    monkeypatch.setattr(metrics, "KERNEL_BLOCK", 7)  # what bounds the memory of large sets
    assert kernel_distance(x, y, 2.0, np.arange(50) // 5, np.arange(30) // 3) == pytest.approx(whole, rel=1e-12)


def test_two_draws_of_one_distribution_give_a_kernel_distance_of_about_zero():
    # independent vectors: the estimate averages to 0 at 5 vectors a set, single draws go below 0 too, where the
    # Fréchet distance of the same draws is far above 0 (its bias at few vectors)
    rng = np.random.default_rng(3)
    draws = [rng.normal(size=(2, 5, 8)) for _ in range(400)]
    kernel = np.array([kernel_distance(a, b, 4.0) for a, b in draws])
    frechet = np.array([distance(a, b) for a, b in draws])
    assert abs(kernel.mean()) < 3 * kernel.std() / np.sqrt(len(kernel)) and (kernel < 0).mean() > 0.3
    assert frechet.mean() > 10 * frechet.std() / np.sqrt(len(frechet))
    # tracks of the tests' genres: two draws of 4 tracks each (windows grouped by track), against the distance
    # between genres; measured (8 draws a genre): means 0.019, 0.008, 0.004 (standard errors 0.053, 0.007,
    # 0.012), against 0.75-1.09 between genres
    for genre, other in (("beats", "arpeggio"), ("arpeggio", "drone")):
        pairs = [(genre_tracks(genre, range(200 + 8 * k, 204 + 8 * k)),
                  genre_tracks(genre, range(204 + 8 * k, 208 + 8 * k))) for k in range(4)]
        between = kernel_distance(pairs[0][0][0], genre_tracks(other, range(4))[0])
        same = np.array([kernel_distance(a[0], b[0], median_bandwidth(b[0]), a[1], b[1]) for a, b in pairs])
        assert abs(same.mean()) < 0.05 * between and same.min() < 0.05 * between, (genre, same, between)


def test_kernel_distance_ranks_as_the_frechet_distance_does():
    references = {genre: genre_tracks(genre, range(4)) for genre in GENRES}
    for genre in GENRES:  # each genre's other tracks are nearest their own genre by both figures
        candidate = genre_tracks(genre, range(100, 104))
        figures = {r: distances(candidate[0], v, None, candidate[1], t) for r, (v, t) in references.items()}
        for figure in ("frechet_distance", "kernel_distance"):
            nearest, second = sorted(figures, key=lambda r: figures[r][figure])[:2]
            assert nearest == genre and figures[second][figure] > 4 * abs(figures[genre][figure]), (figure, figures)
    # clips of one genre worse and worse (more and more noise in them): both figures rise in the same order
    reference, tracks = references["drone"]
    codec = MelCodec(FULL)
    scores = []
    for level in (0.0, 0.03, 0.3):
        audio = [synthesize("drone", 6.0, seed=100 + n) + level * noise(6.0, seed=n) for n in range(4)]
        vectors = [mel_embedding(codec.audio_to_images(a), FULL) for a in audio]
        groups = np.repeat(np.arange(4), [len(v) for v in vectors])
        scores.append(distances(np.concatenate(vectors), reference, None, groups, tracks))
    for figure in ("frechet_distance", "kernel_distance"):
        assert [s[figure] for s in scores] == sorted(s[figure] for s in scores), (figure, scores)


def test_halves_split_by_track_else_vector_by_vector():
    tracks = np.array(["b", "b", "a", "a", "c", "c", "c"])
    # sorted tracks in turn: a and c in the first half, b in the second; no track on both sides
    assert halves(7, tracks).tolist() == [False, False, True, True, True, True, True]
    assert halves(5, np.array(["one"] * 5)).tolist() == [True, False, True, False, True]
    assert halves(3) is None  # a half of fewer than 2 vectors


# evaluate on Ray


def test_worse_sets_rank_behind_a_good_one(music, good):
    reference = str(music / "reference" / "drone")
    score = good[1]["frechet_distance"]
    noisy = run_evaluate(EvaluateConfig(clips=str(music / "noise"), reference=reference))["frechet_distance"]
    other_genre = run_evaluate(EvaluateConfig(clips=str(music / "beats"), reference=reference))["frechet_distance"]
    # clear margins (measured: about 700, 7250 and 96000), far beyond the spread that key and tempo make
    # among tracks of one genre
    assert other_genre > 4 * score and noisy > 4 * other_genre, (score, other_genre, noisy)


def test_ray_path_gives_the_number_of_the_pure_functions(music, good):
    config, result = good
    clips = storage.list_files(config.clips, (".wav",))
    references = storage.list_files(config.reference)
    expected = distance(vectors_of_files(clips, FULL), vectors_of_files(references, FULL))
    # the same float32 kernels; only their thread count (1 per worker on Ray) may reorder sums
    assert result["frechet_distance"] == pytest.approx(expected, rel=1e-4)
    # the generate output was read through its manifest: six 5.92 s clips, one 256-frame slice each
    assert result["clips"] == {"uri": config.clips, "unit": "clips", "items": 6, "vectors": 6 * 16}
    assert result["reference"] == {"uri": config.reference, "unit": "files", "items": 4, "vectors": 4 * 2 * 16}
    assert result["embedding"] == "mel" and result["mel_config"]["y_res"] == 256 and result["rejected"] == []
    assert json.loads(open(config.output).read()) == result


def test_spectrogram_dataset_on_object_storage_as_reference(music, local_ray, s3_bucket, tmp_path):
    images = write_spectrogram_dataset(f"{s3_bucket}/spectrograms",
                                       [synthesize("drone", 6.0, TINY.sample_rate, seed=n) for n in range(4)])
    output = f"{s3_bucket}/evaluation.json"
    result = run_evaluate(EvaluateConfig(clips=str(music / "generated"), reference=f"{s3_bucket}/spectrograms",
                                         output=output))
    # the dataset's mel config is the evaluation's: the clips were cut into 64-frame slices of it
    clips = storage.list_files(str(music / "generated" / "clips"), (".wav",))
    expected = distance(vectors_of_files(clips, TINY), mel_embedding(images, TINY))
    assert result["frechet_distance"] == pytest.approx(expected, rel=1e-4)  # as above: thread count only
    assert result["mel_config"] == vars(TINY)
    assert result["reference"]["unit"] == "slices" and result["reference"]["items"] == len(images) == 16
    assert result["reference"]["vectors"] == len(images) * 4
    assert json.loads(storage.read_bytes(output)) == result


class _FrameLevels(torch.nn.Module):
    """A user's embedding: per 0.1 s frame, the log energy and the mean absolute step, at 8 kHz."""

    def __init__(self):
        super().__init__()
        self.sample_rate = 8000

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        frames = audio[:, : audio.shape[1] // 800 * 800].unflatten(1, (-1, 800))
        return torch.stack([frames.square().mean(-1).add(1e-6).log(), frames.diff(dim=-1).abs().mean(-1)], -1)


def test_a_users_torchscript_embedding_plugs_in(music, local_ray, tmp_path):
    model = tmp_path / "frames.pt"
    torch.jit.save(torch.jit.script(_FrameLevels()), str(model))
    images = write_spectrogram_dataset(str(tmp_path / "spectrograms"),
                                       [synthesize("beats", 3.0, TINY.sample_rate, seed=n) for n in range(3)])
    folder = write_audio_folder(str(tmp_path / "clips"),
                                [synthesize("beats", 3.0, 8000, seed=10 + n) for n in range(2)], rate=8000)
    result = run_evaluate(EvaluateConfig(clips=folder, reference=str(tmp_path / "spectrograms"), embedding=str(model)))
    # the module's own sample rate; segments as long as the dataset's 64-frame slices (11888 samples at 8 kHz):
    # 2 per 3 s clip; a slice, turned back into audio by Griffin-Lim (one segment, zero padded) per image
    module, segment = _FrameLevels(), round(TINY.slice_size * 8000 / TINY.sample_rate)
    clips = np.concatenate([load_audio(f, 8000)[:2 * segment].reshape(2, segment) for f in storage.list_files(folder)])
    slices = [resample(a, TINY.sample_rate, 8000) for a in MelCodec(TINY).images_to_audio(images).numpy()]
    slices = np.stack([np.pad(a, (0, segment - len(a))) for a in slices])
    with torch.no_grad():
        expected = [module(torch.from_numpy(x)).reshape(-1, 2).numpy() for x in (clips, slices)]
    assert [len(e) for e in expected] == [2 * 2 * 14, len(images) * 14]  # 14 frames of 0.1 s per segment
    assert (result["clips"]["vectors"], result["reference"]["vectors"]) == tuple(len(e) for e in expected)
    assert result["embedding"] == str(model)
    # as the pure path, up to the rounding of Griffin-Lim's batched float32 kernels on another thread count
    assert result["frechet_distance"] == pytest.approx(distance(*expected), rel=1e-3)


@pytest.mark.slow
def test_floors_show_clips_at_the_limit_of_their_codec(music, local_ray, tmp_path):
    # clips that are the reference's own genre rendered through the tiny preset's codec and Griffin-Lim, one
    # 64-frame slice (1.5 s) a clip as a tiny model makes them: as good as its clips can get, so they sit at the
    # rendered floor and far above the reference's halves
    tiny = MelCodec(TINY)
    rendered = [clip for n in range(3)
                for clip in tiny.images_to_audio(tiny.audio_to_images(synthesize("drone", 6.0, seed=300 + n))).numpy()]
    folder = write_audio_folder(str(tmp_path / "clips"), rendered)
    reference = str(music / "reference" / "drone")
    result = run_evaluate(EvaluateConfig(clips=folder, reference=reference, clips_model="tiny"))
    floors, above = result["floors"], result["above_floors"]
    assert floors["rendered_reference"]["mel_config"] == vars(TINY)
    assert floors["reference_halves"]["split"] == "tracks" and floors["reference_halves"]["vectors"] == [64, 64]
    assert 0.5 < above["rendered_reference"]["frechet_distance"] < 2, result
    assert above["reference_halves"]["frechet_distance"] > 3 * above["rendered_reference"]["frechet_distance"], result
    assert floors["rendered_reference"]["kernel_distance"] > floors["reference_halves"]["kernel_distance"]
    # the halves' floor is the pure functions' on the reference split by file
    files = sorted(storage.list_files(reference))
    first, second = (vectors_of_files(files[i::2], FULL) for i in (0, 1))
    assert floors["reference_halves"]["frechet_distance"] == pytest.approx(distance(first, second), rel=1e-4)
    line = summary_line(result)
    assert "the reference through the clips' codec and Griffin-Lim" in line and "x it" in line
    # without a codec (plain audio, no --clips-model) that floor is not measured, and the summary says why
    plain = run_evaluate(EvaluateConfig(clips=folder, reference=reference))
    assert plain["floors"]["rendered_reference"] is None
    assert "give --clips-model" in summary_line(plain)
    assert "floors" not in run_evaluate(EvaluateConfig(clips=folder, reference=reference, no_floors=True))


# bad inputs


def test_undecodable_files_are_skipped_and_reported(music, local_ray, tmp_path):
    folder = write_audio_folder(str(tmp_path / "clips"), [synthesize("drone", 6.0, seed=n) for n in range(2)])
    (tmp_path / "clips" / "notes.mp3").write_text("not audio")
    good_wav = (tmp_path / "clips" / "track-0.wav").read_bytes()
    (tmp_path / "clips" / "cut.wav").write_bytes(good_wav[: len(good_wav) // 2])
    result = run_evaluate(EvaluateConfig(clips=folder, reference=str(music / "reference" / "drone")))
    reasons = {r["source"]: r["reason"] for r in result["rejected"]}
    assert set(reasons) == {storage.join(folder, "notes.mp3"), storage.join(folder, "cut.wav")}
    assert "not decodable" in reasons[storage.join(folder, "notes.mp3")]
    assert "truncated" in reasons[storage.join(folder, "cut.wav")]
    assert result["clips"]["items"] == 4 and result["clips"]["vectors"] == 2 * 16


def test_a_side_without_two_vectors_is_refused_naming_it(music, local_ray, tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "empty.wav").write_bytes(b"")
    with pytest.raises(AudiodiffError, match=r"--clips .*clips: 0 embedding vectors, at least 2 needed "
                                             r"\(1 rejected: .*empty.wav: empty file"):
        run_evaluate(EvaluateConfig(clips=str(tmp_path / "clips"), reference=str(music / "reference" / "drone")))


def test_bad_inputs_are_refused_before_any_work_naming_them(music, tmp_path):
    reference = str(music / "reference" / "drone")

    def refused(match, **kwargs):
        with pytest.raises(AudiodiffError, match=match):
            run_evaluate(EvaluateConfig(**{"clips": str(music / "generated"), "reference": reference, **kwargs}))

    refused(r"--clips .*nowhere: not found", clips=str(tmp_path / "nowhere"))
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "cover.png").write_bytes(b"png")
    refused(r"--reference .*pictures: no audio files", reference=str(tmp_path / "pictures"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "mel_config.json").write_text("{not json")
    refused(r"broken.mel_config.json: not valid JSON", reference=str(tmp_path / "broken"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.parquet").write_bytes(b"PAR1 cut")
    refused(r"--clips .*half.manifest.parquet: not a generate manifest", clips=str(tmp_path / "half"))
    write_spectrogram_dataset(str(tmp_path / "tiny"), [synthesize("drone", 2.0)])
    write_spectrogram_dataset(str(tmp_path / "wide"), [synthesize("drone", 2.0)], MelConfig(x_res=128, y_res=64))
    refused(r"spectrogram datasets of different mel configs", clips=str(tmp_path / "tiny"),
            reference=str(tmp_path / "wide"))
    refused(r"--embedding .*weights.pt: not found", embedding=str(tmp_path / "weights.pt"))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "state.pt")  # a pickle: refused, never unpickled
    refused(r"state.pt: not a TorchScript module", embedding=str(tmp_path / "state.pt"))


def test_audio_longer_than_max_seconds_is_rejected_not_decoded_whole():
    from audiodiff.evaluate import _Embedder

    items = pa.table({"side": ["clips"] * 3, "source": ["short.wav", "long.wav", "bomb.png"],
                      "data": [wav_bytes(noise(2, 1), FULL.sample_rate), wav_bytes(noise(8, 2), FULL.sample_rate),
                               png_bytes(np.zeros((FULL.y_res, 9000), np.uint8))],
                      "is_image": [False, False, True], "genre": [""] * 3,
                      "track": ["short.wav", "long.wav", "bomb.png"]})
    rows = _Embedder(None, FULL, "mel", max_seconds=5)(items).to_pylist()
    assert rows[0]["reason"] is None and rows[0]["vectors"]
    assert rows[1]["reason"] == "longer than --max-seconds 5 (8 s); raise --max-seconds to keep it"
    assert rows[2]["reason"] == "image is 256x9000, expected 256x256 (height x width)"
    assert EvaluateConfig("a", "b").max_seconds == 1800
