import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import torch
from diffusers import AudioDiffusionPipeline, DiffusionPipeline, UNet2DModel

from audiodiff import models
from audiodiff.cli import main

TRAIN = ["--num-workers", "2", "--warmup-steps", "2", "--log-every", "2", "--num-samples", "4", "--sample-steps", "4"]


@pytest.fixture(scope="module")
def many_parts(spectrograms, tmp_path_factory):
    """The same images in three parts, as preprocess writes one part per 32 tracks."""
    import pyarrow.parquet as pq

    from audiodiff.dataset import spectrogram_files

    data = tmp_path_factory.mktemp("parts")
    (data / "data").mkdir()
    table = pq.read_table(spectrogram_files(spectrograms))
    for i, start in enumerate(range(0, table.num_rows, 12)):
        pq.write_table(table.slice(start, 12), data / "data" / f"part-{i:05d}.parquet")
    for name in ("mel_config.json", "stats.json"):
        shutil.copy(os.path.join(spectrograms, name), data / name)
    return str(data)


def finetune(data, output, *args):
    return main(["finetune", "--data", data, "--model", "tiny", "--output", str(output), *TRAIN, *map(str, args)])


def history(output):
    return [json.loads(line) for line in open(os.path.join(output, "metrics.jsonl"))]


def checkpoints(output) -> list:
    """The run's checkpoint folders, oldest first (Ray names them by time)."""
    folder = output / "checkpoints" / "finetune"
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


def checkpoint_steps(output) -> list[int]:
    return [json.loads((c / "state.json").read_text())["step"] for c in checkpoints(output)]


@pytest.mark.slow
def test_two_workers_learn_checkpoint_and_export_a_diffusers_pipeline(spectrograms, tmp_path):
    out = tmp_path / "model"
    # 32 training images / (2 per worker x 2 workers x 2 accumulated) = 4 steps per epoch; DDP with bucket views,
    # no_sync and gradients all-reduced in bf16
    assert finetune(spectrograms, out, "--epochs", 3, "--checkpoint-every", 4, "--batch-size", 2, "--grad-accum", 2,
                    "--grad-compression", "bf16") == 0
    steps = history(out)
    assert [h["step"] for h in steps] == [2, 4, 6, 8, 10, 12]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(h["images_per_second"] > 0 and "lr" in h for h in steps)
    assert checkpoint_steps(out) == [8, 12]  # every 4 steps, the newest two kept
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # samples and the quality figure at the end (--sample-every defaults past this short run)
    assert [h["step"] for h in steps if "frechet_distance" in h] == [12] and steps[-1]["frechet_distance"] > 0
    samples = out / "samples" / "step-12"
    assert sorted(p.name for p in (samples / "clips").iterdir()) == sorted(
        f"sample-{i:02d}.{ext}" for i in range(4) for ext in ("wav", "png"))
    assert "Fréchet distance" in (samples / "index.html").read_text()
    events = list((out / "logs").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe, AudioDiffusionPipeline)
    audio = pipe(steps=2, generator=torch.Generator().manual_seed(0)).audios
    assert audio.shape == (1, 1, 63 * 512)
    # the exported weights are the EMA of the last checkpoint, and the live weights there differ from them
    newest = checkpoints(out)[-1]
    ema = list(UNet2DModel.from_pretrained(str(newest / "ema")).parameters())
    exported = list(pipe.unet.parameters())
    live = list(UNet2DModel.from_pretrained(str(newest / "unet")).parameters())
    assert all(torch.equal(a, b) for a, b in zip(exported, ema))
    assert any(not torch.equal(a, b) for a, b in zip(exported, live))
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"


