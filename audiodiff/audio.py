"""Decode audio (wav, flac, ogg, mp3) with soundfile, mix to mono, resample with soxr.

soxr's HQ preset is what librosa (and so diffusers' `Mel.load_audio`) resamples with; it is 8x faster than
`torchaudio.transforms.Resample` here and rejects aliases far better (BENCHMARKS.md, "Resampling").
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import soundfile
import soxr

from audiodiff.errors import BadAudioError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# mp3 frame counts in headers are estimates; only a clear shortfall counts as truncation
_TRUNCATION_TOLERANCE = 0.99


def decode(data: bytes, source: str) -> tuple[np.ndarray, int]:
    """Encoded audio -> (float32 [samples, channels], sample rate). Raises BadAudioError naming `source`."""
    if len(data) == 0:
        raise BadAudioError(source, "empty file (0 bytes)")
    if _wav_is_truncated(data):
        raise BadAudioError(source, "truncated WAV: the data chunk is shorter than its header declares")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            declared = f.frames
            audio = f.read(dtype="float32", always_2d=True)
            sample_rate = f.samplerate
    except (soundfile.LibsndfileError, RuntimeError) as e:
        reason = getattr(e, "error_string", None) or str(e)
        raise BadAudioError(source, f"not decodable as audio ({reason.strip()})") from None
    if audio.shape[0] == 0:
        raise BadAudioError(source, "no audio samples")
    if 0 < audio.shape[0] < declared * _TRUNCATION_TOLERANCE:
        raise BadAudioError(source, f"truncated: header declares {declared} frames, only {audio.shape[0]} decode")
    if not np.isfinite(audio).all():
        raise BadAudioError(source, "non-finite samples (NaN or infinity)")
    return audio, sample_rate


def _wav_is_truncated(data: bytes) -> bool:
    """libsndfile quietly shortens a WAV whose data chunk was cut off; read the chunk headers ourselves."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return False
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset:offset + 4], struct.unpack("<I", data[offset + 4:offset + 8])[0]
        if chunk_id == b"data":
            # 0 and 0xFFFFFFFF mark streamed WAVs whose writer never filled in the size
            return size not in (0, 0xFFFFFFFF) and offset + 8 + size > len(data)
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
    if not isinstance(data, bytes):
        source = source or os.fspath(data)
        try:
            with open(data, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadAudioError(source, f"cannot read file ({e.strerror})") from None
    audio, rate = decode(data, source or "<bytes>")
    return resample(to_mono(audio), rate, sample_rate)
