"""Training throughput and data order: the notebook's plain loop in one process against the Ray Train job,
same tiny model, batch and threads; 2 workers against 1 on the same cores; the job's two data paths (held in
the object store and walked by a seeded permutation, or streamed with a randomised block order and a local
shuffle buffer); and the full model's CPU step in fp32 against bf16 autocast.

    python benchmarks/bench_train.py [--steps 60] [--batch-size 8]

plain loop: images decoded into memory once, then the notebook's step (random batch, random timesteps,
add_noise, MSE, AdamW) without DDP, EMA or checkpoints. Ray Train job: `run_finetune` on a local Ray,
images/s as it reports them, leaving out its first report (start-up). Mixing: distinct tracks in a batch of
the order each data path gives (preprocess writes a track's slices next to each other). The last line is
one JSON object with the figures and ratios.
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
from audiodiff.dataset import open_spectrograms, spectrogram_files
from audiodiff.train import TrainConfig, run_finetune
from audiodiff.devices import cpu_name


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


def job_rate(data: str, work: str, name: str, steps: int, batch_size: int, rows: int, **overrides) -> float:
    workers = overrides.get("num_workers", 1)
    epochs = max(1, -(-steps * batch_size * workers // rows))
    output = os.path.join(work, name)
    run_finetune(TrainConfig(data=data, model="tiny", output=output, epochs=epochs, batch_size=batch_size,
                             checkpoint_every=10_000, sample_every=10_000, log_every=10, num_samples=2,
                             sample_steps=2, **overrides))
    with open(os.path.join(output, "metrics.jsonl")) as f:
        reports = [json.loads(line) for line in f][1:]
    return float(np.mean([r["images_per_second"] for r in reports]))


def mixing(data: str, batch_size: int) -> dict[str, float]:
    """Mean distinct tracks per batch: a seeded permutation of all rows, against a seeded file order with a
    local shuffle buffer (what the job streams with), against no shuffling at all."""
    tracks = [r["audio_file"] for r in open_spectrograms(data).read().select_columns(["audio_file"]).take_all()]

    def distinct(order):
        return float(np.mean([len({tracks[i] for i in order[s:s + batch_size]})
                              for s in range(0, len(order) - batch_size + 1, batch_size)]))

    streamed = [len(set(b["audio_file"])) for b in open_spectrograms(data).read(shuffle_seed=0).select_columns(["audio_file"])
                .iter_batches(batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=16 * batch_size,
                              local_shuffle_seed=0)]
    return {"permutation": distinct(np.random.default_rng(0).permutation(len(tracks))),
            "file_order_and_buffer": float(np.mean(streamed)), "unshuffled": distinct(np.arange(len(tracks)))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-train-")
    cpu = cpu_name()
    try:
        init_ray()
        write_examples(os.path.join(work, "audio"), tracks_per_genre=4, seconds=12.0)
        data = os.path.join(work, "spec")
        run_preprocess(PreprocessConfig(sources=[os.path.join(work, "audio")], output=data, model="tiny"))
        table = pq.read_table(spectrogram_files(data))
        images = torch.from_numpy(np.stack([
            np.asarray(Image.open(io.BytesIO(row["bytes"]))) for row in table["image"].to_pylist()
        ]).astype(np.float32)[:, None] / 127.5 - 1)
        rows = len(images) - round(0.1 * len(images))  # the job holds a tenth out for its quality figure
        b = args.batch_size
        figures = {"cpu": cpu, "cores": os.cpu_count(), "batch_size": b, "images": len(images)}
        figures["mixing_tracks_per_batch"] = mixing(data, b)
        figures["job_1_worker"] = job_rate(data, work, "one", args.steps, b, rows)
        figures["job_1_worker_streamed"] = job_rate(data, work, "streamed", args.steps, b, rows, stream=True)
        figures["job_2_workers"] = job_rate(data, work, "two", args.steps, b // 2, rows, num_workers=2)
        ray.shutdown()
        for threads in (1, 2):
            figures[f"plain_loop_{threads}_threads"] = plain_loop(images, "tiny", b, args.steps, threads)
        torch.set_num_threads(os.cpu_count())
        tiny_fp32, tiny_bf16 = step_time("tiny", b, False), step_time("tiny", b, True)
        fp32, bf16 = step_time("full", 1, False), step_time("full", 1, True)
        flops = train_step_flops("full")
        figures.update({
            "job_over_plain_loop": figures["job_1_worker"] / figures[f"plain_loop_{os.cpu_count()}_threads"],
            "streamed_over_in_memory": figures["job_1_worker_streamed"] / figures["job_1_worker"],
            "two_workers_over_one": figures["job_2_workers"] / figures["job_1_worker"],
            "tiny_step_s": {"fp32": tiny_fp32, "bf16_autocast": tiny_bf16},
            "full_step_s": {"fp32": fp32, "bf16_autocast": bf16}, "full_gflop_per_image": flops / 1e9,
        })
        print(f"CPU: {cpu} ({os.cpu_count()} cores); tiny model, batch {b} per step")
        print(f"mixing, distinct tracks per batch of {b}: permutation {figures['mixing_tracks_per_batch']['permutation']:.2f}, "
              f"file order + buffer {figures['mixing_tracks_per_batch']['file_order_and_buffer']:.2f}, "
              f"unshuffled {figures['mixing_tracks_per_batch']['unshuffled']:.2f}")
        for threads in (1, 2):
            print(f"plain loop, {threads} thread(s):           {figures[f'plain_loop_{threads}_threads']:7.1f} images/s")
        print(f"Ray Train job, 1 worker, data in memory: {figures['job_1_worker']:7.1f} images/s "
              f"({figures['job_over_plain_loop']:.2f}x the {os.cpu_count()}-thread loop)")
        print(f"Ray Train job, 1 worker, streamed:       {figures['job_1_worker_streamed']:7.1f} images/s "
              f"({figures['streamed_over_in_memory']:.2f}x in memory)")
        print(f"Ray Train job, 2 workers x batch {b // 2}:     {figures['job_2_workers']:7.1f} images/s "
              f"({figures['two_workers_over_one']:.2f}x 1 worker)")
        print(f"tiny model CPU step, batch {b}: fp32 {tiny_fp32 * 1e3:.0f} ms, bf16 autocast {tiny_bf16 * 1e3:.0f} ms")
        print(f"full model CPU step, batch 1: fp32 {fp32:.2f} s, bf16 autocast {bf16:.2f} s ({fp32 / bf16:.2f}x); "
              f"{flops / 1e9:.1f} GFLOP per image, {flops / fp32 / 1e9:.0f} GFLOP/s in fp32")
        print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
