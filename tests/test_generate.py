import contextlib
import io
import json
import os
import re
import shutil
import signal
import threading
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import soundfile
from PIL import Image

import pyarrow as pa
import torch
from ray.data.block import BlockAccessor

from audiodiff import clips, model_files, models, progress, runtime, storage
from audiodiff import generate as generate_module
from audiodiff.cli import main
from audiodiff.clips import WORK_SCHEMA, ClipMaker, ClipSettings, clips_per_batch, cpu_threads, work_dataset
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelConfig
from audiodiff.outputs import ClipSink, clip_row, encode_clip
from audiodiff.unets import clip_bytes

FAST = ["--scheduler", "ddim", "--steps", "4"]
STANDARD_SECONDS = 63 * 512 / 22050  # the tiny model: 64 frames
EXTENDED_SECONDS = 255 * 512 / 22050  # 4 x 64 frames, as 256-frame standard clips of the full model


def generate(model, output, *args):
    assert main(["generate", "--model", model, "--output", str(output), *FAST, *map(str, args)]) == 0


@pytest.fixture(scope="module")
def made(local_ray, tiny_model, tmp_path_factory):
    """One run of 3 standard clips and 1 extended one (the 3 standard ones denoised as one batch), which the
    tests read and copy but never change."""
    out = tmp_path_factory.mktemp("made") / "out"
    generate(tiny_model, out, "--num-clips", 3, "--num-extended", 1)
    return out


def manifest(output):
    return pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/manifest.parquet"))).to_pylist()


def image(output, clip_id) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{output}/clips/{clip_id}.png"))))


def test_right_number_of_clips_of_the_right_lengths(tiny_model, made):
    rows = manifest(made)
    assert [r["clip_id"] for r in rows] == ["standard-00000", "standard-00001", "standard-00002", "extended-00000"]
    assert sorted(os.listdir(made / "clips")) == sorted(f"{r['clip_id']}.{ext}" for r in rows for ext in ("wav", "png"))
    for row in rows:
        audio, rate = soundfile.read(made / row["wav"])
        info = soundfile.info(made / row["wav"])
        assert rate == 22050 and info.subtype == "PCM_16" and audio.ndim == 1
        expected = STANDARD_SECONDS if row["kind"] == "standard" else EXTENDED_SECONDS
        assert len(audio) / rate == pytest.approx(expected) == pytest.approx(row["seconds"])
        assert image(made, row["clip_id"]).shape == (64, row["frames"])
        assert np.abs(audio).max() == pytest.approx(10 ** (-1 / 20), abs=1e-3)  # peak at -1 dBFS
        assert (row["scheduler"], row["steps"], row["model"]) == ("ddim", 4, tiny_model)
    assert len({r["seed"] for r in rows}) == 4
    page = (made / "index.html").read_text()
    assert all(f'src="{r["wav"]}"' in page and f'src="{r["png"]}"' in page for r in rows)


def test_a_new_sampler_makes_clips_and_the_manifest_names_it(local_ray, tiny_model, tmp_path):
    assert main(["generate", "--model", tiny_model, "--output", str(tmp_path / "o"), "--scheduler", "dpm-solver-sde",
                 "--karras", "--steps", "3", "--num-clips", "2"]) == 0
    rows = manifest(tmp_path / "o")
    assert [(r["scheduler"], r["steps"]) for r in rows] == [("dpm-solver-sde+karras", 3)] * 2
    assert not np.array_equal(image(tmp_path / "o", rows[0]["clip_id"]), image(tmp_path / "o", rows[1]["clip_id"]))