def test_bad_input_is_reported_before_any_worker_starts(spectrograms, tmp_path, capsys):
    assert finetune(str(tmp_path / "nothing"), tmp_path / "o") == 1
    assert "nothing: no such dataset" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert finetune(str(tmp_path / "empty"), tmp_path / "o") == 1
    assert "no parquet files" in capsys.readouterr().err
    assert main(["finetune", "--data", spectrograms, "--model", "full", "--output", str(tmp_path / "o")]) == 1
    assert "images are 64x64 but the model makes 256x256" in capsys.readouterr().err
    broken = tmp_path / "broken model"
    models.save_model(models.new_model("tiny"), str(broken))
    os.remove(broken / "unet" / "config.json")
    assert main(["finetune", "--data", spectrograms, "--model", str(broken), "--output", str(tmp_path / "o")]) == 1
    assert "missing unet/config.json" in capsys.readouterr().err
    assert finetune(spectrograms, tmp_path / "o", "--genre", "polka") == 1
    assert "no images of genre polka" in capsys.readouterr().err
    assert finetune(spectrograms, tmp_path / "o", "--gpu") == 1
    assert "--gpu with 2 workers needs 2 GPUs; the Ray cluster has 0, autoscaling included" in capsys.readouterr().err


@pytest.mark.slow
def test_run_survives_a_worker_killed_mid_run(spectrograms, tmp_path):
    import ray
    from ray.util.state import list_actors

    out = tmp_path / "model"
    killed = []

    def kill_one_worker_after_the_first_checkpoint():
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            if (out / "checkpoints" / "finetune").is_dir() and checkpoints(out):
                # this test's own Ray, by address: without one, a second Ray on the machine fails the lookup
                workers = list_actors(address=ray.get_runtime_context().gcs_address,
                                      filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)  # an actor of this test's own Ray
                    killed.append(workers[-1].pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    assert finetune(spectrograms, out, "--epochs", 6, "--checkpoint-every", 2, "--max-failures", 1) == 0
    killer.join()
    assert killed, "no worker was killed"
    assert checkpoint_steps(out)[-1] == 24
    assert history(out)[-1]["step"] == 24


@pytest.mark.slow
def test_resumed_mid_epoch_ends_with_the_weights_and_optimizer_state_of_an_uninterrupted_run(many_parts, tmp_path,
                                                                                              capsys):
    # two runs of one seed on a dataset of many parts: its blocks must come in file order in every run
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    # --export last: the weights of step 8 (the stopped run also measured step 5, which could score best)
    assert finetune(many_parts, whole, "--epochs", 2, "--export", "last") == 0  # 4 steps per epoch
    assert finetune(many_parts, parts, "--epochs", 2, "--stop-at-step", 5) == 0  # mid-epoch 2
    assert checkpoint_steps(parts)[-1] == 5
    assert finetune(many_parts, parts, "--epochs", 2) == 1  # no silent restart over a run's checkpoints
    assert finetune(many_parts, parts, "--epochs", 3, "--resume") == 1  # the run's length is fixed
    capsys.readouterr()
    assert finetune(many_parts, parts, "--epochs", 2, "--resume", "--lr", "2e-4", "--seed", "3") == 1
    assert ("--resume with settings that change the result: lr was 0.0001, now 0.0002, seed was 0, now 3"
            in capsys.readouterr().err)
    # on one worker: its accumulation doubles, so each step takes the same images, noise and timesteps; with the
    # threads of each of the two workers, so that oneDNN's kernels round alike (bf16 autocast on this CPU)
    assert finetune(many_parts, parts, "--epochs", 2, "--resume", "--num-workers", 1, "--cpus-per-worker", 1,
                    "--export", "last") == 0
    assert "resuming on 1 workers with --grad-accum 2: the run's global batch of 8 images stays" in capsys.readouterr().out
    assert [h["step"] for h in history(parts)] == [2, 4, 5, 6, 8]  # the stop at 5 is logged
    assert [h["step"] for h in history(whole)] == [2, 4, 6, 8]
    optimizer = torch.load(checkpoints(parts)[-1] / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {8.0}  # Adam's moments went on from 5
    for name in ("model", "unet"):  # the exported EMA weights and the live ones of the last checkpoint
        folder = (lambda o: o / "unet") if name == "model" else (lambda o: checkpoints(o)[-1] / "unet")
        a = UNet2DModel.from_pretrained(str(folder(whole))).state_dict()
        b = UNet2DModel.from_pretrained(str(folder(parts))).state_dict()
        # the same data, noise and timesteps, in the same order; the two ranks' gradients summed by one worker's
        # accumulation instead of DDP's all-reduce: equal up to that rounding
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a), name


def test_data_order_mixes_tracks_and_is_reproducible_by_seed(local_ray):
    import ray

    from audiodiff.train import TrainConfig
    from audiodiff.train_data import InMemoryImages, RunPlan

    # 8 tracks of 12 consecutive slices each, as preprocess writes them; each image holds its track's number
    tracks = np.repeat(np.arange(8, dtype=np.uint8), 12)[:, None, None] * np.ones((1, 2, 2), np.uint8)
    where = np.array([(b, r) for b in (0, 1) for r in range(48)])
    images = InMemoryImages([ray.put({"image": tracks[:48]}), ray.put({"image": tracks[48:]})], where)
    plan = RunPlan(rows=96, holdout_rows=0, steps_per_epoch=12, total_steps=24, warmup_steps=0, cpus=1,
                   in_memory=True, blocks=None, where=None, holdout=None)

    def order(seed, epoch, rank=0, world=1, first=0):
        config = TrainConfig(data="", model="tiny", output="", batch_size=8 // world, seed=seed)
        return [b["image"][:, 0, 0].tolist() for b in images.batches(config, plan, rank, world, epoch, first)]

    first = order(seed=0, epoch=0)
    assert all(len(set(batch)) >= 4 for batch in first)  # 8 slices from at least 4 of the 8 tracks
    assert sorted(sum(first, [])) == sorted(tracks[:, 0, 0].tolist())  # every image once an epoch
    assert order(seed=0, epoch=0) == first and order(seed=1, epoch=0) != first and order(seed=0, epoch=1) != first
    assert order(seed=0, epoch=0, first=5) == first[5:]  # a resumed epoch continues at its step
    ranks = [order(seed=0, epoch=0, rank=r, world=2) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == first  # two workers split every step of the one-worker order


def test_the_data_order_is_the_same_whatever_order_preprocess_wrote_the_slices_in(spectrograms, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audiodiff.train import TrainConfig
    from audiodiff.train_data import InMemoryImages, plan_run

    reversed_data = shutil.copytree(spectrograms, tmp_path / "reversed")
    parts = sorted(reversed_data.rglob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(part) for part in parts])
    for part in parts:
        part.unlink()
    # the workers of another preprocess run finish in another order
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), parts[0])
    firsts = []
    for data in (spectrograms, str(reversed_data)):
        config = TrainConfig(data=data, model="tiny", output=str(tmp_path / "o"), batch_size=4)
        plan, _ = plan_run(config, models.new_model("tiny"))
        batches = InMemoryImages(plan.blocks, plan.where).batches(config, plan, 0, 1, 0, 0)
        firsts.append(np.stack([batch["image"] for batch in batches]))
    assert np.array_equal(*firsts)


@pytest.mark.slow
def test_reads_teticios_saved_datasets_and_checkpoints_and_exports_to_object_storage(spectrograms, tmp_path, s3_bucket):
    import datasets
    import pyarrow.parquet as pq

    from audiodiff import storage
    from audiodiff.dataset import open_spectrograms, spectrogram_files

    # what teticio's scripts/audio_to_images.py writes: a DatasetDict with image, audio_file, slice
    rows = pq.read_table(spectrogram_files(spectrograms), columns=["image", "audio_file", "slice"]).to_pylist()
    saved = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": saved}).save_to_disk(str(tmp_path / "teticio"))
    assert open_spectrograms(str(tmp_path / "teticio")).read().count() == 36  # the same reader as from object storage
    storage.upload_dir(str(tmp_path / "teticio"), f"{s3_bucket}/teticio")
    assert finetune(f"{s3_bucket}/teticio", f"{s3_bucket}/model", "--epochs", 1, "--checkpoint-every", 2) == 0
    files = storage.list_files(f"{s3_bucket}/model")
    metrics = [json.loads(line) for line in storage.read_bytes(f"{s3_bucket}/model/metrics.jsonl").splitlines()]
    assert [h["step"] for h in metrics] == [2, 4]  # 32 of 36 images, 8 a step
    checkpointed = [f for f in files if "/checkpoints/finetune/checkpoint_" in f and f.endswith("/ema/config.json")]
    assert len(checkpointed) == 2  # steps 2 and 4
    assert f"{s3_bucket}/model/samples/step-4/index.html" in files and f"{s3_bucket}/model/loss.png" in files
    assert any(f.startswith(f"{s3_bucket}/model/logs/events.out.tfevents.") for f in files)
    assert models.load_model(f"{s3_bucket}/model").image_size == (64, 64)
    assert finetune(str(tmp_path / "teticio"), tmp_path / "genre", "--genre", "drone") == 1


@pytest.fixture
def tensors_on_a_gpu(monkeypatch):
    """Makes this CPU-only machine save tensors as a GPU worker does: torch.save tags their storages 'cuda:0'
    (loading them without a map_location then fails as on a CPU-only driver), except the copies that
    Tensor.cpu() makes. Yields a function that ends the pretence."""
    copied = set()

    def cpu(self, *args, **kwargs):
        copy = self.clone()
        copied.add(copy.untyped_storage().data_ptr())
        return copy

    def tag(storage):
        return None if storage.data_ptr() in copied else "cuda:0"

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.serialization, "_package_registry",
                        [(0, tag, lambda storage, location: None), *torch.serialization._package_registry])
    yield monkeypatch.undo


