"""Decode audio (wav, flac, ogg, mp3) with soundfile, mix to mono, resample with soxr, block by block.

soxr's HQ preset is what librosa (and so diffusers' `Mel.load_audio`) resamples with; it is 8x faster than
`torchaudio.transforms.Resample` here and rejects aliases far better (BENCHMARKS.md, "Resampling").
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import struct
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import soundfile
import soxr

from audiodiff.errors import BadAudioError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# mp3 frame counts in headers are estimates; only a clear shortfall counts as truncation
_TRUNCATION_TOLERANCE = 0.99
# frames per soundfile read: about 1.5 s at 44.1 kHz, so a worker holds a few MB of a track at a time
BLOCK_FRAMES = 1 << 16


def decode(data: bytes, source: str) -> tuple[np.ndarray, int]:
    """Encoded audio -> (float32 [samples, channels], sample rate). Raises BadAudioError naming `source`."""
    with _sound_file(io.BytesIO(data), source) as f:
        return np.concatenate(list(_checked_blocks(f, source, None))), f.samplerate


def stream_audio(data: bytes | str | os.PathLike | BinaryIO, sample_rate: int, source: str,
                 max_seconds: float | None = None, block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Encoded bytes, a local file or an open binary file -> mono float32 blocks at `sample_rate`, decoded,
    mixed and resampled (soxr's streaming resampler, the same samples as resampling the whole track) block by
    block, so a worker's memory does not grow with the track's length.

    Raises BadAudioError naming `source`: before the first block for an unreadable file, a bad header or a track
    longer than `max_seconds`; at the block where non-finite samples appear; after the last for truncation."""
    with _opened(data, source) as file, _sound_file(file, source) as f:
        resampler = (soxr.ResampleStream(f.samplerate, sample_rate, 1, dtype="float32", quality="HQ")
                     if f.samplerate != sample_rate else None)
        for block in _checked_blocks(f, source, max_seconds, block_frames):
            mono = to_mono(block)
            yield mono if resampler is None else resampler.resample_chunk(mono)
        if resampler is not None:
            yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


@contextlib.contextmanager
def _opened(data: bytes | str | os.PathLike | BinaryIO, source: str) -> Iterator[BinaryIO]:
    if isinstance(data, bytes):
        yield io.BytesIO(data)
    elif isinstance(data, (str, os.PathLike)):
        try:
            file = open(data, "rb")
        except OSError as e:
            raise BadAudioError(source, f"cannot read file ({e.strerror})") from None
        with file:
            yield file
    else:
        yield data


@contextlib.contextmanager
def _sound_file(file: BinaryIO, source: str) -> Iterator[soundfile.SoundFile]:
    if file.seek(0, io.SEEK_END) == 0:
        raise BadAudioError(source, "empty file (0 bytes)")
    if _wav_is_truncated(file):
        raise BadAudioError(source, "truncated WAV: the data chunk is shorter than its header declares")
    file.seek(0)
    try:
        sound = soundfile.SoundFile(file)
    except (soundfile.LibsndfileError, RuntimeError) as e:
        raise _undecodable(source, e) from None
    with sound:
        yield sound


def _checked_blocks(f: soundfile.SoundFile, source: str, max_seconds: float | None,
                    block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """float32 [frames, channels] blocks of an open file, checked as they come and against its header at the end."""
    limit = None if max_seconds is None else max_seconds * f.samplerate
    if limit is not None and f.frames > limit:
        raise BadAudioError(source, f"longer than --max-seconds {max_seconds:g} ({f.frames / f.samplerate:.0f} s); "
                                    "raise --max-seconds to keep it")
    decoded = 0
    while True:
        try:
            block = f.read(block_frames, dtype="float32", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as e:
            raise _undecodable(source, e) from None
        if block.shape[0] == 0:
            break
        decoded += block.shape[0]
        if limit is not None and decoded > limit:  # a header can understate the length
            raise BadAudioError(source, f"longer than --max-seconds {max_seconds:g}; raise --max-seconds to keep it")
        if not np.isfinite(block).all():
            raise BadAudioError(source, "non-finite samples (NaN or infinity)")
        yield block
    if decoded == 0:
        raise BadAudioError(source, "no audio samples")
    if decoded < f.frames * _TRUNCATION_TOLERANCE:
        raise BadAudioError(source, f"truncated: header declares {f.frames} frames, only {decoded} decode")


def _undecodable(source: str, error: Exception) -> BadAudioError:
    reason = getattr(error, "error_string", None) or str(error)
    return BadAudioError(source, f"not decodable as audio ({reason.strip()})")


def _wav_is_truncated(file: BinaryIO) -> bool:
    """libsndfile quietly shortens a WAV whose data chunk was cut off; read the chunk headers ourselves."""
    length = file.seek(0, io.SEEK_END)
    file.seek(0)
    head = file.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return False
    offset = 12
    while offset + 8 <= length:
        file.seek(offset)
        chunk = file.read(8)
        chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if chunk_id == b"data":
            # 0 and 0xFFFFFFFF mark streamed WAVs whose writer never filled in the size
            return size not in (0, 0xFFFFFFFF) and offset + 8 + size > length
        offset += 8 + size + (size & 1)
    return False


def to_mono(audio: np.ndarray) -> np.ndarray:
    """[samples, channels] -> [samples], the channels' mean (as librosa.to_mono)."""
    return audio[:, 0].copy() if audio.shape[1] == 1 else audio.mean(axis=1, dtype=np.float32)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Mono float32 audio from one sample rate to another (soxr HQ)."""
    if from_rate == to_rate:
        return audio
    return soxr.resample(audio, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(data: bytes | str | os.PathLike, sample_rate: int, source: str | None = None) -> np.ndarray:
    """Encoded bytes or a local file -> mono float32 at `sample_rate`. Raises BadAudioError naming the input."""
    source = source or (os.fspath(data) if isinstance(data, (str, os.PathLike)) else "<bytes>")
    return np.concatenate(list(stream_audio(data, sample_rate, source)))


def folder_genre(path: str) -> str:
    """A file's genre when audio is filed in a folder per genre: the name of the folder it is in."""
    return posixpath.basename(posixpath.dirname(path.replace(os.sep, "/")))