@pytest.mark.slow
def test_same_clip_at_any_batch_size_and_number_of_actors(local_ray, tiny_model, tmp_path):
    # fp32's contract: a lone actor takes both cores (clips.cpu_threads), two take one each, and bf16's rounding
    # differs between thread counts, which this untrained model amplifies (tests/test_precision.py: bf16's, fitted)
    fp32 = ["--precision", "fp32", "--num-clips", 3]
    generate(tiny_model, tmp_path / "one", *fp32, "--batch-size", 1, "--concurrency", 1)
    generate(tiny_model, tmp_path / "three", *fp32, "--concurrency", 1)
    generate(tiny_model, tmp_path / "two actors", *fp32, "--batch-size", 2, "--concurrency", 2)
    for clip in (f"standard-{i:05d}" for i in range(3)):
        reference = image(tmp_path / "one", clip).astype(int)
        for other in (tmp_path / "three", tmp_path / "two actors"):  # batches of 3, and of 2 and 1
            difference = np.abs(image(other, clip).astype(int) - reference)
            # same noise and sampler draws; batched kernels only round differently (module docstring)
            assert difference.max() <= 1 and (difference > 0).mean() < 0.005, (clip, other)
    assert image(tmp_path / "one", "standard-00000").tolist() != image(tmp_path / "one", "standard-00001").tolist()


def test_planned_clips_come_in_blocks_that_every_actor_can_take(local_ray):
    mel = model_files.load_mel_config("tiny")
    rows = [clip_row(f"standard-{i:05d}", i, "standard", 64, mel, "ddim", 2, "tiny") for i in range(10)]
    # one block would feed one actor however many the pool has (found by the two-node test)
    blocks = work_dataset(rows, ClipSettings(model="tiny", output="x", batch_size=2, concurrency=2)).num_blocks()
    assert blocks == 5  # a batch each
    assert work_dataset(rows, ClipSettings(model="tiny", output="x", batch_size=1, concurrency=1)).num_blocks() == 4


