"""Mel codec and resampling: audiodiff's path against the reference path, in one run.

    python benchmarks/bench_mel.py [--device cpu|cuda] [--images 8]

forward: seconds per 30 s of 22.05 kHz audio (all slices) - MelCodec.audio_to_images vs diffusers' Mel
inverse: seconds per 256x256 image - MelCodec.images_to_audio (one batch) vs Mel.image_to_audio (librosa)
resample: 30 s of 44.1 kHz -> 22.05 kHz - soxr HQ (audiodiff.audio.resample) vs torchaudio's Resample
"""

import argparse
import platform
import time

import numpy as np
import torch
import torchaudio
from diffusers import Mel
from PIL import Image

from audiodiff.audio import resample
from audiodiff.mel import MelCodec, MelConfig
from audiodiff.synth import GENRES, synthesize


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: librosa's numba kernels, torch's FFT plans, CUDA context
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def row(name: str, ours: float, reference: float, unit: str):
    print(f"{name:<10} ours {ours * 1000:9.1f} ms  reference {reference * 1000:9.1f} ms  "
          f"speed-up {reference / ours:6.1f}x  ({unit})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=8, help="batch size for our inverse")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {args.device}; torch {torch.__version__}")

    config = MelConfig()
    codec = MelCodec(config, device=args.device)
    reference = Mel(**vars(config))
    audio = np.concatenate([synthesize(g, 10, config.sample_rate, seed=i) for i, g in enumerate(GENRES)])

    def reference_forward():
        reference.load_audio(raw_audio=audio)
        return [reference.audio_slice_to_image(i) for i in range(reference.get_number_of_slices())]

    row("forward", best_of(lambda: codec.audio_to_images(audio), args.repeats),
        best_of(reference_forward, args.repeats), "per 30 s of audio")

    images = codec.audio_to_images(audio)
    batch = images[torch.arange(args.images) % images.shape[0]]
    ours = best_of(lambda: codec.images_to_audio(batch), args.repeats) / args.images
    theirs = best_of(lambda: reference.image_to_audio(Image.fromarray(images[0].numpy())), 1)
    row("inverse", ours, theirs, f"per image, ours in batches of {args.images}")

    tone = synthesize("drone", 30, 44100, seed=0)
    torch_resample = torchaudio.transforms.Resample(44100, 22050)
    row("resample", best_of(lambda: resample(tone, 44100, 22050), args.repeats),
        best_of(lambda: torch_resample(torch.from_numpy(tone)), args.repeats),
        "30 s 44.1 -> 22.05 kHz, reference = torchaudio.transforms.Resample")
    t = np.arange(44100 * 2) / 44100
    for name, fn in (("soxr HQ", lambda x: resample(x, 44100, 22050)),
                     ("torchaudio", lambda x: torch_resample(torch.from_numpy(x)).numpy())):
        alias = fn((0.5 * np.sin(2 * np.pi * 12000 * t)).astype(np.float32))[2000:-2000]
        print(f"quality    {name:<10} residual of a 12 kHz tone (above the new Nyquist): "
              f"{20 * np.log10(np.sqrt(np.mean(alias ** 2)) / 0.5 + 1e-12):7.1f} dB")


if __name__ == "__main__":
    main()
