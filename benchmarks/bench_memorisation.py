"""What the memorisation check costs: --clips clips against a training set of --slices slices (tiny preset,
64x64), audiodiff's path (audiodiff.memorisation on Ray Data: embedding top-k per block, merged, then the
candidates confirmed on the pixels) against a brute-force reference (numpy, every clip window against every
training slice at every shift, the exact nearest), side by side in one run.

    python benchmarks/bench_memorisation.py [--slices 10000] [--clips 1000] [--reference-clips 10] [--work DIR]

The training set is synthetic (audiodiff.synth tracks, three genres, cut by the tiny codec) and written in
preprocess's layout under --work; the clips are slices of other synthetic tracks, --planted of them exact copies
of training slices. The reference path is run on --reference-clips clips and scaled to --clips (its cost is
linear in the clips); it also says how often our nearest slice is the exact nearest. Last line: one JSON object.
"""

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audiodiff import storage
from audiodiff.dataset import SLICE_SCHEMA, decode_images, open_spectrograms
from audiodiff.devices import cpu_name
from audiodiff.encode import png_bytes
from audiodiff.memorisation import COPY_THRESHOLD_DB, MAX_SHIFT_SHARE, check_clips
from audiodiff.model_files import PRESETS
from audiodiff.runtime import init_ray
from audiodiff.synth import GENRES, synthesize

MEL = PRESETS["tiny"]
SLICES_PER_TRACK = 25


def track_slices(n: int) -> np.ndarray:
    """uint8 [SLICES_PER_TRACK, 64, 64]: the slices of synthetic track `n` (genres in turn, seed n)."""
    from audiodiff.mel import MelCodec

    seconds = SLICES_PER_TRACK * MEL.slice_size / MEL.sample_rate
    return MelCodec(MEL).audio_to_images(synthesize(GENRES[n % len(GENRES)], seconds, MEL.sample_rate, seed=n)).numpy()