def test_rerun_writes_nothing_and_interrupted_run_is_completed(local_ray, tiny_model, made, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(made, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    generate(tiny_model, out, "--num-clips", 3, "--num-extended", 1)
    assert "0 clips written, 4 already there" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # an interrupted run: one clip never finished (WAV written, no PNG), another not started
    (out / "clips" / "standard-00001.png").unlink()
    (out / "clips" / "extended-00000.wav").unlink()
    (out / "clips" / "extended-00000.png").unlink()
    generate(tiny_model, out, "--num-clips", 3, "--num-extended", 1)
    assert "2 clips written, 2 already there" in capsys.readouterr().out
    rows = manifest(out)
    assert len(rows) == 4 and all((out / r["wav"]).exists() and (out / r["png"]).exists() for r in rows)


def whole_clip_file(path) -> bool:
    """Whether a clip's WAV or PNG decodes to its end."""
    try:
        if path.suffix == ".wav":
            info = soundfile.info(path)
            return info.frames > 0 and len(soundfile.read(path)[0]) == info.frames
        Image.open(path).load()
        return True
    except Exception:  # noqa: BLE001 - a truncated file fails in the decoder, whichever way it fails
        return False


@pytest.mark.slow
def test_an_actor_killed_mid_batch_is_restarted_no_partial_file_is_ever_visible_and_a_rerun_finds_every_clip(
        local_ray, tiny_model, tmp_path, capsys):
    import ray
    from ray.util.state import list_tasks

    out, planned = tmp_path / "out", 8
    clips = out / "clips"
    names = {f"standard-{i:05d}.{ext}" for i in range(planned) for ext in ("wav", "png")}
    batch = "MapWorker(MapBatches(ClipMaker)).submit"  # an actor's title while it runs a batch
    killed, broken, seen = [], [], set()
    running = threading.Event()

    def busy_actor() -> int | None:
        """The process of this session's Ray that runs a batch now, seen the moment it starts (the State API
        hears of it up to a second later, when a batch of this tiny model can be done)."""
        for process in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if batch in " ".join(process.cmdline()):
                    return process.pid
        return None

    def read_new_clip_files():
        for name in sorted((set(os.listdir(clips)) & names) - seen) if clips.is_dir() else ():
            seen.add(name)  # under its own name a file is whole: written to a temporary name, then renamed
            if not whole_clip_file(clips / name):
                broken.append(name)

    def kill_the_actor_in_its_first_batch_and_read_every_clip_file_that_appears():
        while running.is_set():
            if not killed and (pid := busy_actor()):
                os.kill(pid, signal.SIGKILL)  # as the OOM killer would
                killed.append(pid)
            read_new_clip_files()
            time.sleep(0.02)

    running.set()
    watcher = threading.Thread(target=kill_the_actor_in_its_first_batch_and_read_every_clip_file_that_appears,
                               daemon=True)
    watcher.start()
    try:
        generate(tiny_model, out, "--num-clips", planned, "--batch-size", 2)
    finally:
        running.clear()
        watcher.join()
    read_new_clip_files()  # those written after the watcher's last look
    assert killed, "no actor was killed"
    # Ray Data restarts the actor (max_restarts=-1) and runs the batch again: the run ends with every clip
    assert f"{planned} clips written, 0 already there" in capsys.readouterr().out
    assert seen == names and not broken, broken
    assert set(os.listdir(clips)) == names  # no temporary file left behind
    assert all(whole_clip_file(clips / name) for name in names)
    before = {name: (clips / name).stat().st_mtime_ns for name in names}
    generate(tiny_model, out, "--num-clips", planned, "--batch-size", 2)
    assert f"0 clips written, {planned} already there, {planned} in the manifest" in capsys.readouterr().out
    assert {name: (clips / name).stat().st_mtime_ns for name in names} == before
    assert [r["clip_id"] for r in manifest(out)] == [f"standard-{i:05d}" for i in range(planned)]
    # the State API, once it has heard: the batch killed in its first attempt ran again
    address = ray.get_runtime_context().gcs_address  # this test's own Ray: a second Ray on the machine fails a lookup
    deadline = time.monotonic() + 30
    while True:
        attempts = {}
        for task in list_tasks(address=address, detail=True, filters=[("name", "=", batch)]):
            attempts.setdefault(task.task_id, {})[task.attempt_number] = task.state
        if any(a.get(0) == "FAILED" and 1 in a for a in attempts.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any(a.get(0) == "FAILED" and 1 in a for a in attempts.values()), attempts


@pytest.mark.parametrize("args, message", [
    (["--num-clips", "0"], "nothing to generate"),
    (["--num-extended", "1", "--extend-factor", "1.0625"], "68 frames; the model halves the width 3 times"),
    (["--scheduler", "pndm"], "--scheduler must be one of"),
    (["--scheduler", "ddim", "--karras"], "--karras: the ddim scheduler has no Karras sigmas"),
    (["--gpu", "--concurrency", "2"], "--gpu with --concurrency 2 needs 2 GPUs; the Ray cluster has 0, autoscaling"),
    (["--gpu"], "--gpu with --concurrency 1 needs 1 GPUs; the Ray cluster has 0"),  # the default: at least one actor
    (["--gpu", "--concurrency", "3", "--gpus-per-actor", "0.5"], "--gpus-per-actor 0.5 needs 1.5 GPUs"),
    (["--gpu", "--gpus-per-actor", "1.5"], "--gpus-per-actor must be a share of one GPU"),
])
def test_bad_arguments_stop_before_work(local_ray, tiny_model, tmp_path, capsys, args, message):
    assert main(["generate", "--model", tiny_model, "--output", str(tmp_path / "out"), *args]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "clips").exists()


def test_bad_model_unwritable_output_and_changed_settings(local_ray, tiny_model, made, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "no model"), "--output", str(tmp_path / "o")]) == 1
    assert "no model: no such model folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["generate", "--model", tiny_model, "--output", str(tmp_path / "file" / "o"), *FAST]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert main(["generate", "--model", tiny_model, "--output", str(made), "--scheduler", "ddim", "--steps", "5"]) == 1
    assert "holds clips made with other settings (steps differ)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_tiny_model_makes_long_clips_with_the_default_overlap_and_says_its_progress(
        local_ray, tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "0")
    generate(tiny_model, tmp_path / "long", "--seconds", 12, "--num-clips", 2, "--batch-size", 1, "--steps", 2)
    printed = capsys.readouterr().out
    assert re.search(r"^generate: [12]/2 clips \(\d+%\), [\d.]+ clips/(s|min)", printed, re.M), printed
    assert "generate: 2/2 clips (100%)" in printed
    assert {r["seconds"] for r in manifest(tmp_path / "long")} == {12.0}
    settings = json.loads((tmp_path / "long" / "generation.json").read_text())
    assert settings["overlap"] == generate_module.default_overlap(MelConfig(x_res=64, y_res=64)) < 0.7


