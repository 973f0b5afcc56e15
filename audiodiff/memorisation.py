"""The memorisation check: is a clip a near-copy of a training slice? (`evaluate --training`, and
`generate`/`remix --training` after writing.)

Each clip is cut into windows one slice wide (the training data's `x_res` frames; silent ones are skipped). Two
passes over the training data on Ray Data, so its size bounds neither the driver's memory nor its time:
1. by embedding: every training slice is embedded (`slice_vectors`: the mean and spread over the slice of the
   built-in `metrics.mel_embedding`), and each block keeps, per clip window, its CANDIDATES nearest slices; the
   driver merges the blocks' short lists into the global nearest CANDIDATES (the global top-k lies in the union
   of the blocks' top-k);
2. on the spectrograms: only those candidates are decoded again, and each is compared with its window pixel by
   pixel at every time shift up to a quarter of a slice (`aligned_distance`: the mean absolute difference in dB
   over the overlap), so a copy that starts off the training slices' grid is found too.
A clip's distance is that of its best window; a clip within COPY_THRESHOLD_DB of a training slice is a copy.
Clips and training data must share one mel config (the check compares their pixels).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from audiodiff import progress, storage
from audiodiff.audio import AUDIO_EXTENSIONS, load_audio
from audiodiff.dataset import decode_images, mel_config, open_spectrograms
from audiodiff.encode import png_image
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelCodec, MelConfig, is_silent
from audiodiff.metrics import MEL_DIM, mel_embedding
from audiodiff.model_files import load_mel_config
from audiodiff.runtime import LIGHT_CPUS, worker_errors

# Mean dB apart at the best alignment: training slices remixed at strength 0.1 by the tiny model trained on the
# synthetic genres landed 2.1-2.6 dB from their source, so 2.75 flags all of them (README, "Is my model copying?").
COPY_THRESHOLD_DB = 2.75
CANDIDATES = 8  # training slices per clip window confirmed on the pixels
MAX_SHIFT_SHARE = 0.25  # of a slice: the time shifts tried between a clip window and a training slice
TRAINING_BATCH = 1024  # training slices embedded (and ranked) together


def slice_vectors(images: np.ndarray | torch.Tensor, mel: MelConfig) -> np.ndarray:
    """uint8 slices [n, y_res, x_res] -> float32 [n, 2 * MEL_DIM]: the mean and the standard deviation of each
    slice's `mel_embedding` windows, so a slice's vector hardly moves when its content shifts in time."""
    windows = mel_embedding(images, mel).reshape(len(images), -1, MEL_DIM)
    return np.concatenate([windows.mean(1), windows.std(1)], axis=1).astype(np.float32)


def aligned_distance(windows: torch.Tensor, slices: torch.Tensor, max_shift: int,
                     top_db: float) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pairs [p, y, x] -> per pair the smallest mean absolute difference in dB over the frames they share
    at a shift of -max_shift..max_shift frames (the window's frame f + shift against the slice's frame f), and
    that shift."""
    a, b = windows.float(), slices.float()
    width = a.shape[-1]
    best = torch.full((len(a),), float("inf"))
    best_shift = torch.zeros(len(a), dtype=torch.int64)
    for shift in range(-max_shift, max_shift + 1):
        d = (a[..., max(shift, 0):width + min(shift, 0)] - b[..., max(-shift, 0):width - max(shift, 0)]) \
            .abs().mean(dim=(1, 2))
        better = d < best
        best, best_shift = torch.where(better, d, best), torch.where(better, shift, best_shift)
    return (best * (top_db / 255.0)).numpy(), best_shift.numpy()


@dataclasses.dataclass
class Windows:
    """The clips cut into windows one slice wide, the silent ones left out."""

    clips: list[str]  # the clips' names
    owner: np.ndarray  # int [n]: each window's clip
    offset: np.ndarray  # int [n]: its first frame in the clip
    images: np.ndarray  # uint8 [n, y_res, x_res]


