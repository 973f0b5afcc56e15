"""Training throughput: the notebook's plain loop in one process against the Ray Train job with 1 worker, same
tiny model, batch and device; and the full model's step time with bf16 autocast against fp32.

    python benchmarks/bench_train.py [--steps 60] [--batch-size 8]

plain loop: images decoded into memory once, then the notebook's step (random timesteps, add_noise, MSE,
AdamW) without DDP, EMA or checkpoints. Ray Train job: `run_finetune` with 1 worker on a local Ray, images/s
as it reports them, leaving out its first report (start-up).
"""

import argparse
import io
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from audiodiff import models
from audiodiff.preprocess import PreprocessConfig, run_preprocess
from audiodiff.runtime import init_ray
from audiodiff.synth import write_examples
from audiodiff.dataset import spectrogram_files
from audiodiff.train import TrainConfig, run_finetune


def plain_loop(images: torch.Tensor, preset: str, batch_size: int, steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    parts = models.new_model(preset)
    unet, scheduler = parts.unet.train(), parts.scheduler
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    start = None
    for step in range(steps + 2):
        if step == 2:  # after warm-up
            start = time.perf_counter()
        batch = images[torch.randint(0, len(images), (batch_size,))]
        noise = torch.randn_like(batch)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        loss = F.mse_loss(unet(scheduler.add_noise(batch, noise, t), t).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * batch_size / (time.perf_counter() - start)


def step_time(preset: str, batch_size: int, bf16: bool, steps: int = 3) -> float:
    parts = models.new_model(preset)
    unet = parts.unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    height, width = parts.image_size
    x, times = torch.randn(batch_size, 1, height, width), []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(unet(x, torch.randint(0, 1000, (batch_size,))).sample.float(), x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def train_step_flops(preset: str) -> float:
    """Forward and backward FLOPs for one image, counted by torch: what sizes a run on hardware not measured."""
    parts = models.new_model(preset)
    height, width = parts.image_size
    with FlopCounterMode(display=False) as counter:
        parts.unet.train()(torch.randn(1, 1, height, width), torch.tensor([0])).sample.pow(2).mean().backward()
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-train-")
    try:
        init_ray()
        write_examples(os.path.join(work, "audio"), tracks_per_genre=4, seconds=12.0)
        data = os.path.join(work, "spec")
        run_preprocess(PreprocessConfig(sources=[os.path.join(work, "audio")], output=data, model="tiny"))
        table = pq.read_table(spectrogram_files(data))
        images = torch.from_numpy(np.stack([
            np.asarray(Image.open(io.BytesIO(row["bytes"]))) for row in table["image"].to_pylist()
        ]).astype(np.float32)[:, None] / 127.5 - 1)
        epochs = max(1, -(-args.steps * args.batch_size // len(images)))
        result = run_finetune(TrainConfig(data=data, model="tiny", output=os.path.join(work, "model"),
                                          epochs=epochs, batch_size=args.batch_size, warmup_steps=10,
                                          checkpoint_every=10_000, log_every=10))
        ray.shutdown()
        with open(os.path.join(work, "model", "metrics.jsonl")) as f:
            reports = [json.loads(line) for line in f][1:]
        job = float(np.mean([r["images_per_second"] for r in reports]))
        print(f"tiny model, batch {args.batch_size}, CPU ({os.cpu_count()} cores), {result['steps']} steps")
        for threads in (1, 2):
            plain = plain_loop(images, "tiny", args.batch_size, args.steps, threads)
            print(f"plain loop, {threads} thread{'s' if threads > 1 else ' '}: {plain:7.1f} images/s")
        print(f"Ray Train job, 1 worker (0.5 CPU): {job:7.1f} images/s  ({job / plain:.2f}x the 2-thread loop)")
        torch.set_num_threads(os.cpu_count())
        fp32, bf16 = step_time("full", 1, False), step_time("full", 1, True)
        print(f"full model, batch 1, CPU step: fp32 {fp32:.2f} s, bf16 autocast {bf16:.2f} s ({fp32 / bf16:.2f}x)")
        flops = train_step_flops("full")
        print(f"full model training step: {flops / 1e9:.1f} GFLOP per image (counted); "
              f"{flops / fp32 / 1e9:.0f} GFLOP/s reached here in fp32")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