def synthetic_slices(count: int, first_track: int) -> tuple[np.ndarray, list[str]]:
    """`count` slices of the synthetic tracks from `first_track` on, and each slice's track name."""
    images, tracks = [], []
    for n in range(first_track, first_track + -(-count // SLICES_PER_TRACK)):
        images.append(track_slices(n))
        tracks += [f"{GENRES[n % len(GENRES)]}-{n}.wav"] * len(images[-1])
    return np.concatenate(images)[:count], tracks[:count]


def write_training(uri: str, images: np.ndarray, tracks: list[str], parts: int = 10) -> None:
    """A spectrogram dataset in preprocess's layout (mel_config.json, data/part-*.parquet, stats.json)."""
    storage.write_bytes(storage.join(uri, "mel_config.json"), MEL.to_json().encode())
    slice_of = {}
    rows = []
    for image, track in zip(images, tracks):
        slice_of[track] = slice_of.get(track, -1) + 1
        rows.append({"image": {"bytes": png_bytes(image), "path": f"{track}_{slice_of[track]}.png"},
                     "audio_file": track, "slice": slice_of[track], "genre": track.split("-")[0]})
    size = -(-len(rows) // parts)
    for p in range(parts):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows[p * size:(p + 1) * size], schema=SLICE_SCHEMA), buffer)
        storage.write_bytes(storage.join(uri, "data", f"part-{p:020x}.parquet"), buffer.getvalue())
    storage.write_bytes(storage.join(uri, "stats.json"), json.dumps({"slices_written": len(rows)}).encode())


def brute_force(clips: np.ndarray, training: str) -> tuple[np.ndarray, np.ndarray, float]:
    """The exact nearest training slice of each clip (one slice wide) by the aligned pixel distance over every
    pair and shift, in numpy, with the training set read and decoded into memory; (index, distance in dB, s)."""
    started = time.perf_counter()
    decoded = [decode_images(batch, (MEL.y_res, MEL.x_res))["image"]
               for batch in open_spectrograms(training).read().iter_batches(batch_size=1024, batch_format="numpy")]
    slices = np.concatenate(decoded).astype(np.int16)
    shift_max, width = int(MEL.x_res * MAX_SHIFT_SHARE), MEL.x_res
    nearest, distances = [], []
    for clip in clips.astype(np.int16):
        best = np.full(len(slices), np.inf)
        for shift in range(-shift_max, shift_max + 1):
            a = clip[:, max(shift, 0):width + min(shift, 0)]
            b = slices[:, :, max(-shift, 0):width - max(shift, 0)]
            best = np.minimum(best, np.abs(b - a).mean(axis=(1, 2)))
        nearest.append(int(best.argmin()))
        distances.append(float(best.min()) * MEL.top_db / 255)
    return np.array(nearest), np.array(distances), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=10_000)
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--planted", type=int, default=10, help="clips that are exact copies of training slices")
    parser.add_argument("--reference-clips", type=int, default=10)
    parser.add_argument("--work", help="where the synthetic training set goes (default: a temporary folder)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench-memorisation-")
    load_before = os.getloadavg()
    training = storage.join(work, "training")
    started = time.perf_counter()
    if not storage.exists(storage.join(training, "stats.json")):
        write_training(training, *synthetic_slices(args.slices, first_track=0))
    saved = os.path.join(work, f"clips-{args.clips}-{args.planted}.npy")
    if not os.path.exists(saved):
        planted = np.random.default_rng(0).choice(args.slices, args.planted, replace=False)
        copies = np.stack([track_slices(i // SLICES_PER_TRACK)[i % SLICES_PER_TRACK] for i in planted])
        np.save(saved, np.concatenate([copies, synthetic_slices(args.clips - args.planted, first_track=1_000_000)[0]]))
    clips = np.load(saved)
    print(f"data: {args.slices} training slices, {len(clips)} clips ({args.planted} planted copies) in "
          f"{time.perf_counter() - started:.1f} s", flush=True)

    init_ray()
    started = time.perf_counter()
    result = check_clips([(f"clip-{i:05d}", c) for i, c in enumerate(clips)], training, MEL)
    ours = time.perf_counter() - started
    found = {c["clip"] for c in result["clips"] if c["copy"]}
    planted_found = sum(f"clip-{i:05d}" in found for i in range(args.planted))
    print(f"ours: {ours:.1f} s for {len(clips)} clips against {args.slices} slices; {result['copies']} copies, "
          f"{planted_found} of {args.planted} planted", flush=True)

    sample = np.random.default_rng(1).choice(len(clips), args.reference_clips, replace=False)
    nearest, distances, reference = brute_force(clips[sample], training)
    per_1000_reference = reference / args.reference_clips * 1000
    ours_d = np.array([result["clips"][i]["distance"] for i in sample])
    agree = float(np.mean(np.abs(ours_d - distances) < 1e-3))
    # where ours is not the exact nearest, how much farther it is, and whether the copy verdict still agrees
    excess = float(np.max(ours_d - distances))
    same_verdict = float(np.mean((ours_d <= COPY_THRESHOLD_DB) == (distances <= COPY_THRESHOLD_DB)))
    load_after = os.getloadavg()
    print(f"reference (brute force, numpy): {reference:.1f} s for {args.reference_clips} clips -> "
          f"{per_1000_reference:.0f} s per 1000 clips", flush=True)
    print(f"per 1000 clips against {args.slices} slices: ours {ours / len(clips) * 1000:.1f} s, reference "
          f"{per_1000_reference:.0f} s, {per_1000_reference / (ours / len(clips) * 1000):.0f}x; our nearest is the "
          f"exact nearest for {agree:.0%} of the sampled clips (at most {excess:.2f} dB farther), the same copy "
          f"verdict for {same_verdict:.0%}", flush=True)
    print(json.dumps({"cpu": cpu_name(), "slices": args.slices, "clips": len(clips),
                      "ours_s": round(ours, 2), "ours_s_per_1000_clips": round(ours / len(clips) * 1000, 2),
                      "reference_s_per_1000_clips": round(per_1000_reference, 1),
                      "speedup": round(per_1000_reference / (ours / len(clips) * 1000), 1),
                      "exact_nearest_share": agree, "max_excess_db": round(excess, 3),
                      "same_verdict_share": same_verdict, "copies": result["copies"], "planted_found": planted_found,
                      "planted": args.planted, "load_before": [round(x, 2) for x in load_before],
                      "load_after": [round(x, 2) for x in load_after]}))


if __name__ == "__main__":
    main()
