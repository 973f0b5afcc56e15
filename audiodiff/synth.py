"""Simple music-like signals in a few "genres", for the demo and the tests (no dataset can be fetched here)."""

from __future__ import annotations

import io

import numpy as np

GENRES = ("drone", "beats", "arpeggio")


def synthesize(genre: str, seconds: float, sample_rate: int = 22050, seed: int = 0) -> np.ndarray:
    """Mono float32 audio peaking below 1.0; the same (genre, seconds, sample_rate, seed) gives the same audio."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    root = 110.0 * 2 ** (rng.integers(0, 12) / 12)
    if genre == "drone":
        chord = sum(np.sin(2 * np.pi * root * ratio * t + rng.uniform(0, 2 * np.pi)) for ratio in (1, 1.25, 1.5, 2))
        audio = chord * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t))
    elif genre == "beats":
        beat = 60.0 / rng.uniform(80, 140)
        phase = t % beat
        kick = np.sin(2 * np.pi * 55 * phase * np.exp(-phase * 8)) * np.exp(-phase * 12)
        off = (t + beat / 2) % beat
        snare = rng.standard_normal(t.size) * np.exp(-off * 30)
        audio = 2 * kick + 0.5 * snare + 0.3 * np.sin(2 * np.pi * root / 2 * t)
    elif genre == "arpeggio":
        step = rng.uniform(0.12, 0.25)
        notes = root * 2 ** (rng.choice([0, 3, 5, 7, 10, 12], size=int(t[-1] / step) + 1) / 12)
        local = t % step
        freq = notes[(t / step).astype(int)]
        audio = sum(np.sin(2 * np.pi * k * freq * local) / k for k in (1, 2, 3)) * np.exp(-local * 10)
    else:
        raise ValueError(f"unknown genre '{genre}'; choose one of {GENRES}")
    audio = audio + 0.01 * rng.standard_normal(t.size)
    return (0.8 * audio / np.abs(audio).max()).astype(np.float32)


def write_examples(folder: str, tracks_per_genre: int = 4, seconds: float = 12.0, sample_rate: int = 44100,
                   formats: tuple[str, ...] = ("wav", "flac", "mp3")) -> list[str]:
    """A folder of example tracks, `<folder>/<genre>/<genre>-<n>.<ext>`, formats taken in turn."""
    import soundfile

    from audiodiff import storage

    written = []
    for g, genre in enumerate(GENRES):
        for n in range(tracks_per_genre):
            ext = formats[n % len(formats)]
            buffer = io.BytesIO()
            soundfile.write(buffer, synthesize(genre, seconds, sample_rate, seed=100 * g + n), sample_rate,
                            format=ext.upper() if ext != "mp3" else "MP3")
            uri = storage.join(folder, genre, f"{genre}-{n}.{ext}")
            storage.write_bytes(uri, buffer.getvalue())
            written.append(uri)
    return written


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a folder of synthetic music-like tracks, one folder per genre.")
    parser.add_argument("folder", help="where to write them (path, s3:// or gs://)")
    parser.add_argument("--tracks-per-genre", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    files = write_examples(args.folder, args.tracks_per_genre, args.seconds)
    print(f"wrote {len(files)} tracks ({', '.join(GENRES)}) to {args.folder}")
