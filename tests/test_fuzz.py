"""Damaged audio of every format (truncated, bit-flipped, spliced from two files): each file is decoded or rejected
with a reason that names it, never an other exception, and preprocess accounts for every track."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import soundfile

from audiodiff import storage
from audiodiff.audio import load_audio
from audiodiff.cli import main
from audiodiff.errors import BadAudioError
from audiodiff.synth import synthesize

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
           "mp3": ("MP3", "MPEG_LAYER_III")}


def damaged(per_format: int, seed: int = 0) -> dict[str, bytes]:
    """`per_format` damaged copies of one short track in each format, by name (`<n>-<damage>.<ext>`)."""
    rng = np.random.default_rng(seed)
    originals = {}
    for ext, (fmt, subtype) in FORMATS.items():
        buffer = io.BytesIO()
        soundfile.write(buffer, synthesize("arpeggio", 1.5, 22050, seed=1), 22050, format=fmt, subtype=subtype)
        originals[ext] = buffer.getvalue()
    files = {}
    for ext, data in originals.items():
        for n in range(per_format):
            damage = ("truncated", "bit-flipped", "spliced")[n % 3]
            if damage == "truncated":
                out = data[: rng.integers(0, len(data))]
            elif damage == "bit-flipped":
                out = bytearray(data)
                for position in rng.integers(0, len(data), size=rng.integers(1, 16)):
                    out[position] ^= 1 << rng.integers(0, 8)
            else:  # the head of this file, the tail of another (perhaps of another format)
                other = list(originals.values())[rng.integers(0, len(originals))]
                out = data[: rng.integers(0, len(data))] + other[rng.integers(0, len(other)):]
            files[f"{n:03d}-{damage}.{ext}"] = bytes(out)
    return files


def test_every_damaged_file_decodes_or_is_rejected_naming_it():
    files = damaged(per_format=75)
    decoded = rejected = 0
    for name, data in files.items():
        try:
            audio = load_audio(data, 22050, source=name)
        except BadAudioError as e:
            assert str(e).startswith(f"{name}: ") and e.reason
            rejected += 1
        else:
            assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size and np.isfinite(audio).all(), name
            decoded += 1
    assert decoded + rejected == len(files) == 300
    assert decoded and rejected  # the damage is neither all harmless nor all fatal (measured: about 70 / 230)


def test_preprocess_accounts_for_every_damaged_track(local_ray, tmp_path):
    source = tmp_path / "damaged"
    for name, data in damaged(per_format=6, seed=1).items():
        storage.write_bytes(str(source / name), data)
    assert main(["preprocess", str(source), "--output", str(tmp_path / "out"), "--model", "tiny"]) == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    written = set(pq.read_table(tmp_path / "out" / "data")["audio_file"].to_pylist()) \
        if (tmp_path / "out" / "data").exists() else set()
    assert all(r["reason"] for r in rejects)
    assert {r["source"] for r in rejects} | written == {str(source / name) for name in damaged(6, seed=1)}
    assert stats["tracks_read"] == stats["tracks_written"] + stats["tracks_rejected"] == 24
    assert (stats["tracks_written"], stats["tracks_rejected"]) == (len(written), len(rejects))
