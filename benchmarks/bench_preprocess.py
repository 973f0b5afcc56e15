"""Preprocess throughput: the Ray Data job with 1 and 2 CPU workers against the notebook's path, one run.

    python benchmarks/bench_preprocess.py [--tracks 96] [--seconds 30] [--repeats 8]

notebook: one process on one core (torch and BLAS held to one thread), per track: decode (soundfile), a new
torchaudio Resample to 22.05 kHz, diffusers' Mel.audio_slice_to_image for every slice (no files written);
measured before and after the jobs, and the faster run kept.
audiodiff: `run_preprocess` on a local Ray, all slices, PNG + parquet written, the tracks given as --repeats
sources in one job (a long job, so that the fixed start-up - actors importing torch, Ray Data planning - is a
small share; a 2-track job measures that start-up). Ray itself is started outside the timings.

Per core, two ways. Wall clock: the job with 1 worker against the notebook on one core (Ray's own processes
may use the other cores). CPU time: audio seconds per CPU second of every process of the local Ray (workers,
driver, raylet, GCS, dashboard), sampled every 0.2 s, against the notebook process's; stricter (Ray's share
counts), and it holds roughly on a machine that other users load, where wall-clock figures do not: the load
average is printed with the figures. Also: where one worker's time goes per track (decode, resample, mel, PNG),
in-process (CPU time, best of 3 passes), and where the job's CPU time goes, by kind of Ray process.
The last line is one JSON object with the figures and ratios.
"""

import argparse
import collections
import json
import os
import re
import shutil
import tempfile
import threading
import time

import psutil
import ray
import soundfile
import torch
import torchaudio
from diffusers import Mel
from threadpoolctl import threadpool_limits

from audiodiff import audio
from audiodiff.encode import png_bytes
from audiodiff.mel import MelCodec, MelConfig
from audiodiff.preprocess import PreprocessConfig, run_preprocess
from audiodiff.runtime import init_ray
from audiodiff.synth import write_examples
from audiodiff.devices import cpu_name


def notebook_path(files: list[str], mel: Mel) -> None:
    for path in files:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
        resampled = torchaudio.transforms.Resample(rate, mel.get_sample_rate())(torch.from_numpy(data.mean(axis=1)))
        mel.load_audio(raw_audio=resampled.numpy())
        for i in range(mel.get_number_of_slices()):
            mel.audio_slice_to_image(i)


def notebook_rates(files: list[str], mel: Mel, audio_seconds: float) -> tuple[float, float]:
    """(audio seconds per second, per CPU second) of the notebook's path on one core."""
    with threadpool_limits(1):  # librosa's products would otherwise use every core's BLAS thread
        start, cpu = time.perf_counter(), time.process_time()
        notebook_path(files, mel)
        return audio_seconds / (time.perf_counter() - start), audio_seconds / (time.process_time() - cpu)


def stage_breakdown(files: list[str], config: MelConfig, passes: int = 3) -> dict[str, float]:
    """Seconds per track of each stage of a worker's work, in one process on one thread: CPU time, the best of
    `passes` passes over the files."""
    codec = MelCodec(config)
    encoded = []
    for path in files:
        with open(path, "rb") as f:
            encoded.append((path, f.read()))
    best = dict.fromkeys(("decode", "resample", "mel", "png"), float("inf"))
    for _ in range(passes):
        totals = dict.fromkeys(best, 0.0)
        for path, data in encoded:
            start = time.process_time()
            decoded, rate = audio.decode(data, path)
            mono = audio.to_mono(decoded)
            t1 = time.process_time()
            resampled = audio.resample(mono, rate, config.sample_rate)
            t2 = time.process_time()
            images = codec.audio_to_images(resampled)
            t3 = time.process_time()
            for image in images:
                png_bytes(image.numpy())
            t4 = time.process_time()
            for key, seconds in zip(totals, (t1 - start, t2 - t1, t3 - t2, t4 - t3)):
                totals[key] += seconds / len(files)
        best = {key: min(best[key], totals[key]) for key in best}
    return best


