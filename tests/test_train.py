import json
import os
import signal
import threading
import time

import pytest
import safetensors.torch
import torch
from diffusers import AudioDiffusionPipeline, DiffusionPipeline, UNet2DModel

from audiodiff import models
from audiodiff.cli import main
from audiodiff.synth import write_examples

TRAIN = ["--num-workers", "2", "--warmup-steps", "2", "--log-every", "2"]


@pytest.fixture(scope="module")
def spectrograms(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_examples(str(root / "audio"), tracks_per_genre=3, seconds=6.0)
    assert main(["preprocess", str(root / "audio"), "--model", "tiny", "--output", str(root / "spec"),
                 "--genre-from-folder"]) == 0  # 36 slices of 64x64
    return str(root / "spec")


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


def test_two_workers_learn_checkpoint_and_export_a_diffusers_pipeline(spectrograms, tmp_path):
    out = tmp_path / "model"
    # 36 images / (4 per worker x 2 workers) = 4 steps per epoch
    assert finetune(spectrograms, out, "--epochs", 3, "--checkpoint-every", 4) == 0
    steps = history(out)
    assert [h["step"] for h in steps] == [2, 4, 6, 8, 10, 12]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(h["images_per_second"] > 0 and "lr" in h for h in steps)
    assert checkpoint_steps(out) == [8, 12]  # every 4 steps, the newest two kept
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe, AudioDiffusionPipeline)
    audio = pipe(steps=2, generator=torch.Generator().manual_seed(0)).audios
    assert audio.shape == (1, 1, 63 * 512)
    # the exported weights are the EMA of the last checkpoint, and the live weights there differ from them
    newest = checkpoints(out)[-1]
    ema = safetensors.torch.load_file(newest / "ema.safetensors")
    exported = list(pipe.unet.parameters())
    live = list(UNet2DModel.from_pretrained(str(newest / "unet")).parameters())
    assert all(torch.equal(exported[i], ema[str(i)]) for i in range(len(exported)))
    assert any(not torch.equal(a, b) for a, b in zip(exported, live))


def test_resume_continues_the_step_count_and_optimizer_state(spectrograms, tmp_path):
    out = tmp_path / "model"
    assert finetune(spectrograms, out, "--epochs", 1, "--checkpoint-every", 2) == 0
    assert [h["step"] for h in history(out)] == [2, 4]
    assert finetune(spectrograms, out, "--epochs", 2, "--checkpoint-every", 2) == 1  # no silent restart
    assert finetune(spectrograms, out, "--epochs", 2, "--checkpoint-every", 2, "--resume") == 0
    assert [h["step"] for h in history(out)] == [2, 4, 6, 8]
    optimizer = torch.load(checkpoints(out)[-1] / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {8.0}  # Adam's moments went on from 4


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


def test_run_survives_a_worker_killed_mid_run(spectrograms, tmp_path):
    from ray.util.state import list_actors

    out = tmp_path / "model"
    killed = []

    def kill_one_worker_after_the_first_checkpoint():
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            if (out / "checkpoints" / "finetune").is_dir() and checkpoints(out):
                workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
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


def test_checkpoints_and_export_to_object_storage(spectrograms, s3_bucket):
    from audiodiff import storage

    assert finetune(spectrograms, f"{s3_bucket}/model", "--epochs", 1, "--checkpoint-every", 2) == 0
    files = storage.list_files(f"{s3_bucket}/model")
    assert f"{s3_bucket}/model/model_index.json" in files and f"{s3_bucket}/model/metrics.jsonl" in files
    saved = [f for f in files if "/checkpoints/finetune/checkpoint_" in f and f.endswith("/ema.safetensors")]
    assert len(saved) == 2  # steps 2 and 4
    assert models.load_model(f"{s3_bucket}/model").image_size == (64, 64)