def cut_windows(clips: list[tuple[str, np.ndarray]], mel: MelConfig) -> Windows:
    """(name, uint8 image [y_res, width >= x_res]) per clip -> its windows at 0, x_res, 2 x_res ... frames (a
    last part narrower than a slice is left out)."""
    owner, offset, images = [], [], []
    for i, (name, image) in enumerate(clips):
        if image.shape[0] != mel.y_res or image.shape[1] < mel.x_res:
            raise AudiodiffError(f"{name}: a spectrogram of {image.shape[0]}x{image.shape[1]}, the training data's "
                                 f"slices are {mel.y_res}x{mel.x_res}: clips and training data must share a mel config")
        for start in range(0, image.shape[1] - mel.x_res + 1, mel.x_res):
            owner.append(i)
            offset.append(start)
            images.append(image[:, start:start + mel.x_res])
    stacked = np.stack(images) if images else np.zeros((0, mel.y_res, mel.x_res), np.uint8)
    audible = ~is_silent(torch.from_numpy(stacked)).numpy() if len(stacked) else np.zeros(0, bool)
    return Windows([name for name, _ in clips], np.array(owner, np.int64)[audible],
                   np.array(offset, np.int64)[audible], stacked[audible])


# the training data


def training_mel(training: str) -> MelConfig:
    """The mel config of a spectrogram dataset (its `mel_config.json`; teticio's hub datasets have none: diffusers'
    defaults at their images' size); refuses anything that is not a spectrogram dataset, naming it."""
    try:
        spectrograms = open_spectrograms(training)
        names = spectrograms.columns
        missing = [c for c in ("image", "audio_file", "slice") if c not in names]
        if missing:
            raise AudiodiffError(f"{training}: not a spectrogram dataset (no {', '.join(missing)} column; columns: "
                                 f"{', '.join(names)}); give the output of `audiodiff preprocess`")
        height, width = spectrograms.first_image_size()
        return mel_config(training) or MelConfig(x_res=width, y_res=height)
    except AudiodiffError as e:
        raise AudiodiffError(f"--training {e}") from None


def check_same_mel(training: str, mel: MelConfig, clips: str) -> MelConfig:
    """The training data's mel config, which must be the clips' `mel`."""
    found = training_mel(training)
    if found != mel:
        raise AudiodiffError(f"--training {training}: its mel config ({_describe(found)}) is not the clips' "
                             f"({clips}: {_describe(mel)}); the check compares spectrograms of one config: give the "
                             "training data of the model that made the clips")
    return found


def _describe(mel: MelConfig) -> str:
    return (f"{mel.y_res}x{mel.x_res}, {mel.sample_rate} Hz, n_fft {mel.n_fft}, hop {mel.hop_length}, "
            f"top_db {mel.top_db}")


def _nearest_by_embedding(batch: dict[str, np.ndarray], vectors: ray.ObjectRef, k: int, mel: MelConfig,
                          uri: str) -> dict[str, np.ndarray]:
    """One block of training slices: per clip window its k nearest slices of the block by `slice_vectors`."""
    torch.set_num_threads(1)  # several tasks share the CPUs
    queries = ray.get(vectors)
    found = slice_vectors(decode_images(batch, (mel.y_res, mel.x_res), uri)["image"], mel)
    squared = np.maximum((queries ** 2).sum(1)[:, None] + (found ** 2).sum(1)[None] - 2 * queries @ found.T, 0)
    k = min(k, len(found))
    nearest = np.argpartition(squared, k - 1, axis=1)[:, :k]
    return {"window": np.repeat(np.arange(len(queries)), k), "audio_file": batch["audio_file"][nearest].ravel(),
            "slice": batch["slice"][nearest].ravel().astype(np.int64),
            "embedding_distance": np.sqrt(np.take_along_axis(squared, nearest, 1)).ravel()}