class RayCpuMeter:
    """CPU seconds used by this process and every process under it (a local Ray: its workers, raylet, GCS,
    dashboard) while the meter runs, by kind of process, less the meter's own. Sampled every `interval` s: a
    worker that exits between two samples loses at most that much of its time."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.seconds = collections.Counter()
        self._last, self._kind = {}, {}
        self._stop = threading.Event()

    @staticmethod
    def _kind_of(process: psutil.Process) -> str:
        if process.pid == os.getpid():
            return "driver"
        name = " ".join(process.cmdline()[:1])
        if "SpectrogramMaker" in name:
            return "spectrogram actors"
        if re.match(r"ray::\w*Write", name):
            return "write tasks"
        if "IDLE" in name or "default_worker.py" in " ".join(process.cmdline()):
            return "idle or starting workers"
        return "Ray's own processes"  # raylet, GCS, dashboard and agents, Ray Data's helper actors

    def _sample(self, first: bool = False) -> None:
        me = psutil.Process()
        for process in [me, *me.children(recursive=True)]:
            try:
                key = (process.pid, process.create_time())
                times = process.cpu_times()
                kind = self._kind_of(process)
            except psutil.Error:
                continue
            if kind == "idle or starting workers" and key in self._kind:
                kind = self._kind[key]  # what it did since the last sample, if it was at work then
            if not first:
                self.seconds[kind] += times.user + times.system - self._last.get(key, 0.0)
            self._last[key], self._kind[key] = times.user + times.system, kind

    def __enter__(self):
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
        self._own_seconds = time.thread_time()  # this thread's CPU time: the meter's, not the driver's

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds["driver"] -= self._own_seconds



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
    figures = {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__, "tracks": len(files),
               "seconds_per_track": args.seconds, "repeats": args.repeats, "load_average_start": os.getloadavg()[0]}
    print(f"{len(files)} tracks x {args.seconds:.0f} s (mp3, flac, 44.1 kHz) = {audio_seconds:.0f} s of audio, "
          f"read {args.repeats} times by the job; {os.cpu_count()} CPUs ({figures['cpu']}), "
          f"load average {figures['load_average_start']:.2f} at the start")

    mel = Mel(**vars(config))
    torch.set_num_threads(1)  # per core, as one of our workers runs
    notebook_path(files[:1], mel)  # warm-up: librosa's numba kernels
    notebook = [notebook_rates(files, mel, audio_seconds)]
    print(f"notebook path (1 core):          {notebook[0][0]:8.1f} audio-s/s, {notebook[0][1]:8.1f} per CPU second")

    init_ray()
    audio_dir = os.path.join(work, "audio")
    warm_up = run_preprocess(PreprocessConfig(sources=[audio_dir], output=os.path.join(work, "warm-up"),
                                              limit=2, num_workers=1))
    figures["startup_s"] = warm_up["elapsed_seconds"]
    print(f"fixed start-up (a 2-track job):  {warm_up['elapsed_seconds']:8.1f} s")
    for workers in (1, 2):
        with RayCpuMeter() as meter:
            stats = run_preprocess(PreprocessConfig(sources=[audio_dir] * args.repeats,
                                                    output=os.path.join(work, f"out-{workers}"), num_workers=workers))
        rate = figures[f"job_{workers}_workers_audio_s_per_s"] = stats["seconds_of_audio"] / stats["elapsed_seconds"]
        per_cpu = figures[f"job_{workers}_workers_audio_s_per_cpu_s"] = (stats["seconds_of_audio"]
                                                                         / sum(meter.seconds.values()))
        figures[f"job_{workers}_workers_cpu_share"] = {k: v / sum(meter.seconds.values())
                                                       for k, v in meter.seconds.most_common()}
        print(f"audiodiff, {workers} worker{'s' if workers > 1 else ' '}:            {rate:8.1f} audio-s/s, {per_cpu:8.1f} per "
              f"CPU second ({stats['tracks_written']} tracks, {stats['slices_written']} slices in "
              f"{stats['elapsed_seconds']:.1f} s)")
        print("  CPU time by process: " + ", ".join(f"{kind} {seconds:.1f} s ({100 * figures[f'job_{workers}_workers_cpu_share'][kind]:.0f}%)"
                                                   for kind, seconds in meter.seconds.most_common()))
    ray.shutdown()
    notebook.append(notebook_rates(files, mel, audio_seconds))
    print(f"notebook path, again:            {notebook[1][0]:8.1f} audio-s/s, {notebook[1][1]:8.1f} per CPU second")
    figures["notebook_audio_s_per_s"] = max(wall for wall, _ in notebook)
    figures["notebook_audio_s_per_cpu_s"] = max(cpu for _, cpu in notebook)
    per_track = stage_breakdown(files, config)
    total = sum(per_track.values())
    figures.update({f"per_track_ms_{k}": v * 1000 for k, v in per_track.items()})
    figures["in_process_audio_s_per_s"] = args.seconds / total
    figures["load_average_end"] = os.getloadavg()[0]
    figures.update({
        "job_1_worker_over_notebook": figures["job_1_workers_audio_s_per_s"] / figures["notebook_audio_s_per_s"],
        "job_1_worker_over_notebook_cpu_time": (figures["job_1_workers_audio_s_per_cpu_s"]
                                                / figures["notebook_audio_s_per_cpu_s"]),
        "two_workers_over_one": figures["job_2_workers_audio_s_per_s"] / figures["job_1_workers_audio_s_per_s"],
        "job_1_worker_over_in_process": figures["job_1_workers_audio_s_per_s"] / figures["in_process_audio_s_per_s"],
    })
    print(f"ratio 1 worker / notebook:       {figures['job_1_worker_over_notebook']:8.2f}x per core (wall clock), "
          f"{figures['job_1_worker_over_notebook_cpu_time']:.2f}x per CPU second (every Ray process counted)")
    print(f"scaling 1 -> 2 workers:          {figures['two_workers_over_one']:8.2f}x")
    print(f"one worker's CPU time per {args.seconds:.0f} s track: " + ", ".join(
        f"{k} {v * 1000:.1f} ms ({100 * v / total:.0f}%)" for k, v in per_track.items()))
    print(f"in-process ceiling for 1 worker: {figures['in_process_audio_s_per_s']:8.1f} audio-s/s; the job reaches "
          f"{100 * figures['job_1_worker_over_in_process']:.0f}% of it (the rest: Ray's actor start, scheduling, "
          f"object transfer, and parquet writing); load average {figures['load_average_end']:.2f} at the end")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
