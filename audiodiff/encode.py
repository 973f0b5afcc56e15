"""Encoding outputs to bytes: spectrogram images as PNG (and back), clips as 16-bit PCM WAV."""

from __future__ import annotations

import io
import warnings
import zlib

import numpy as np
import soundfile
from PIL import Image

from audiodiff.errors import BadImageError

# The modes a spectrogram PNG comes in (ours are L; others' may be palette, RGB(A) or 16-bit grey): at most 4 bytes
# a pixel, so with the size checked first a PNG's decoded size is known before it is decoded.
PNG_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I", "I;16")
# Without an expected size, a spectrogram is no larger than the tallest and widest image a mel config allows
# (mel.MEL_BOUNDS; not imported, so that Ray's decode tasks need no torch)
MAX_PNG_SIZE = (1024, 4096)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [height, width] -> grayscale PNG. zlib's run-length strategy (Pillow's `compress_type`): on
    spectrograms, half the time of the default deflate for files 0.5% larger (level 1 saves less time and costs
    10%); the pixels are the same, as PNG is lossless (BENCHMARKS.md)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_type=zlib.Z_RLE)
    return buffer.getvalue()


def png_image(data: bytes, source: str = "<png>", size: tuple[int, int] | None = None) -> np.ndarray:
    """A PNG -> uint8 [height, width] grayscale. Its format, mode and dimensions are read from its header and
    checked before its pixels are decoded: exactly `size` (height, width) when given, else within MAX_PNG_SIZE.
    Raises BadImageError naming `source` (a 343 KiB PNG of 9500x9500 was 462 MiB once decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            image = Image.open(io.BytesIO(data), formats=["PNG"])
            width, height = image.size
            if size is not None and (height, width) != tuple(size):
                raise BadImageError(source, f"image is {height}x{width}, expected {size[0]}x{size[1]} (height x width)")
            if height > MAX_PNG_SIZE[0] or width > MAX_PNG_SIZE[1]:
                raise BadImageError(source, f"image is {height}x{width}, larger than any spectrogram "
                                            f"({MAX_PNG_SIZE[0]}x{MAX_PNG_SIZE[1]} at most)")
            if image.mode not in PNG_MODES:
                raise BadImageError(source, f"PNG of mode {image.mode}; a spectrogram is one of {', '.join(PNG_MODES)}")
            return np.asarray(image.convert("L"))
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit: refused as it opens
        raise BadImageError(source, f"image larger than any spectrogram ({str(e).split(',')[0]})") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as e:  # Pillow's "not a PNG" and "broken"
        raise BadImageError(source, f"not a readable PNG ({type(e).__name__}: {str(e).strip() or 'damaged'})") from None


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio in [-1, 1] -> 16-bit PCM WAV."""
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
