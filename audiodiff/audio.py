"""Decode audio with soundfile (every format the bundled libsndfile reads) or PyAV (AAC/M4A, WMA, the audio of
MP4/WebM/Matroska: FFmpeg, bundled in PyAV's wheels), mix to mono, resample with soxr, block by block.

soxr's HQ preset is what librosa (and so diffusers' `Mel.load_audio`) resamples with; it is 8x faster than
`torchaudio.transforms.Resample` here and rejects aliases far better (BENCHMARKS.md, "Resampling").

What one file can cost is bounded before anything is allocated: its sample rate (MIN_SAMPLE_RATE to
MAX_SAMPLE_RATE), its channels (MAX_CHANNELS) and its declared length (`max_seconds`) come from the header and
are checked first; blocks are read so that each resampled block holds about `block_frames` samples whatever the
ratio, so memory depends neither on the header's claims nor on the file's length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import posixpath
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

import av
import numpy as np
import soundfile
import soxr

from audiodiff.errors import BadAudioError

# What the bundled libsndfile reads (`soundfile.available_formats()`, headerless RAW aside), by file extension
SOUNDFILE_EXTENSIONS = (".wav", ".wave", ".bwf", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc",
                        ".au", ".snd", ".avr", ".caf", ".htk", ".svx", ".mat", ".paf", ".pvf", ".rf64", ".sd2",
                        ".sds", ".sf", ".ircam", ".voc", ".w64", ".nist", ".sph", ".wve", ".xi")
# What FFmpeg (through PyAV) reads beyond those: AAC/ALAC in MP4, WMA, and the audio of video containers
FFMPEG_EXTENSIONS = (".m4a", ".m4b", ".aac", ".mp4", ".m4v", ".mov", ".3gp", ".webm", ".mkv", ".mka", ".wma",
                     ".asf", ".wmv", ".ac3", ".eac3", ".amr", ".ape", ".wv", ".tta", ".dts")
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS + FFMPEG_EXTENSIONS
# 1 kHz is below any audio format in use (telephony is 8 kHz); 768 kHz is the highest studio rate (DXD x 2). Below
# the codec's rate each input frame becomes several output samples: 22 at most at 22050 Hz.
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64  # 7th-order ambisonics; a block of 64 channels is 16 MiB of float32
# mp3 frame counts in headers are estimates; only a clear shortfall counts as truncation
_TRUNCATION_TOLERANCE = 0.99
_NOT_DECODABLE = "not decodable as audio"  # how a reject reason begins when no decoder took the file
# samples per resampled block: about 1.5 s at 44.1 kHz, so a worker holds a few MB of a track at a time
BLOCK_FRAMES = 1 << 16


@dataclasses.dataclass
class _Opened:
    """An open audio file: its header's numbers and a reader of float32 [frames, channels] blocks."""

    sample_rate: int
    channels: int
    frames: int | None  # as declared; None where the container does not say
    exact: bool  # whether `frames` is exact enough to detect truncation by
    read: Callable[[int], np.ndarray]  # (most frames) -> a block, empty at the end


