"""Damaged audio of every format (truncated, bit-flipped, spliced from two files): each file is decoded or rejected
with a reason that names it, never an other exception, and preprocess accounts for every track."""

import io
import json
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from PIL import Image

from audiodiff import storage
from audiodiff.audio import load_audio
from audiodiff.cli import main
from audiodiff.dataset import decode_images
from audiodiff.encode import png_image
from audiodiff.errors import BadAudioError, BadImageError
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
            # spliced onto the tail of another file, perhaps of another format
            damage, out = damage_bytes(data, n, rng, 16, lambda: list(originals.values())[rng.integers(0, len(originals))])
            files[f"{n:03d}-{damage}.{ext}"] = out
    return files


def damage_bytes(data: bytes, n: int, rng, most_flips: int, other) -> tuple[str, bytes]:
    """The nth damage of `data` (its name, its bytes): truncated, bit-flipped, or its head spliced onto the tail of
    `other()`."""
    damage = ("truncated", "bit-flipped", "spliced")[n % 3]
    if damage == "truncated":
        return damage, data[: rng.integers(0, len(data))]
    if damage == "bit-flipped":
        out = bytearray(data)
        for position in rng.integers(0, len(data), size=rng.integers(1, most_flips)):
            out[position] ^= 1 << rng.integers(0, 8)
        return damage, bytes(out)
    tail = other()
    return damage, data[: rng.integers(0, len(data))] + tail[rng.integers(0, len(tail)):]


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


def test_every_damaged_ffmpeg_file_decodes_or_is_rejected_naming_it():
    from test_audio import _ffmpeg_encoded

    rng = np.random.default_rng(3)
    originals = {"m4a": _ffmpeg_encoded("ipod", "aac"), "webm": _ffmpeg_encoded("webm", "libopus")}
    outcomes = []
    for ext, data in originals.items():
        for n in range(60):
            out = bytearray(data)
            if n % 2:
                out = out[: rng.integers(0, len(out))]
            else:
                for position in rng.integers(0, len(out), size=rng.integers(1, 16)):
                    out[position] ^= 1 << rng.integers(0, 8)
            name = f"{n:03d}.{ext}"
            try:
                audio = load_audio(bytes(out), 22050, source=name)
            except BadAudioError as e:
                assert str(e).startswith(f"{name}: ") and e.reason
                outcomes.append(False)
            else:
                assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all(), name
                assert len(audio) < 2 * 22050, name  # never more than the file held
                outcomes.append(True)
    assert any(outcomes) and not all(outcomes)


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


# damaged spectrogram images


def _png(image: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).convert(mode or "L").save(buffer, format="PNG")
    return buffer.getvalue()


def _with_header_size(png: bytes, height: int, width: int) -> bytes:
    """A PNG whose IHDR (CRC fixed up) claims another size: a few hundred bytes that say gigapixels."""
    ihdr = bytearray(png[12:29])  # chunk type + 13 bytes of data
    struct.pack_into(">II", ihdr, 4, width, height)
    return png[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def damaged_pngs(count: int, seed: int = 0) -> dict[str, bytes]:
    """`count` damaged 64x64 spectrogram PNGs (truncated, bit-flipped, spliced), plus the hand-made cases."""
    rng = np.random.default_rng(seed)
    original = _png(rng.integers(0, 256, (64, 64), dtype=np.uint8))
    files = {}
    for n in range(count):
        damage, out = damage_bytes(original, n, rng, 8, lambda: _png(rng.integers(0, 256, (64, 128), dtype=np.uint8)))
        files[f"{n:03d}-{damage}.png"] = out
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(jpeg, format="JPEG")
    files.update({"bomb-9500.png": _with_header_size(original, 9500, 9500),  # 462 MiB once decoded
                  "bomb-100k.png": _with_header_size(original, 100_000, 100_000),  # over Pillow's own limit
                  "wrong-size.png": _png(np.zeros((64, 128), np.uint8)), "jpeg.png": jpeg.getvalue(),
                  "float-mode.png": _with_header_size(original, 64, 64)[:24] + b"\x10\x00" + original[26:],
                  "rgba.png": _png(np.zeros((64, 64), np.uint8), "RGBA"), "empty.png": b""})
    return files


def test_every_damaged_png_decodes_to_its_size_or_is_rejected_naming_it():
    files = damaged_pngs(150)
    decoded = rejected = 0
    for name, data in files.items():
        try:
            image = png_image(data, name, (64, 64))
        except BadImageError as e:
            assert str(e).startswith(f"{name}: ") and "\n" not in str(e), str(e)
            rejected += 1
        else:
            assert image.dtype == np.uint8 and image.shape == (64, 64), name
            decoded += 1
    assert decoded + rejected == len(files)
    assert decoded and rejected
    for name in ("bomb-9500.png", "bomb-100k.png", "wrong-size.png", "jpeg.png", "empty.png"):
        with pytest.raises(BadImageError, match=f"^{name}: "):
            png_image(files[name], name, (64, 64))
    with pytest.raises(BadImageError, match="image is 9500x9500, larger than any spectrogram"):
        png_image(files["bomb-9500.png"], "bomb.png")  # no size expected: the largest a mel config allows


def test_a_damaged_image_in_a_batch_names_the_dataset_and_the_row():
    good = _png(np.zeros((64, 64), np.uint8))
    bomb = damaged_pngs(0)["bomb-9500.png"]
    batch = {"image": [{"bytes": good, "path": "a_0.png"}, {"bytes": bomb, "path": "b_3.png"}],
             "audio_file": ["a.wav", "b.wav"], "slice": [0, 3]}
    with pytest.raises(BadImageError, match=r"^data/spec: b.wav#3: image is 9500x9500, expected 64x64"):
        decode_images(batch, (64, 64), "data/spec")


def _spectrogram_dataset(folder, parts: list[list[bytes]]) -> None:
    """A dataset of the tiny model's mel config written directly (no preprocess): one parquet part per list."""
    from audiodiff.dataset import SLICE_SCHEMA
    from audiodiff.model_files import load_mel_config

    (folder / "data").mkdir(parents=True)
    (folder / "mel_config.json").write_text(load_mel_config("tiny").to_json())
    for i, pngs in enumerate(parts):
        rows = [{"image": {"bytes": png, "path": f"t{i}_{j}.png"}, "audio_file": f"t{i}.wav", "slice": j, "genre": None}
                for j, png in enumerate(pngs)]
        pq.write_table(pa.Table.from_pylist(rows, schema=SLICE_SCHEMA), folder / "data" / f"part-{i}.parquet")
    (folder / "stats.json").write_text("{}")


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
def test_a_later_damaged_image_ends_a_finetune_with_one_line_naming_it(local_ray, tmp_path, capsys, stream):
    rng = np.random.default_rng(2)
    good = [_png(rng.integers(0, 256, (64, 64), dtype=np.uint8)) for _ in range(24)]
    bad = damaged_pngs(0)["wrong-size.png"]
    _spectrogram_dataset(tmp_path / "spec", [good[:12], good[12:] + [bad] * 4])
    args = ["finetune", "--data", str(tmp_path / "spec"), "--model", "tiny", "--output", str(tmp_path / "out"),
            "--num-workers", "1", "--batch-size", "4", "--epochs", "1", "--num-samples", "1", "--sample-steps", "1"]
    assert main(args + (["--stream"] if stream else [])) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # Ray logs its workers' tracebacks above it
    assert last.startswith(f"audiodiff finetune: error: {tmp_path / 'spec'}: t1.wav#"), last
    assert last.endswith("image is 64x128, expected 64x64 (height x width)"), last
