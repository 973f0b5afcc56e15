"""Remix throughput: diffusers' AudioDiffusionPipeline called once per slice, as teticio's notebook remixes a
track, against `audiodiff remix` on a local Ray.

    python benchmarks/bench_remix.py [--model tiny] [--tracks 6] [--seconds 6] [--steps 50] [--strength 0.5]

reference: per track `Mel.load_audio`, then per slice `pipe(raw_audio=..., slice=i, start_step=...,
steps=..., generator=...)` (DDIM, librosa Griffin-Lim inside), WAV written.
audiodiff: `run_remix` (DDIM, same steps and strength) over the same WAV files: decoded and sliced on CPU
actors, every slice denoised in batches, its input rendered beside it, WAV + PNG + manifest written; 1 and
2 actors, start-up included. The model is untrained (the figures do not depend on the weights).
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

from audiodiff import models
from audiodiff.remix import RemixConfig, run_remix
from audiodiff.runtime import init_ray
from audiodiff.synth import synthesize
from audiodiff.devices import cpu_name


def reference(folder: str, tracks: list[str], steps: int, strength: float, out: str) -> int:
    parts = models.load_model(folder)
    mel = Mel(**vars(parts.mel))
    pipe = AudioDiffusionPipeline(vqvae=None, unet=parts.unet, mel=mel,
                                  scheduler=DDIMScheduler.from_config(parts.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    slices = 0
    for n, track in enumerate(tracks):
        mel.load_audio(track)
        for i in range(mel.get_number_of_slices()):
            output = pipe(raw_audio=mel.audio, slice=i, start_step=round(steps * (1 - strength)), steps=steps,
                          generator=torch.Generator().manual_seed(0))
            soundfile.write(os.path.join(out, f"{n}-{i}.wav"), output.audios[0, 0], parts.mel.sample_rate)
            slices += 1
    return slices


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="a preset or model folder")
    parser.add_argument("--tracks", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each track")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-remix-")
    try:
        folder = os.path.join(work, "model")
        model = models.load_model(args.model)
        models.save_model(model, folder)
        audio = os.path.join(work, "audio")
        os.makedirs(audio)
        kinds = ("drone", "beats", "arpeggio")
        tracks = []
        for i in range(args.tracks):
            tracks.append(os.path.join(audio, f"{i}.wav"))
            soundfile.write(tracks[-1], synthesize(kinds[i % 3], args.seconds, model.mel.sample_rate, seed=i),
                            model.mel.sample_rate)
        print(f"{args.tracks} tracks of {args.seconds:g} s, model {args.model}, DDIM {args.steps} steps at strength "
              f"{args.strength:g}, {os.cpu_count()} CPUs ({cpu_name()}), torch {torch.__version__}")
        os.makedirs(os.path.join(work, "reference"))
        start = time.perf_counter()
        slices = reference(folder, tracks, args.steps, args.strength, os.path.join(work, "reference"))
        baseline = slices / (time.perf_counter() - start)
        print(f"reference (pipe() per slice, {torch.get_num_threads()} threads): {baseline:7.3f} slices/s "
              f"({slices} slices)")
        figures = {"model": args.model, "slices": slices, "steps": args.steps, "strength": args.strength,
                   "batch_size": args.batch_size, "cpu": cpu_name(), "reference_slices_per_s": baseline}
        init_ray()
        for actors in (1, 2):
            config = RemixConfig(model=folder, output=os.path.join(work, f"out-{actors}"), sources=[audio],
                                 strength=args.strength, steps=args.steps, batch_size=args.batch_size,
                                 concurrency=actors)
            start = time.perf_counter()
            result = run_remix(config)
            rate = slices / (time.perf_counter() - start)
            assert result["planned"] == 2 * slices, result  # every slice's input and its remix
            figures[f"audiodiff_{actors}_actors_slices_per_s"] = rate
            figures[f"audiodiff_{actors}_actors_over_reference"] = rate / baseline
            print(f"audiodiff, {actors} actor{'s' if actors > 1 else ' '}, batch {args.batch_size}: {rate:7.3f} slices/s "
                  f"({rate / baseline:.2f}x the reference; includes start-up and the inputs' rendering)")
        ray.shutdown()
        print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
