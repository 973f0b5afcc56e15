"""Mel codec, resampling and PNG encoding: audiodiff's path against the reference path, in one run.

    python benchmarks/bench_mel.py [--device cpu|cuda] [--images 8] [--repeats 5]

forward: seconds per 30 s of 22.05 kHz audio (all slices) - MelCodec.audio_to_images vs diffusers' Mel; on CPU
  also with one thread (as a preprocess worker runs) and with the dense mel product (the accelerators' path)
  instead of the CPU's product by groups of bands
inverse: seconds per 256x256 image - MelCodec.images_to_audio (one batch) vs Mel.image_to_audio (librosa)
resample: 30 s of 44.1 kHz -> 22.05 kHz - soxr HQ (audiodiff.audio.resample) vs torchaudio's Resample
png: seconds and bytes per 256x256 spectrogram - audiodiff.encode.png_bytes vs Pillow's default PNG
The last line is one JSON object with the figures (seconds) and ratios.
"""

import argparse
import io
import json
import os
import time

import numpy as np
import torch
import torchaudio
from diffusers import Mel
from PIL import Image

from audiodiff.audio import resample
from audiodiff.encode import png_bytes, png_image
from audiodiff.mel import MelCodec, MelConfig
from audiodiff.synth import GENRES, synthesize
from audiodiff.devices import cpu_name


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


def row(figures: dict, name: str, ours: float, reference: float, unit: str, reference_name: str = "reference"):
    figures.update({f"{name}_s": ours, f"{name}_{reference_name}_s": reference, f"{name}_speedup": reference / ours})
    print(f"{name:<22} ours {ours * 1000:9.2f} ms  {reference_name} {reference * 1000:9.2f} ms  "
          f"speed-up {reference / ours:6.2f}x  ({unit})")


def pillow_default_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=8, help="batch size for our inverse")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    figures = {"cpu": cpu_name(), "torch_threads": threads, "device": args.device, "torch": torch.__version__,
               "load_average_start": os.getloadavg()[0]}
    print(f"machine: {figures['cpu']}, {threads} torch threads, device {args.device}; torch {torch.__version__}; "
          f"load average {figures['load_average_start']:.2f}")

    config = MelConfig()
    codec = MelCodec(config, device=args.device)
    reference = Mel(**vars(config))
    audio = np.concatenate([synthesize(g, 10, config.sample_rate, seed=i) for i, g in enumerate(GENRES)])

    def reference_forward():
        reference.load_audio(raw_audio=audio)
        return [reference.audio_slice_to_image(i) for i in range(reference.get_number_of_slices())]

    theirs = best_of(reference_forward, args.repeats)
    row(figures, "forward", best_of(lambda: codec.audio_to_images(audio), args.repeats), theirs, "per 30 s of audio")
    if args.device == "cpu":
        torch.set_num_threads(1)  # as in a preprocess worker: the mel product by band groups
        row(figures, "forward_1_thread", best_of(lambda: codec.audio_to_images(audio), args.repeats),
            best_of(reference_forward, args.repeats), "per 30 s of audio, one thread as in a preprocess worker")
        dense = MelCodec(config)
        dense._band_groups = None  # the product with the whole bank, as with more threads or on an accelerator
        row(figures, "forward_1_thread_band_groups", figures["forward_1_thread_s"],
            best_of(lambda: dense.audio_to_images(audio), args.repeats), "the same, against the dense mel product",
            "dense")
        torch.set_num_threads(threads)

    images = codec.audio_to_images(audio)
    batch = images[torch.arange(args.images) % images.shape[0]]
    ours = best_of(lambda: codec.images_to_audio(batch), args.repeats) / args.images
    theirs = best_of(lambda: reference.image_to_audio(Image.fromarray(images[0].numpy())), 1)
    row(figures, "inverse", ours, theirs, f"per image, ours in batches of {args.images}")

    tone = synthesize("drone", 30, 44100, seed=0)
    torch_resample = torchaudio.transforms.Resample(44100, 22050)
    row(figures, "resample", best_of(lambda: resample(tone, 44100, 22050), args.repeats),
        best_of(lambda: torch_resample(torch.from_numpy(tone)), args.repeats),
        "30 s 44.1 -> 22.05 kHz, reference = torchaudio.transforms.Resample")
    t = np.arange(44100 * 2) / 44100
    for name, fn in (("soxr HQ", lambda x: resample(x, 44100, 22050)),
                     ("torchaudio", lambda x: torch_resample(torch.from_numpy(x)).numpy())):
        alias = fn((0.5 * np.sin(2 * np.pi * 12000 * t)).astype(np.float32))[2000:-2000]
        figures[f"resample_alias_db_{name.split()[0]}"] = float(
            20 * np.log10(np.sqrt(np.mean(alias ** 2)) / 0.5 + 1e-12))
        print(f"quality    {name:<10} residual of a 12 kHz tone (above the new Nyquist): "
              f"{figures[f'resample_alias_db_{name.split()[0]}']:7.1f} dB")

    spectrograms = [image.numpy() for image in images.cpu()]
    row(figures, "png", best_of(lambda: [png_bytes(im) for im in spectrograms], args.repeats) / len(spectrograms),
        best_of(lambda: [pillow_default_png(im) for im in spectrograms], args.repeats) / len(spectrograms),
        "per 256x256 spectrogram, reference = Pillow's default PNG")
    ours, theirs = ([len(encode(im)) for im in spectrograms] for encode in (png_bytes, pillow_default_png))
    assert all(np.array_equal(png_image(png_bytes(im)), im) for im in spectrograms)  # lossless: the same pixels
    figures.update(png_bytes_per_image=float(np.mean(ours)), png_reference_bytes_per_image=float(np.mean(theirs)),
                   png_size_over_reference=sum(ours) / sum(theirs))
    print(f"png size: {np.mean(ours) / 1024:.1f} KiB against {np.mean(theirs) / 1024:.1f} KiB "
          f"({100 * (sum(ours) / sum(theirs) - 1):+.1f}%), the same pixels")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