def test_progress_lines_say_done_total_rate_and_time_left_at_most_each_tenth_or_interval():
    assert progress.line("generate", 6, 24, "clips", 12.0) == "generate: 6/24 clips (25%), 0.5 clips/s, about 36 s left"
    assert progress.line("evaluate", 3, None, "items", 60.0) == "evaluate: 3 items, 3 items/min"
    assert not progress.due(29, done=50, last_done=0, total=100, interval=30)  # not before the interval
    assert not progress.due(100, done=9, last_done=0, total=100, interval=30)  # nor before another tenth
    assert progress.due(31, done=10, last_done=0, total=100, interval=30)
    assert progress.due(300, done=0, last_done=0, total=100, interval=30)  # but at least every 10 intervals
    assert progress.due(0, done=1, last_done=0, total=100, interval=0) and not progress.due(0, 1, 1, 100, 0)
def test_seconds_are_bounded_to_an_hour_before_any_work():
    from audiodiff.clips import check_long_form
    from audiodiff.mel import MelConfig

    check_long_form(MelConfig(), 3600, 2)
    with pytest.raises(AudiodiffError, match=r"--seconds 1e\+07 is over 3600 \(one hour\)"):
        check_long_form(MelConfig(), 1e7, 2)  # was accepted: 220 G samples


def test_the_writer_encodes_the_clips_the_actor_returns_as_arrays(tiny_model, tmp_path):
    config = ClipSettings(model=tiny_model, output=str(tmp_path), scheduler="ddim", steps=2, precision="fp32")
    mel = model_files.load_mel_config(tiny_model)
    rows = [{**clip_row(f"standard-{i:05d}", i, "standard", 64, mel, "ddim", 2, tiny_model), "starts": []}
            for i in range(2)]
    made = ClipMaker(config)(pa.Table.from_pylist(rows, schema=WORK_SCHEMA))
    assert set(made) == {"wav", "png", "image", "audio", "made_on"}  # no encoding on the accelerator's actor
    assert made["image"][0].dtype == np.uint8 and made["image"][0].shape == (64, 64)
    assert made["audio"][0].dtype == np.float32 and len(made["audio"][0]) == round(STANDARD_SECONDS * 22050)
    sink = ClipSink(str(tmp_path), mel.sample_rate, -1.0)
    assert sink.write([BlockAccessor.batch_to_block(made)], None) == {made["made_on"][0]}
    for i in range(2):
        wav, png = encode_clip(made["image"][i], made["audio"][i], mel.sample_rate, -1.0)
        assert (tmp_path / made["wav"][i]).read_bytes() == wav and (tmp_path / made["png"][i]).read_bytes() == png


def test_generation_json_records_the_device_and_precision_the_clips_were_made_with(made):
    recorded = json.loads((made / "generation.json").read_text())
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    assert recorded["made_on"] == [{"device": cpu, "precision": recorded["precision"],
                                    "fp32_matmul": "ieee", "fp32_conv": "ieee"}]


