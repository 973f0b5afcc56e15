"""Generation throughput: diffusers' AudioDiffusionPipeline called as the notebook does against this job.

    python benchmarks/bench_generate.py [--model tiny] [--clips 16] [--steps 50] [--batch-size 8]

notebook: one clip per `pipe(steps=..., generator=...)` call (DDIM), librosa Griffin-Lim inside, WAV written.
audiodiff: `run_generate` on a local Ray (DDIM, same steps), WAV + PNG + manifest written, with 1 and 2 actors;
the model is untrained (the figures do not depend on the weights). Also where one actor's time goes per clip.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import ray
import soundfile
import torch
from diffusers import AudioDiffusionPipeline, DDIMScheduler, Mel
from torch.utils.flop_counter import FlopCounterMode

from audiodiff import models, sampling
from audiodiff.encode import png_bytes, wav_bytes
from audiodiff.clips import ClipMaker
from audiodiff.generate import GenerateConfig, run_generate
from audiodiff.runtime import init_ray


def notebook(folder: str, clips: int, steps: int, out: str) -> float:
    parts = models.load_model(folder)
    pipe = AudioDiffusionPipeline(vqvae=None, unet=parts.unet, mel=Mel(**vars(parts.mel)),
                                  scheduler=DDIMScheduler.from_config(parts.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    pipe(steps=2)  # warm-up
    start = time.perf_counter()
    for i in range(clips):
        output = pipe(steps=steps, generator=torch.Generator().manual_seed(i))
        soundfile.write(os.path.join(out, f"{i}.wav"), output.audios[0, 0], parts.mel.sample_rate)
    return clips / (time.perf_counter() - start)


def breakdown(config: GenerateConfig, batch_size: int) -> dict[str, float]:
    generator = ClipMaker(config)
    generators = [torch.Generator().manual_seed(seed) for seed in range(batch_size)]
    mel = generator.codec.config
    start = time.perf_counter()
    images = sampling.sample(generator.unet, generator.scheduler, generators, mel.y_res, mel.x_res, config.num_steps)
    t1 = time.perf_counter()
    audio = generator.codec.images_to_audio(images).numpy()
    t2 = time.perf_counter()
    encoded = [(wav_bytes(a, 22050), png_bytes(i)) for a, i in zip(audio, images.numpy())]
    t3 = time.perf_counter()
    for n, (wav, png) in enumerate(encoded):
        for data, ext in ((wav, "wav"), (png, "png")):
            with open(os.path.join(config.output, f"b{n}.{ext}"), "wb") as f:
                f.write(data)
    t4 = time.perf_counter()
    return {k: v / batch_size for k, v in
            zip(("denoising", "griffin-lim", "encoding", "writing"), (t1 - start, t2 - t1, t3 - t2, t4 - t3))}


def forward_flops(unet, height: int, width: int) -> float:
    """One denoising step of one clip, counted by torch: what sizes a run on hardware not measured."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.randn(1, 1, height, width), torch.tensor([0]))
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a preset or model folder")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-generate-")
    try:
        folder = os.path.join(work, "model")
        models.save_model(models.load_model(args.model), folder)
        print(f"{args.clips} standard clips, model {args.model}, DDIM {args.steps} steps, "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}")
        os.makedirs(os.path.join(work, "notebook"))
        reference = notebook(folder, args.clips, args.steps, os.path.join(work, "notebook"))
        print(f"notebook (pipe() per clip, {torch.get_num_threads()} threads): {reference:7.2f} clips/s")
        figures = {"model": args.model, "clips": args.clips, "steps": args.steps, "batch_size": args.batch_size,
                    "cpus": os.cpu_count(), "notebook_clips_per_s": reference}
        init_ray()
        for actors in (1, 2):
            config = GenerateConfig(model=folder, output=os.path.join(work, f"out-{actors}"), num_clips=args.clips,
                                    scheduler="ddim", steps=args.steps, batch_size=args.batch_size,
                                    concurrency=actors)
            start = time.perf_counter()
            run_generate(config)
            rate = args.clips / (time.perf_counter() - start)
            figures[f"audiodiff_{actors}_actors_clips_per_s"] = rate
            figures[f"audiodiff_{actors}_actors_over_notebook"] = rate / reference
            print(f"audiodiff, {actors} actor{'s' if actors > 1 else ' '}, batch {args.batch_size}:       "
                  f"{rate:7.2f} clips/s  ({rate / reference:.1f}x the notebook; includes actor start-up)")
        ray.shutdown()
        torch.set_num_threads(1)  # as inside one actor
        os.makedirs(os.path.join(work, "breakdown"))
        parts = breakdown(GenerateConfig(model=folder, output=os.path.join(work, "breakdown"), scheduler="ddim",
                                         steps=args.steps), args.batch_size)
        total = sum(parts.values())
        print("one actor's time per clip (1 thread): " + ", ".join(
            f"{k} {v * 1000:.1f} ms ({100 * v / total:.0f}%)" for k, v in parts.items()))
        model = models.load_model(folder)
        height, width = model.image_size
        standard, extended = forward_flops(model.unet, height, width), forward_flops(model.unet, height, 4 * width)
        print(f"UNet forward per clip and step (counted): {standard / 1e9:.1f} GFLOP standard, {extended / 1e9:.1f} "
              f"GFLOP extended (4x wide); {standard * args.steps / parts['denoising'] / 1e9:.0f} GFLOP/s reached "
              "here denoising")
        figures.update({f"per_clip_ms_{k}": v * 1000 for k, v in parts.items()}, gflop_per_clip_step=standard / 1e9)
        print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
