import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from PIL import Image

from audiodiff import models, sampling
from audiodiff.cli import main
from audiodiff.clips import WORK_SCHEMA, ClipMaker
from audiodiff.encode import png_bytes
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelCodec
from audiodiff.remix import ContinueConfig, RemixConfig, _remix_rows, run_continue, run_remix
from audiodiff.synth import synthesize

SR = 22050
FAST = ["--steps", "4"]
MEL = models.new_model("tiny").mel  # 64 x 64 images: a slice is 32767 samples (1.49 s)


@pytest.fixture(scope="module")
def tracks(tmp_path_factory):
    """A drone of two slices, beats of three, and a file that is not audio."""
    folder = tmp_path_factory.mktemp("tracks")
    soundfile.write(folder / "drone.wav", synthesize("drone", 3.2, SR, seed=1), SR)
    soundfile.write(folder / "beats.wav", synthesize("beats", 4.6, SR, seed=2), SR)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    return folder


def rows(output):
    return {r["clip_id"]: r for r in pq.read_table(os.path.join(output, "manifest.parquet")).to_pylist()}


def image(output, relative) -> np.ndarray:
    return np.asarray(Image.open(os.path.join(output, relative)))


def run(*args):
    assert main([*map(str, args)]) == 0


@pytest.mark.slow
def test_remix_keeps_the_chosen_seconds_of_every_slice_and_records_rejects(local_ray, tiny_model, tracks, tmp_path):
    out = tmp_path / "remix"
    run("remix", tracks, "--model", tiny_model, "--output", out, "--variations", 2, "--strength", 0.7,
        "--keep-start", 0.3, "--keep-end", 0.2, *FAST)
    manifest = rows(out)
    inputs = [r for r in manifest.values() if r["kind"] == "input"]
    remixes = [r for r in manifest.values() if r["kind"] == "remix"]
    assert len(inputs) == 2 + 3 and len(remixes) == 2 * len(inputs)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert [r["source"].rsplit("/", 1)[-1] for r in rejects] == ["broken.wav"] and "not decodable" in rejects[0]["reason"]
    codec = MelCodec(MEL)
    beats = codec.audio_to_images(soundfile.read(tracks / "beats.wav", dtype="float32")[0])
    for remix in remixes:
        source = image(out, remix["input_png"])
        if remix["source"].endswith("beats.wav"):  # the input clip is the input slice itself (strength 0)
            assert np.array_equal(source, beats[remix["slice"]].numpy())
        output = image(out, remix["png"])
        start, end = MEL.frames_in(0.3), MEL.frames_in(0.2)
        assert np.array_equal(output[:, :start], source[:, :start])
        assert np.array_equal(output[:, 64 - end:], source[:, 64 - end:])
        assert not np.array_equal(output[:, start:64 - end], source[:, start:64 - end])
        assert (remix["strength"], remix["keep_start"], remix["keep_end"]) == (0.7, 0.3, 0.2)
        audio, rate = soundfile.read(out / remix["wav"])
        assert rate == SR and len(audio) == MEL.samples_for_width(64)
    variations = [r for r in remixes if r["slice"] == 0 and r["source"].endswith("drone.wav")]
    assert not np.array_equal(image(out, variations[0]["png"]), image(out, variations[1]["png"]))

    # a re-run writes nothing new; after an interruption it makes only what is missing
    lost = remixes[0]
    os.remove(out / lost["png"])
    others = {r["png"]: os.stat(out / r["png"]).st_mtime_ns for r in remixes[1:]}
    run("remix", tracks, "--model", tiny_model, "--output", out, "--variations", 2, "--strength", 0.7,
        "--keep-start", 0.3, "--keep-end", 0.2, *FAST)
    assert (out / lost["png"]).exists()
    assert {png: os.stat(out / png).st_mtime_ns for png in others} == others


@pytest.mark.slow
def test_whole_track_remix_joins_the_slices_in_order(local_ray, tiny_model, tracks, tmp_path):
    out = tmp_path / "whole"
    run("remix", tracks / "beats.wav", "--model", tiny_model, "--output", out, "--whole-track", "--strength", 0.4,
        *FAST)
    manifest = rows(out)
    assert sorted(r["kind"] for r in manifest.values()) == ["input", "remix"]
    remix = next(r for r in manifest.values() if r["kind"] == "remix")
    assert remix["slice"] is None and remix["frames"] == 3 * 64
    slices = MelCodec(MEL).audio_to_images(soundfile.read(tracks / "beats.wav", dtype="float32")[0])
    assert np.array_equal(image(out, remix["input_png"]), torch.cat(list(slices), dim=-1).numpy())
    audio, _ = soundfile.read(out / remix["wav"])
    assert len(audio) == MEL.samples_for_width(3 * 64)
    assert image(out, remix["png"]).shape == (64, 3 * 64)


def test_a_batch_of_remixes_equals_the_same_remixes_one_by_one(tiny_model):
    # fp32's contract; bf16 rounds more (tests/test_precision.py)
    config = RemixConfig(model=tiny_model, output="unused", sources=["unused"], variations=3, strength=0.6,
                         keep_start=0.2, steps=4, precision="fp32")
    codec = MelCodec(MEL)
    images = codec.audio_to_images(synthesize("arpeggio", 3.2, SR, seed=3))
    track = {"source": "arpeggio.wav", "slices": [0, 1], "silent": 0,
             "pngs": [png_bytes(im) for im in images.numpy()]}
    work = [r for r in _remix_rows(track, config, MEL) if r["kind"] == "remix"]
    table = pa.Table.from_pylist(work, schema=WORK_SCHEMA)
    together = ClipMaker(RemixConfig(**{**vars(config), "batch_size": 8}))(table)["image"]
    alone = [ClipMaker(RemixConfig(**{**vars(config), "batch_size": 1}))(table.slice(i, 1))["image"][0]
             for i in range(len(work))]
    for a, b in zip(together, alone):
        difference = np.abs(a.astype(int) - b.astype(int))
        # the same noise and draws per slice; batched float kernels only round differently
        assert difference.max() <= 1 and (difference > 0).mean() < 0.005