def stream_audio(data: bytes | str | os.PathLike | BinaryIO, sample_rate: int, source: str,
                 max_seconds: float | None = None, block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Encoded bytes, a local file or an open binary file -> mono float32 blocks at `sample_rate`, decoded,
    mixed and resampled (soxr's streaming resampler, the same samples as resampling the whole track) block by
    block, so a worker's memory does not grow with the track's length.

    Raises BadAudioError naming `source`: before the first block for an unreadable file, a bad header (a rate,
    channel count or declared length out of bounds); at the block where non-finite samples appear or the track
    passes `max_seconds`; after the last for truncation."""
    with _opened(data, source) as file, _decoder(file, source) as f:
        resampler = (soxr.ResampleStream(f.sample_rate, sample_rate, 1, dtype="float32", quality="HQ")
                     if f.sample_rate != sample_rate else None)
        # input frames per block such that a resampled block holds about `block_frames` samples
        frames = max(1, min(block_frames, block_frames * f.sample_rate // sample_rate))
        for block in _checked_blocks(f, source, max_seconds, frames):
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
def _decoder(file: BinaryIO, source: str) -> Iterator[_Opened]:
    """The file opened by the decoder its extension names: PyAV for FFMPEG_EXTENSIONS, soundfile for the rest,
    and PyAV after soundfile for a name with no known extension (rows of a dataset that kept no file name)."""
    if file.seek(0, io.SEEK_END) == 0:
        raise BadAudioError(source, "empty file (0 bytes)")
    extension = posixpath.splitext(source.lower())[1]
    with contextlib.ExitStack() as stack:
        if extension in FFMPEG_EXTENSIONS:
            opened = stack.enter_context(_ffmpeg_file(file, source))
        else:
            try:
                opened = stack.enter_context(_sound_file(file, source))
            except BadAudioError as e:
                if extension in SOUNDFILE_EXTENSIONS or not e.reason.startswith(_NOT_DECODABLE):
                    raise
                try:
                    opened = stack.enter_context(_ffmpeg_file(file, source))
                except BadAudioError:
                    raise e from None
        yield opened


@contextlib.contextmanager
def _sound_file(file: BinaryIO, source: str) -> Iterator[_Opened]:
    if _wav_is_truncated(file):
        raise BadAudioError(source, "truncated WAV: the data chunk is shorter than its header declares")
    file.seek(0)
    try:
        sound = soundfile.SoundFile(file)
    except (soundfile.LibsndfileError, RuntimeError) as e:
        raise _undecodable(source, e) from None
    with sound:
        _check_header(source, sound.samplerate, sound.channels)

        def read(frames: int) -> np.ndarray:
            try:
                return sound.read(frames, dtype="float32", always_2d=True)
            except (soundfile.LibsndfileError, RuntimeError) as e:
                raise _undecodable(source, e) from None

        yield _Opened(sound.samplerate, sound.channels, sound.frames, True, read)


@contextlib.contextmanager
def _ffmpeg_file(file: BinaryIO, source: str) -> Iterator[_Opened]:
    """The first audio stream of anything FFmpeg reads, decoded frame by frame into float32 blocks."""
    file.seek(0)
    try:
        container = av.open(file, "r")
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as e:
        raise _undecodable(source, e) from None
    with container:
        if not container.streams.audio:
            raise BadAudioError(source, "no audio stream in the file")
        stream = container.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        _check_header(source, rate, channels)
        declared = None
        if stream.duration is not None and stream.time_base is not None:
            declared = int(stream.duration * stream.time_base * rate)
        elif container.duration is not None:
            declared = int(container.duration / av.time_base * rate)
        packed = av.AudioResampler(format="fltp")
        frames = container.decode(stream)
        pending: list[np.ndarray] = []

        def read(count: int) -> np.ndarray:
            have = sum(len(p) for p in pending)
            while have < count:
                try:
                    frame = next(frames, None)
                    converted = packed.resample(frame)
                except (av.error.FFmpegError, ValueError) as e:
                    raise _undecodable(source, e) from None
                if frame is None and not converted:
                    break
                for c in converted:
                    if c.layout.nb_channels != channels:
                        raise BadAudioError(source, f"the channel count changes within the stream "
                                                    f"({channels} to {c.layout.nb_channels})")
                    pending.append(c.to_ndarray().T.astype(np.float32, copy=False))
                    have += c.samples
            if not pending:
                return np.zeros((0, channels), np.float32)
            block = np.concatenate(pending)
            pending[:] = [block[count:]] if len(block) > count else []
            return block[:count]

        # container durations are estimates (an encoder's padding, a missing index): not a truncation check
        yield _Opened(rate, channels, declared, False, read)


def _check_header(source: str, sample_rate: int, channels: int) -> None:
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise BadAudioError(source, f"sample rate {sample_rate} Hz in its header is outside "
                                    f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz (a damaged or mislabelled file)")
    if not 1 <= channels <= MAX_CHANNELS:
        raise BadAudioError(source, f"{channels} channels in its header; at most {MAX_CHANNELS} are read")


def _checked_blocks(f: _Opened, source: str, max_seconds: float | None, block_frames: int) -> Iterator[np.ndarray]:
    """float32 [frames, channels] blocks of an open file, checked as they come and against its header at the end."""
    limit = None if max_seconds is None else max_seconds * f.sample_rate
    if limit is not None and f.frames is not None and f.frames > limit:
        raise BadAudioError(source, f"longer than --max-seconds {max_seconds:g} ({f.frames / f.sample_rate:.0f} s); "
                                    "raise --max-seconds to keep it")
    decoded = 0
    while True:
        block = f.read(block_frames)
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
    if f.exact and decoded < f.frames * _TRUNCATION_TOLERANCE:
        raise BadAudioError(source, f"truncated: header declares {f.frames} frames, only {decoded} decode")


def _undecodable(source: str, error: Exception) -> BadAudioError:
    reason = getattr(error, "error_string", None) or str(error)
    return BadAudioError(source, f"{_NOT_DECODABLE} ({reason.strip()})")


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


def load_audio(data: bytes | str | os.PathLike, sample_rate: int, source: str | None = None,
               max_seconds: float | None = None) -> np.ndarray:
    """Encoded bytes or a local file -> mono float32 at `sample_rate`. Raises BadAudioError naming the input (and
    for a track longer than `max_seconds`)."""
    source = source or (os.fspath(data) if isinstance(data, (str, os.PathLike)) else "<bytes>")
    return np.concatenate(list(stream_audio(data, sample_rate, source, max_seconds)))


def folder_genre(path: str) -> str:
    """A file's genre when audio is filed in a folder per genre: the name of the folder it is in."""
    return posixpath.basename(posixpath.dirname(path.replace(os.sep, "/")))
