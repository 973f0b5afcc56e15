"""What generation leaves for a person: per clip a WAV and a PNG under `clips/`, `manifest.parquet` and a
gallery page, `index.html` (DESIGN.md, "Generation output"); the one place that names these files. Used by every
command that makes clips and by the fine-tune's samples.

Files are written whole; a clip counts as done once its PNG exists (the WAV is written first).
"""

from __future__ import annotations

import io
import posixpath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from audiodiff import ownership, storage
from audiodiff.encode import png_bytes, wav_bytes
from audiodiff.gallery import gallery_html

if TYPE_CHECKING:  # the codec's module imports torch, which the write tasks need not
    from audiodiff.mel import MelConfig

CLIPS_DIR = "clips"
MANIFEST = "manifest.parquet"
GALLERY = "index.html"
SETTINGS = "generation.json"  # the run's settings and the model's identity (audiodiff.clips.check_output)
MANIFEST_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("seed", pa.int64()), ("kind", pa.string()), ("frames", pa.int32()),
    ("seconds", pa.float64()), ("scheduler", pa.string()), ("steps", pa.int32()), ("model", pa.string()),
    ("wav", pa.string()), ("png", pa.string()),
    # audio-to-audio clips, null elsewhere: the input track and slice (null: the whole track), how far from it
    # (`strength`), the seconds kept at its start and end, the point between two inputs (`position`,
    # interpolation), and the files of the input as rendered beside its outputs
    ("source", pa.string()), ("slice", pa.int32()), ("strength", pa.float64()), ("keep_start", pa.float64()),
    ("keep_end", pa.float64()), ("position", pa.float64()), ("input_wav", pa.string()), ("input_png", pa.string()),
    # a conditional model's clips: the genre, or the name of the encoding from an --encodings file
    ("genre", pa.string()), ("encoding", pa.string()),
    # with --training: the training slice ("audio_file#slice") the clip is a near-copy of (audiodiff.memorisation)
    ("copy_of", pa.string()),
], metadata=ownership.SCHEMA_MARK)


PEAK_DBFS = -1.0  # saved clips are peak-normalised to this level (teticio's users found them very quiet)


def clip_files(clip_id: str) -> dict[str, str]:
    """A clip's files, relative to the output (as the manifest's `wav` and `png` columns hold them)."""
    return {"wav": f"{CLIPS_DIR}/{clip_id}.wav", "png": f"{CLIPS_DIR}/{clip_id}.png"}


def output_file(output: str, relative: str) -> str:
    """The URI of a file the manifest names (relative, with "/") under `output`."""
    return storage.join(output, *relative.split("/"))


def read_manifest(output: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, MANIFEST))))


def clip_row(clip_id: str, seed: int, kind: str, frames: int, mel: MelConfig, scheduler: str, steps: int,
             model: str, **columns) -> dict:
    """A clip's manifest row (MANIFEST_SCHEMA), its files relative to the output; `columns`: the
    audio-to-audio ones that apply, and `seconds` for a clip cut to a length shorter than its frames'."""
    unknown = set(columns) - set(MANIFEST_SCHEMA.names)
    if unknown:
        raise ValueError(f"not manifest columns: {sorted(unknown)}")
    return {"clip_id": clip_id, "seed": seed, "kind": kind, "frames": frames,
            "seconds": mel.samples_for_width(frames) / mel.sample_rate, "scheduler": scheduler, "steps": steps,
            "model": model, **clip_files(clip_id), **columns}


def encode_clip(image: np.ndarray, audio: np.ndarray, sample_rate: int, target_dbfs: float) -> tuple[bytes, bytes]:
    """(WAV, PNG) bytes of one clip; the audio peak-normalised to `target_dbfs`."""
    peak = float(np.abs(audio).max())
    if peak > 0:
        audio = audio * (10 ** (target_dbfs / 20) / peak)
    return wav_bytes(audio, sample_rate), png_bytes(image)


def write_clip(output: str, wav: str, png: str, wav_data: bytes, png_data: bytes) -> None:
    storage.write_bytes(output_file(output, wav), wav_data)
    storage.write_bytes(output_file(output, png), png_data)


class ClipSink(Datasink):
    """Encodes and writes the clips an accelerator actor returned (`wav`, `png` paths, `audio` float samples,
    `image` uint8 spectrogram, `made_on` the actor's device record), on CPU tasks of their own, so the actor
    goes on computing while clips are encoded and written. After the run, `made_on` holds the device records
    of every actor that made a clip."""

    def __init__(self, output: str, sample_rate: int, target_dbfs: float):
        self.output, self.sample_rate, self.target_dbfs = output, sample_rate, target_dbfs
        self.made_on: set[str] = set()

    def write(self, blocks, ctx) -> set[str]:
        made_on = set()
        for block in blocks:
            for row in BlockAccessor.for_block(block).iter_rows(public_row_format=True):
                wav_data, png_data = encode_clip(row["image"], row["audio"], self.sample_rate, self.target_dbfs)
                write_clip(self.output, row["wav"], row["png"], wav_data, png_data)
                made_on.add(row["made_on"])
        return made_on

    def on_write_complete(self, write_result) -> None:  # on the driver
        self.made_on = set().union(*write_result.write_returns)


def finished_clips(output: str) -> set[str]:
    clips = storage.join(output, CLIPS_DIR)
    if not storage.exists(clips):
        return set()
    files = {f"{CLIPS_DIR}/{uri.rsplit('/', 1)[-1]}" for uri in storage.list_files(clips)}
    ids = {posixpath.splitext(posixpath.basename(f))[0] for f in files}
    return {clip_id for clip_id in ids if set(clip_files(clip_id).values()) <= files}


def write_manifest_and_gallery(output: str, rows: list[dict], title: str) -> str:
    """`manifest.parquet` and `index.html` (`gallery.gallery_html`) for `rows` (MANIFEST_SCHEMA); returns the
    gallery's URI."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), buffer)
    storage.write_if_changed(storage.join(output, MANIFEST), buffer.getvalue())
    index = storage.join(output, GALLERY)
    storage.write_if_changed(index, gallery_html(title, rows).encode())
    return index