@pytest.mark.slow
def test_continue_makes_tracks_of_the_asked_length_that_begin_with_the_input(local_ray, tiny_model, tracks, tmp_path):
    out = tmp_path / "continued"
    run("continue", tracks / "drone.wav", "--model", tiny_model, "--output", out, "--seconds", 9.5, "--overlap", 0.4,
        *FAST)
    manifest = rows(out)
    continued = next(r for r in manifest.values() if r["kind"] == "continuation")
    audio, rate = soundfile.read(out / continued["wav"])
    assert continued["seconds"] == 9.5 and len(audio) == round(9.5 * rate)
    wide, source = image(out, continued["png"]), image(out, continued["input_png"])
    assert wide.shape == (64, MEL.width_for_seconds(9.5))
    held = 64 - MEL.edge_frames - MEL.frames_in(0.4) // 2  # up to the cross-fade into the second window
    assert np.array_equal(wide[:, :held], source[:, :held])
    drone = MelCodec(MEL).audio_to_images(soundfile.read(tracks / "drone.wav", dtype="float32")[0])
    assert np.array_equal(source, drone[continued["slice"]].numpy())  # the track's last slice


@pytest.mark.slow
def test_generate_seconds_writes_one_long_clip(local_ray, tiny_model, tmp_path):
    out = tmp_path / "long"
    run("generate", "--model", tiny_model, "--output", out, "--scheduler", "ddim", "--steps", 2, "--seconds", 60,
        "--overlap", 0.5, "--num-clips", 1)
    (clip,) = rows(out).values()
    audio, rate = soundfile.read(out / clip["wav"])
    assert clip["kind"] == "long" and len(audio) == 60 * rate and np.abs(audio).max() > 0.5
    assert image(out, clip["png"]).shape == (64, MEL.width_for_seconds(60))


@pytest.mark.slow
def test_interpolation_runs_from_one_input_to_the_other(local_ray, tiny_model, tracks, tmp_path):
    out = tmp_path / "between"
    run("interpolate", tracks / "drone.wav", tracks / "beats.wav", "--model", tiny_model, "--output", out,
        "--points", 3, *FAST)  # in fp32 by default, as the reference below
    manifest = rows(out)
    points = sorted((r for r in manifest.values() if r["kind"] == "interpolation"), key=lambda r: r["position"])
    assert [r["position"] for r in points] == [0.0, 0.5, 1.0]
    # each end is DDIM sampling from its input's inverted noise (how closely that comes back to the input is
    # a property of the model, proven with an exact denoiser in test_sampling.py)
    parts = models.load_model(tiny_model)
    scheduler = sampling.make_scheduler("ddim", parts.scheduler.config)
    scheduler.register_to_config(clip_sample=False)
    inputs = {r["source"].rsplit("/", 1)[-1]: image(out, r["png"]) for r in manifest.values() if r["kind"] == "input"}
    for end, name in ((points[0], "drone.wav"), (points[-1], "beats.wav")):
        noise = sampling.invert(parts.unet, scheduler, torch.from_numpy(inputs[name].copy())[None], 4)
        expected = sampling.sample(parts.unet, scheduler, [torch.Generator()], 64, 64, 4, noise=noise)[0].numpy()
        difference = np.abs(image(out, end["png"]).astype(int) - expected.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.005


@pytest.mark.parametrize("change, message", [
    ({"strength": 1.5}, r"--strength must lie in \[0, 1\]"),
    ({"keep_start": 1.0, "keep_end": 0.6}, "cover or overlap the whole slice"),
    ({"variations": 0}, "--variations must be at least 1"),
    ({"sources": []}, "give at least one SOURCE"),
])
def test_bad_remix_settings_are_refused_before_work(tiny_model, tmp_path, change, message):
    (tmp_path / "in").mkdir()  # beside the output: a source holding the output is refused first (ownership)
    config = {"model": tiny_model, "output": str(tmp_path / "out"), "sources": [str(tmp_path / "in")], **change}
    with pytest.raises(AudiodiffError, match=message):
        run_remix(RemixConfig(**config))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seconds, overlap, message", [
    (1.0, 0.4, r"--seconds 1 is not longer than one window \(1.46 s\)"),
    (10.0, 1.5, r"--overlap 1.5 s must be shorter than one window"),
    (None, 0.4, "give --seconds"),
])
def test_bad_continuations_are_refused_before_work(tiny_model, tracks, tmp_path, seconds, overlap, message):
    with pytest.raises(AudiodiffError, match=message):
        run_continue(ContinueConfig(model=tiny_model, output=str(tmp_path / "out"), sources=[str(tracks)],
                                    seconds=seconds, overlap=overlap))
    assert not (tmp_path / "out").exists()


def test_interpolating_from_a_file_that_is_not_audio_names_it(local_ray, tiny_model, tracks, tmp_path, capsys):
    assert main(["interpolate", str(tracks / "broken.wav"), str(tracks / "beats.wav"), "--model", tiny_model,
                 "--output", str(tmp_path / "out"), *FAST]) == 1
    assert "broken.wav: not decodable as audio" in capsys.readouterr().err
