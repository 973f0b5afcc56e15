"""Preprocess throughput: the Ray Data job with 1 and 2 CPU workers against the notebook's path, one run.

    python benchmarks/bench_preprocess.py [--tracks 24] [--seconds 30]

notebook: one process, per track: decode (soundfile), a new torchaudio Resample to 22.05 kHz, diffusers'
Mel.audio_slice_to_image for every slice (no files written).
audiodiff: `run_preprocess` on a local Ray, all slices, PNG + parquet written, the tracks given as --repeats
sources in one job (a long job, so that the fixed start-up - actors importing torch, Ray Data planning - is a
small share; a 2-track job measures that start-up). Ray itself is started outside the timings.
Also: where one worker's time goes per track (decode, resample, mel, PNG), measured in-process.
"""

import argparse
import os
import shutil
import tempfile
import time

import ray
import soundfile
import torch
import torchaudio
from diffusers import Mel

from audiodiff import audio
from audiodiff.encode import png_bytes
from audiodiff.mel import MelCodec, MelConfig
from audiodiff.preprocess import PreprocessConfig, run_preprocess
from audiodiff.runtime import init_ray
from audiodiff.synth import write_examples


def notebook_path(files: list[str], mel: Mel) -> None:
    for path in files:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
        resampled = torchaudio.transforms.Resample(rate, mel.get_sample_rate())(torch.from_numpy(data.mean(axis=1)))
        mel.load_audio(raw_audio=resampled.numpy())
        for i in range(mel.get_number_of_slices()):
            mel.audio_slice_to_image(i)


def stage_breakdown(files: list[str], config: MelConfig) -> dict[str, float]:
    codec = MelCodec(config)
    totals = dict.fromkeys(("decode", "resample", "mel", "png"), 0.0)
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        start = time.perf_counter()
        decoded, rate = audio.decode(data, path)
        mono = audio.to_mono(decoded)
        t1 = time.perf_counter()
        resampled = audio.resample(mono, rate, config.sample_rate)
        t2 = time.perf_counter()
        images = codec.audio_to_images(resampled)
        t3 = time.perf_counter()
        for image in images:
            png_bytes(image.numpy())
        t4 = time.perf_counter()
        for key, seconds in zip(totals, (t1 - start, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += seconds / len(files)
    return totals


def main():
    work = tempfile.mkdtemp(prefix="bench-preprocess-")
    try:
        run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: str):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, default=96, help="tracks in all, mp3 and flac alternating")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=8, help="the job reads the tracks as this many sources")
    args = parser.parse_args()
    config = MelConfig()
    files = write_examples(os.path.join(work, "audio"), tracks_per_genre=max(1, args.tracks // 3),
                           seconds=args.seconds, formats=("mp3", "flac"))
    audio_seconds = len(files) * args.seconds
    print(f"{len(files)} tracks x {args.seconds:.0f} s (mp3, flac, 44.1 kHz) = {audio_seconds:.0f} s of audio, "
          f"read {args.repeats} times by the job; {os.cpu_count()} CPUs")

    mel = Mel(**vars(config))
    torch.set_num_threads(1)  # per core, as one of our workers runs
    notebook_path(files[:1], mel)  # warm-up: librosa's numba kernels
    start = time.perf_counter()
    notebook_path(files, mel)
    notebook = audio_seconds / (time.perf_counter() - start)
    print(f"notebook path (1 core):       {notebook:8.1f} audio-s/s")

    init_ray()
    audio_dir = os.path.join(work, "audio")
    warm_up = run_preprocess(PreprocessConfig(sources=[audio_dir], output=os.path.join(work, "warm-up"),
                                              limit=2, num_workers=1))
    print(f"fixed start-up (a 2-track job):  {warm_up['elapsed_seconds']:6.1f} s")
    rates = {}
    for workers in (1, 2):
        stats = run_preprocess(PreprocessConfig(sources=[audio_dir] * args.repeats,
                                                output=os.path.join(work, f"out-{workers}"), num_workers=workers))
        rates[workers] = stats["seconds_of_audio"] / stats["elapsed_seconds"]
        print(f"audiodiff, {workers} worker{'s' if workers > 1 else ' '}:        {rates[workers]:8.1f} audio-s/s  "
              f"({stats['tracks_written']} tracks, {stats['slices_written']} slices in {stats['elapsed_seconds']:.1f} s)")
    ray.shutdown()
    print(f"ratio 1 worker / notebook:    {rates[1] / notebook:8.2f}x per core")
    print(f"scaling 1 -> 2 workers:       {rates[2] / rates[1]:8.2f}x")
    per_track = stage_breakdown(files, config)
    total = sum(per_track.values())
    print("one worker's time per 30 s track: " + ", ".join(
        f"{k} {v * 1000:.1f} ms ({100 * v / total:.0f}%)" for k, v in per_track.items()))
    print(f"in-process ceiling for 1 worker: {args.seconds / total:.1f} audio-s/s; the rest of the job's time is "
          "Ray (actor start, scheduling, object transfer) and parquet writing")


if __name__ == "__main__":
    main()