def _aligned_with_candidates(batch: dict[str, np.ndarray], wanted: ray.ObjectRef, windows: ray.ObjectRef,
                             mel: MelConfig, uri: str) -> dict[str, np.ndarray]:
    """One block of training slices: the slices some window chose as candidates, each compared with those
    windows on the pixels (`aligned_distance`)."""
    torch.set_num_threads(1)
    wanted = ray.get(wanted)
    keys = list(zip(batch["audio_file"].tolist(), batch["slice"].tolist()))
    rows = [i for i, key in enumerate(keys) if key in wanted]
    pairs = [(window, j) for j, i in enumerate(rows) for window in wanted[keys[i]]]
    if not pairs:
        return {"window": np.zeros(0, np.int64), "audio_file": np.zeros(0, object), "slice": np.zeros(0, np.int64),
                "distance": np.zeros(0, np.float32), "shift": np.zeros(0, np.int64)}
    chosen = {name: batch[name][rows] for name in ("image", "audio_file", "slice")}
    slices = decode_images(chosen, (mel.y_res, mel.x_res), uri)["image"]
    window, row = (np.array(column, np.int64) for column in zip(*pairs))
    distance, shift = aligned_distance(torch.from_numpy(ray.get(windows)[window]), torch.from_numpy(slices[row]),
                                       int(mel.x_res * MAX_SHIFT_SHARE), mel.top_db)
    return {"window": window, "audio_file": chosen["audio_file"][row], "slice": chosen["slice"][row].astype(np.int64),
            "distance": distance, "shift": shift}


def _collect(dataset: ray.data.Dataset, name: str, total: int, unit: str) -> dict[str, np.ndarray]:
    batches = []
    with worker_errors(), progress.Progress(name, total, unit) as shown:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            batches.append(batch)
            shown.advance(1)
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]} if batches else {}


