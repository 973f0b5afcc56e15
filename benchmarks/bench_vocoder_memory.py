"""Peak memory of vocoding one long clip: whole-width Griffin-Lim (before, `MelCodec._vocode`) against the
windowed path (`MelCodec.images_to_audio`), for a 1-minute and a 10-minute clip, side by side.

    python benchmarks/bench_vocoder_memory.py [--minutes 1 10] [--n-iter 4] [--batch 1]

Each case runs in a fresh process (so that one case's freed memory does not hide the next one's peak) and
reports its peak resident memory (`ru_maxrss`) less its resident memory just before the call: what vocoding
itself cost. The memory does not depend on the Griffin-Lim iteration count past the first, so the default of 4
iterations (not the config's 32) only saves time. diffusers' default mel config (256x256, 22050 Hz, hop 512).
The last line is one JSON object with the figures (MiB) and ratios.
"""

import argparse
import json
import multiprocessing
import resource
import time

import numpy as np
import torch

from audiodiff.mel import MelCodec, MelConfig
from audiodiff.devices import cpu_name


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def vocode(minutes: float, windowed: bool, n_iter: int, batch: int, queue) -> None:
    torch.set_num_threads(1)
    config = MelConfig(n_iter=n_iter)
    codec = MelCodec(config)
    width = config.width_for_seconds(minutes * 60)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, config.y_res, width), np.uint8))
    codec.images_to_audio(images[..., :config.x_res])  # warm-up: FFT plans, allocator pools
    before = rss_mib()
    start = time.perf_counter()
    audio = codec.images_to_audio(images) if windowed else codec._vocode(images)[0]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queue.put({"frames": width, "seconds": seconds, "peak_mib": peak, "vocoding_mib": peak - before,
               "audio_mib": audio.numel() * 4 / 2 ** 20})


def measure(minutes: float, windowed: bool, n_iter: int, batch: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=vocode, args=(minutes, windowed, n_iter, batch, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10])
    parser.add_argument("--n-iter", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print(f"{cpu_name()}, torch {torch.__version__} (1 thread), batch {args.batch}, {args.n_iter} Griffin-Lim "
          f"iterations, vocoder window {MelCodec(MelConfig()).vocoder_window} frames")
    figures = {}
    for minutes in args.minutes:
        before, after = (measure(minutes, windowed, args.n_iter, args.batch) for windowed in (False, True))
        key = f"{minutes:g}min"
        figures.update({f"{key}_whole_mib": before["vocoding_mib"], f"{key}_windowed_mib": after["vocoding_mib"],
                        f"{key}_audio_mib": after["audio_mib"], f"{key}_whole_s": before["seconds"],
                        f"{key}_windowed_s": after["seconds"],
                        f"{key}_ratio": before["vocoding_mib"] / max(after["vocoding_mib"], 1e-9)})
        print(f"{minutes:g} min ({after['frames']} frames): whole width {before['vocoding_mib']:8.1f} MiB "
              f"in {before['seconds']:6.1f} s; windowed {after['vocoding_mib']:7.1f} MiB in {after['seconds']:6.1f} s "
              f"(of which the returned audio {after['audio_mib']:.1f} MiB); {figures[f'{key}_ratio']:.1f}x less")
    if len(args.minutes) > 1:
        first, last = (f"{m:g}min" for m in (args.minutes[0], args.minutes[-1]))
        for path in ("whole", "windowed"):
            figures[f"{path}_growth"] = figures[f"{last}_{path}_mib"] / max(figures[f"{first}_{path}_mib"], 1e-9)
        print(f"from {args.minutes[0]:g} to {args.minutes[-1]:g} min: whole width grows "
              f"{figures['whole_growth']:.1f}x, windowed {figures['windowed_growth']:.1f}x")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