def test_clips_per_batch_follow_a_memory_budget_per_width():
    unet = models.new_model("full").unet
    standard = clip_bytes(unet, None, 256, 256, "bf16")
    assert clip_bytes(unet, None, 256, 1024, "bf16") == 4 * standard == 2 * clip_bytes(unet, None, 256, 256, "fp32")
    cpu, gpu = ClipSettings(model="full", output="x"), ClipSettings(model="full", output="x", gpu=True)
    assert clips_per_batch(cpu, 256, 256, standard, None) == 4  # on CPU, the batch the contract was made at
    assert clips_per_batch(cpu, 256, 1024, 4 * standard, None) == 1  # a 4x wider clip: a quarter of it
    assert clips_per_batch(gpu, 256, 256, standard, 10 * standard) == 10  # what the GPU's budget holds
    assert clips_per_batch(gpu, 256, 1024, 4 * standard, 10 * standard) == 2
    assert clips_per_batch(gpu, 256, 256, standard, 1000 * standard) == 64  # and no more than it gains from
    assert clips_per_batch(gpu, 256, 1024, 4 * standard, 1000 * standard) == 16
    assert clips_per_batch(gpu, 256, 1024, 4 * standard, standard) == 1
    explicit = ClipSettings(model="full", output="x", gpu=True, batch_size=3)
    assert clips_per_batch(explicit, 256, 1024, 4 * standard, 1000 * standard) == 3  # --batch-size overrides


def test_a_batch_that_runs_out_of_memory_is_halved_until_it_fits(tiny_model, monkeypatch):
    mel = model_files.load_mel_config(tiny_model)
    rows = [{**clip_row(f"standard-{i:05d}", i, "standard", 64, mel, "ddim", 2, tiny_model), "starts": []}
            for i in range(3)]
    table = pa.Table.from_pylist(rows, schema=WORK_SCHEMA)
    settings = dict(model=tiny_model, output="x", scheduler="ddim", steps=2, precision="fp32")
    one_by_one = ClipMaker(ClipSettings(**settings, batch_size=1))(table)["image"]
    sample, tried = clips.sampling.sample, []

    def fits(most: int):
        def limited(unet, scheduler, generators, *args, **kwargs):
            tried.append(len(generators))
            if len(generators) > most:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return sample(unet, scheduler, generators, *args, **kwargs)
        return limited

    monkeypatch.setattr(clips.sampling, "sample", fits(1))
    maker = ClipMaker(ClipSettings(**settings, batch_size=3))
    made = maker(table)["image"]
    assert tried == [3, 1, 1, 1] and maker.batch_sizes == {64: 1}  # halved, and kept halved for the rest
    assert all(np.array_equal(a, b) for a, b in zip(made, one_by_one))  # each clip's noise drawn afresh
    monkeypatch.setattr(clips.sampling, "sample", fits(0))
    with pytest.raises(AudiodiffError, match="one clip 64 frames wide does not fit in the memory of"):
        ClipMaker(ClipSettings(**settings, batch_size=2))(table)


def test_actors_default_to_the_clusters_gpus_and_may_share_one(monkeypatch):
    monkeypatch.setattr(clips, "cluster_capacity", lambda resource: {"GPU": 4}.get(resource, 0))
    monkeypatch.setattr(runtime, "cluster_capacity", lambda resource: {"GPU": 4}.get(resource, 0))
    placed = []
    for options in ({"gpu": True}, {"gpu": True, "gpus_per_actor": 0.5}, {"gpu": True, "concurrency": 2}, {}):
        config = ClipSettings(model="tiny", output="x", **options)
        config.place()
        placed.append(config.concurrency)
    assert placed == [4, 8, 2, 1]
    assert ClipSettings(model="tiny", output="x", gpu=True).rows_per_batch == 64  # the actor batches by its memory
    assert ClipSettings(model="tiny", output="x").rows_per_batch == 4


def test_a_lone_cpu_actor_uses_every_core_of_its_node(monkeypatch):
    node = {"Alive": True, "Resources": {"CPU": 8.0}}
    monkeypatch.setattr(clips.ray, "nodes", lambda: [node])
    assert [cpu_threads(actors) for actors in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setattr(clips.ray, "nodes", lambda: [node, node, {"Alive": True, "Resources": {"GPU": 1.0}}])
    assert [cpu_threads(actors) for actors in (1, 2, 4)] == [8, 8, 4]  # spread over the two CPU nodes
