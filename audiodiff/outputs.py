"""What generation leaves for a person: per clip a WAV and a PNG under `clips/`, `manifest.parquet` and a
gallery page, `index.html` (DESIGN.md, "Generation output"). Used by generate and by the fine-tune's samples.

Files are written whole; a clip counts as done once its PNG exists (the WAV is written first).
"""

from __future__ import annotations

import html
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import Datasink

from audiodiff import storage
from audiodiff.encode import png_bytes, wav_bytes
from audiodiff.mel import MelConfig

CLIPS_DIR = "clips"
MANIFEST_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("seed", pa.int64()), ("kind", pa.string()), ("frames", pa.int32()),
    ("seconds", pa.float64()), ("scheduler", pa.string()), ("steps", pa.int32()), ("model", pa.string()),
    ("wav", pa.string()), ("png", pa.string()),
])


PEAK_DBFS = -1.0  # saved clips are peak-normalised to this level (teticio's users found them very quiet)


def clip_row(clip_id: str, seed: int, kind: str, frames: int, mel: MelConfig, scheduler: str, steps: int,
             model: str) -> dict:
    """A clip's manifest row (MANIFEST_SCHEMA), its files relative to the output."""
    return {"clip_id": clip_id, "seed": seed, "kind": kind, "frames": frames,
            "seconds": mel.samples_for_width(frames) / mel.sample_rate, "scheduler": scheduler, "steps": steps,
            "model": model, "wav": f"{CLIPS_DIR}/{clip_id}.wav", "png": f"{CLIPS_DIR}/{clip_id}.png"}


def encode_clip(image: np.ndarray, audio: np.ndarray, sample_rate: int, target_dbfs: float) -> tuple[bytes, bytes]:
    """(WAV, PNG) bytes of one clip; the audio peak-normalised to `target_dbfs`."""
    peak = float(np.abs(audio).max())
    if peak > 0:
        audio = audio * (10 ** (target_dbfs / 20) / peak)
    return wav_bytes(audio, sample_rate), png_bytes(image)


def write_clip(output: str, wav: str, png: str, wav_data: bytes, png_data: bytes) -> None:
    storage.write_bytes(storage.join(output, wav), wav_data)
    storage.write_bytes(storage.join(output, png), png_data)


class ClipSink(Datasink):
    """Writes the clips an accelerator actor returned (`wav`, `png` paths and `wav_bytes`, `png_bytes`), on
    CPU tasks of their own, so the actor goes on computing while files are written."""

    def __init__(self, output: str):
        self.output = output

    def write(self, blocks, ctx) -> int:
        written = 0
        for block in blocks:
            for row in block.to_pylist():
                write_clip(self.output, row["wav"], row["png"], row["wav_bytes"], row["png_bytes"])
                written += 1
        return written


def finished_clips(output: str) -> set[str]:
    clips = storage.join(output, CLIPS_DIR)
    if not storage.exists(clips):
        return set()
    names = {uri.rsplit("/", 1)[-1] for uri in storage.list_files(clips)}
    return {name[:-4] for name in names if name.endswith(".png") and f"{name[:-4]}.wav" in names}


def write_if_changed(uri: str, data: bytes) -> None:
    """A re-run that changes nothing leaves the file (and its modification time) alone."""
    if not (storage.exists(uri) and storage.read_bytes(uri) == data):
        storage.write_bytes(uri, data)


def write_manifest_and_gallery(output: str, rows: list[dict], title: str) -> str:
    """`manifest.parquet` and `index.html` (clips grouped by kind) for `rows` (MANIFEST_SCHEMA); returns the
    gallery's URI."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), buffer)
    write_if_changed(storage.join(output, "manifest.parquet"), buffer.getvalue())
    index = storage.join(output, "index.html")
    sections = {f"{kind} clips": [r for r in rows if r["kind"] == kind] for kind in dict.fromkeys(r["kind"] for r in rows)}
    write_if_changed(index, gallery_html(title, sections).encode())
    return index


def gallery_html(title: str, sections: dict[str, list[dict]]) -> str:
    """A page of clips under headings; each row's `wav` and `png` are paths relative to the page."""
    body = "\n".join(f"<h2>{html.escape(heading)}</h2>\n" + "\n".join(_figure(r) for r in rows)
                     for heading, rows in sections.items())
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n"
            "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em;"
            "vertical-align:top}img{display:block;image-rendering:pixelated;height:256px;max-width:90vw}"
            "audio{display:block;width:100%}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _figure(row: dict) -> str:
    clip = html.escape(row["clip_id"])
    return (f'<figure><figcaption>{clip} · {row["seconds"]:.2f} s · seed {row["seed"]}</figcaption>'
            f'<img src="{html.escape(row["png"])}" alt="spectrogram of {clip}">'
            f'<audio controls preload="none" src="{html.escape(row["wav"])}"></audio></figure>')