def _genre_training_state():
    """A tiny genre model after one optimizer step: (parts, unet, ema, optimizer, lr schedule, genre model, its
    vectors' EMA)."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from audiodiff.train import GenreConditioned

    parts = models.new_model("tiny", conditional=True)
    genre_model = GenreConditioned(parts.unet, torch.randn(3, parts.cross_attention_dim))
    optimizer = torch.optim.AdamW(genre_model.parameters())
    for p in genre_model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    ema = EMAModel(parts.unet.parameters(), model_cls=type(parts.unet), model_config=parts.unet.config)
    ema_vectors = EMAModel([genre_model.vectors])
    ema_vectors.step([genre_model.vectors])
    return parts, parts.unet, ema, optimizer, get_scheduler("constant", optimizer), genre_model, ema_vectors


def test_a_gpu_workers_checkpoint_holds_cpu_tensors_and_loads_and_exports_on_a_cpu_only_machine(tmp_path,
                                                                                               tensors_on_a_gpu):
    from ray.train import Checkpoint

    from audiodiff.train import TrainConfig
    from audiodiff.train_checkpoint import GENRES_STATE, load_training_state, save_training_state
    from audiodiff.train_report import export

    parts, unet, ema, optimizer, lr_schedule, genre_model, ema_vectors = _genre_training_state()
    config = TrainConfig(data="", model="tiny", output="", condition="genre")
    saved = tmp_path / "saved"
    save_training_state(str(saved), unet, ema, optimizer, lr_schedule, 1, [{"step": 1, "loss": 1.0}], config,
                        genre_model, ema_vectors)
    # made from a checkpoint of an audiodiff that saved the tensors where they were: tagged cuda:0
    old = tmp_path / "old"
    save_training_state(str(old), unet, ema, optimizer, lr_schedule, 1, [{"step": 1, "loss": 1.0}], config,
                        genre_model, ema_vectors)
    torch.save(optimizer.state_dict(), old / "optimizer.pt")
    torch.save({"vectors": genre_model.vectors.detach(), "ema": ema_vectors.state_dict()}, old / GENRES_STATE)
    tensors_on_a_gpu()
    # this machine has no CUDA: a file holding a CUDA tensor does not load without a map_location
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
        torch.load(old / "optimizer.pt", weights_only=True)
    for name in ("optimizer.pt", GENRES_STATE):
        torch.load(saved / name, weights_only=True)  # CPU tensors only
    # loaded onto the worker's device (here the CPU), and exported by a CPU-only driver
    fresh = _genre_training_state()
    step, _, _ = load_training_state(str(old), fresh[1], fresh[3], fresh[4], torch.device("cpu"), fresh[5], fresh[6])
    assert step == 1 and torch.equal(fresh[5].vectors, genre_model.vectors)
    assert fresh[6].shadow_params[0].device.type == "cpu"
    checkpoint = Checkpoint.from_directory(str(old))
    export(checkpoint, checkpoint, parts, dataclasses.replace(config, output=str(tmp_path / "model")), ["a", "b"], 1)
    assert torch.equal(models.load_model(str(tmp_path / "model")).conditioning.vectors, ema_vectors.shadow_params[0][:-1])


def test_resume_on_other_workers_keeps_the_global_batch_or_names_the_numbers(tmp_path):
    from audiodiff.errors import AudiodiffError
    from audiodiff.train import TrainConfig
    from audiodiff.train_checkpoint import keep_global_batch

    before = {"batch_size": 4, "num_workers": 2, "grad_accum": 3}  # 24 images a step
    config = TrainConfig(data="", model="tiny", output="out", batch_size=4, num_workers=3)
    assert keep_global_batch(config, before).grad_accum == 2
    assert keep_global_batch(TrainConfig(data="", model="tiny", output="out", batch_size=4, num_workers=2,
                                         grad_accum=3), before).grad_accum == 3
    with pytest.raises(AudiodiffError, match=r"out: --resume on 4 workers cannot keep the run's global batch of 24 "
                                             r"images \(4 per worker x 2 workers x 3 accumulation\) with --batch-size 4; "
                                             r"use --num-workers 1, 2, 3, 6"):
        keep_global_batch(dataclasses.replace(config, num_workers=4), before)


def test_samples_come_from_the_model_in_eval_mode_under_the_runs_autocast(tmp_path, monkeypatch):
    from diffusers.training_utils import EMAModel

    from audiodiff import train_report
    from audiodiff.train import TrainConfig
    from audiodiff.train_data import RunPlan
    from audiodiff.train_report import Reporter

    parts = models.new_model("tiny")
    unet = parts.unet.train()
    seen = []

    def sample(model, *args, **kwargs):
        seen.append((model.training, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return torch.zeros(len(args[1]), 64, 64, dtype=torch.uint8)

    monkeypatch.setattr(train_report.sampling, "sample", sample)
    monkeypatch.setattr(train_report.ray, "get", lambda ref: ref)  # the held-out images themselves, not a Ray ref
    plan = RunPlan(rows=4, holdout_rows=4, steps_per_epoch=1, total_steps=1, warmup_steps=0, cpus=1, in_memory=True,
                   blocks=None, where=None,
                   holdout=np.random.default_rng(0).integers(0, 255, (4, 64, 64), dtype=np.uint8))
    config = TrainConfig(data="", model="tiny", output=str(tmp_path), precision="bf16", num_samples=2, sample_steps=2)
    ema = EMAModel(unet.parameters(), model_cls=type(unet), model_config=unet.config)
    Reporter(config, parts, unet, ema, None, plan, torch.device("cpu")).write_samples(1)
    assert seen == [(False, True, torch.bfloat16)] and unet.training