def nearest_training_slices(windows: Windows, training: str, mel: MelConfig, k: int = CANDIDATES) -> dict:
    """Per window, on the current Ray: its nearest training slice among the k nearest by embedding, at its best
    alignment: {"audio_file", "slice", "distance" (mean dB apart), "shift"} as arrays [n windows]; and "slices",
    the training slices searched."""
    data = open_spectrograms(training).read().select_columns(["image", "audio_file", "slice"])
    blocks = data.map_batches(_nearest_by_embedding, fn_args=(ray.put(slice_vectors(windows.images, mel)), k, mel,
                                                              training),
                              batch_size=TRAINING_BATCH, batch_format="numpy", num_cpus=LIGHT_CPUS)
    slices = data.count()
    found = _collect(blocks, "memorisation: embedding", -(-slices // TRAINING_BATCH), "blocks")
    # the merge: per window, its k nearest over every block's k nearest
    order = np.lexsort((found["embedding_distance"], found["window"]))
    window = found["window"][order]
    rank = np.arange(len(window)) - np.searchsorted(window, window)
    wanted: dict[tuple[str, int], list[int]] = {}
    for i in order[rank < k]:
        wanted.setdefault((found["audio_file"][i], int(found["slice"][i])), []).append(int(found["window"][i]))
    compared = data.map_batches(_aligned_with_candidates, fn_args=(ray.put(wanted), ray.put(windows.images), mel,
                                                                   training),
                                batch_size=TRAINING_BATCH, batch_format="numpy", num_cpus=LIGHT_CPUS)
    pairs = _collect(compared, "memorisation: spectrograms", -(-slices // TRAINING_BATCH), "blocks")
    best = np.lexsort((pairs["distance"], pairs["window"]))
    first = best[np.r_[True, pairs["window"][best][1:] != pairs["window"][best][:-1]]]
    return {"audio_file": pairs["audio_file"][first], "slice": pairs["slice"][first],
            "distance": pairs["distance"][first], "shift": pairs["shift"][first], "slices": slices}


def check_clips(clips: list[tuple[str, np.ndarray]], training: str, mel: MelConfig,
                threshold: float = COPY_THRESHOLD_DB) -> dict:
    """The memorisation result of clips (name, uint8 image of the training data's `mel` config): per clip its
    nearest training slice (`audio_file`, `slice`), its `distance` in mean dB at the best alignment (`offset`:
    the clip's window; `shift`: frames), and `copy`, whether within `threshold`; a clip with no audible window
    has none. `copies` counts the copies."""
    windows = cut_windows(clips, mel)
    nearest = nearest_training_slices(windows, training, mel) if len(windows.images) else {"slices": None}
    per_clip = [{"clip": name, "audio_file": None, "slice": None, "distance": None, "offset": None, "shift": None,
                 "copy": False} for name in windows.clips]
    for w in np.argsort(nearest.get("distance", np.zeros(0)))[::-1]:  # the clip's best window written last
        per_clip[windows.owner[w]].update(
            audio_file=str(nearest["audio_file"][w]), slice=int(nearest["slice"][w]),
            distance=round(float(nearest["distance"][w]), 3), offset=int(windows.offset[w]),
            shift=int(nearest["shift"][w]), copy=bool(nearest["distance"][w] <= threshold))
    return {"training": training, "threshold_db": threshold, "candidates": CANDIDATES,
            "max_shift_frames": int(mel.x_res * MAX_SHIFT_SHARE), "training_slices": nearest["slices"],
            "copies": sum(c["copy"] for c in per_clip), "clips": per_clip}


def copy_of(result: dict) -> dict[str, str]:
    """clip name -> "audio_file#slice" of the training slice it copies, for the clips that are copies."""
    return {c["clip"]: f"{c['audio_file']}#{c['slice']}" for c in result["clips"] if c["copy"]}


def summary(result: dict) -> str:
    return (f"memorisation: {result['copies']} of {len(result['clips'])} clips a near-copy of a training slice "
            f"(within {result['threshold_db']:g} dB of one of {result['training_slices']} in {result['training']})")


# the clips


def clip_images(uri: str, training: str) -> tuple[list[tuple[str, np.ndarray]], MelConfig]:
    """The clips under `uri` as (name, uint8 image) in the mel config of the `training` data, and that config: a
    generate output's PNGs (named by clip id; the inputs of audio-to-audio outputs left out), whose model must
    share it, or audio files, cut into slices by its codec (named by file)."""
    mel = training_mel(training)
    if not storage.exists(uri):
        raise AudiodiffError(f"--clips {uri}: not found")
    manifest = storage.join(uri, "manifest.parquet")
    if storage.exists(manifest):
        try:
            rows = pq.read_table(io.BytesIO(storage.read_bytes(manifest)), columns=["clip_id", "kind", "png", "model"]) \
                .to_pylist()
        except (OSError, ValueError, KeyError) as e:
            raise AudiodiffError(f"--clips {manifest}: not a generate manifest ({e})") from None
        models = {r["model"] for r in rows}
        if len(models) == 1:
            model = models.pop()
            try:
                made_with = load_mel_config(model)
            except (AudiodiffError, OSError):
                made_with = None  # unknown: the images' size is checked instead (cut_windows)
            if made_with is not None:
                check_same_mel(training, made_with, f"{uri}, made by {model}")
        return _pngs(uri, rows), mel
    files = [uri] if not storage.is_dir(uri) else storage.list_files(uri, AUDIO_EXTENSIONS)
    if not files:
        raise AudiodiffError(f"--clips {uri}: no generate manifest and no audio files")
    codec = MelCodec(mel)
    return [(f, np.concatenate(list(codec.audio_to_images(load_audio(storage.read_bytes(f), mel.sample_rate, f))
                                    .numpy()), axis=1)) for f in files], mel


def _pngs(output: str, rows: list[dict]) -> list[tuple[str, np.ndarray]]:
    """(clip id, image) of a generate output's clips (manifest rows), the inputs of audio-to-audio left out."""
    return [(r["clip_id"], png_image(storage.read_bytes(storage.join(output, *r["png"].split("/"))), r["png"]))
            for r in rows if r["kind"] != "input"]


def mark_copies(output: str, rows: list[dict], training: str, mel: MelConfig) -> tuple[list[dict], dict]:
    """A clip command's manifest rows with `copy_of` set ("audio_file#slice", else None) from the check of its
    clips under `output` against `training`; and the check's result."""
    result = check_clips(_pngs(output, rows), training, mel)
    copies = copy_of(result)
    return [{**row, "copy_of": copies.get(row["clip_id"])} for row in rows], result
