"""Audio collections -> spectrogram dataset, on Ray Data CPU workers, streaming.

Every source (several per run) becomes rows of tracks (audiodiff.sources); `SpectrogramMaker` turns each track
into PNG slices or a reject reason;
`audiodiff.dataset.SpectrogramSink` writes the spectrogram dataset (its format is described there).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import os
import tempfile
import time
import uuid
import zlib

import numpy as np
import pyarrow as pa
import ray
import torch

from audiodiff import ownership, progress, storage
from audiodiff.audio import stream_audio
from audiodiff.dataset import SpectrogramSink, prepare_output, read_stats
from audiodiff.encode import png_bytes
from audiodiff.errors import AudiodiffError, BadAudioError
from audiodiff.mel import MelCodec, MelConfig, is_silent
from audiodiff.model_files import load_mel_config
from audiodiff.runtime import ACTOR_CPUS, LIGHT_CPUS, check_paths_reachable, cluster_capacity, worker_errors
from audiodiff.sources import TrackSettings, describe_skipped, open_source

# Ray Data restarts a spectrogram actor and retries its batch, without limit, when its worker dies (a node lost, the
# OOM killer, a crash in a decoder), and Ray retries a write up to this many times. A track whose worker died this
# many times while on it is a reject (`TrackTries`), so a track that kills every worker it meets cannot loop forever.
WORKER_RETRIES = 3


@dataclasses.dataclass
class PreprocessConfig(TrackSettings):
    sources: list[str]
    output: str
    model: str | None = None  # the mel config comes from this model (hub id, folder, URI or preset) ...
    mel_config: str | None = None  # ... or from this mel_config.json (path or URI); else diffusers' defaults
    overwrite: bool = False
    shared_path: bool = False  # a local --output that every node of a multi-node cluster mounts

    def __post_init__(self):
        """The checks that need no data and no cluster (audiodiff.checks)."""
        super().__post_init__()
        if not self.sources:
            raise AudiodiffError("give at least one SOURCE")
        if self.model and self.mel_config:
            raise AudiodiffError("give the mel config by --model or by --mel-config, not both")


# work per track


class TrackTries:
    """How many workers died while on a track, counted on this node. A worker keeps an empty file named by the
    track and its process id while it makes the track's images, and removes it when done; a file whose process is
    gone is a worker that died on the track, found by the retry of its batch. The name holds the run, so files an
    interrupted run left count for nothing in the next; the process id, so a track given twice and made by two
    workers at once is not taken for a death."""

    def __init__(self, run: str):
        self.run = run
        self.folder = os.path.join(tempfile.gettempdir(), f"audiodiff-track-tries-{os.getuid()}")

    @contextlib.contextmanager
    def track(self, source: str):
        """Around making a track's images; raises BadAudioError once WORKER_RETRIES workers died on it."""
        key = os.path.join(self.folder, hashlib.sha1(f"{self.run}\0{source}".encode()).hexdigest())
        dead = [path for path in glob.glob(f"{glob.escape(key)}.*") if not _alive(int(path.rsplit(".", 1)[1]))]
        mine = f"{key}.{os.getpid()}"
        try:
            if len(dead) >= WORKER_RETRIES:
                raise BadAudioError(source, f"its worker died {len(dead)} times while making its images (a crash in "
                                            "a decoder, or out of memory); not tried again")
            with contextlib.suppress(OSError):  # a full or read-only temporary folder: make the track uncounted
                os.makedirs(self.folder, exist_ok=True)
                open(mine, "x").close()
            yield
        finally:
            for path in (*dead, mine):
                with contextlib.suppress(OSError):
                    os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SpectrogramMaker:
    """Per actor: one codec; per track: decode, mono, resample, slice, mel, PNG, or a reject reason.

    A track is decoded and cut into images block by block (`audio.stream_audio`), so an actor holds a batch of
    slices' audio and the track's PNGs, never the whole decoded track; tracks longer than `max_seconds` are
    rejected before they are decoded."""

    def __init__(self, mel: MelConfig, slices: str, seed: int, max_seconds: float | None = None, run: str = "",
                 counter=None):
        torch.set_num_threads(1)  # one actor per CPU
        self.counter = counter  # audiodiff.progress
        self.codec = MelCodec(mel)
        self.slices = slices
        self.seed = seed
        self.max_seconds = max_seconds
        self.tries = TrackTries(run)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = collections.defaultdict(list)
        for source, data, genre, uri in zip(batch["source"].to_pylist(), batch["bytes"].to_pylist(),
                                            batch["genre"].to_pylist(), batch["uri"].to_pylist()):
            try:
                with self.tries.track(source):
                    track = self._track(source, data, uri)
                reason = None if track["slices"] else f"entirely silent ({track['silent']} silent slices)"
            except BadAudioError as e:
                track, reason = {"slices": [], "pngs": [], "silent": 0, "seconds": 0.0}, e.reason
            except AudiodiffError:  # storage that cannot be reached is no fault of the track's: stop the job
                raise
            except Exception as e:  # noqa: BLE001 - one odd track must not take its batch down (RAY_NOTES.md)
                track, reason = {"slices": [], "pngs": [], "silent": 0, "seconds": 0.0}, \
                    f"unexpected error: {type(e).__name__}: {e}"
            for key, value in {"source": source, "genre": genre, "reason": reason, **track}.items():
                rows[key].append(value)
        progress.count(self.counter, batch.num_rows)
        return pa.table({"source": pa.array(rows["source"], pa.string()), "genre": pa.array(rows["genre"], pa.string()),
                         "reason": pa.array(rows["reason"], pa.string()), "seconds": rows["seconds"],
                         "silent": rows["silent"], "slices": pa.array(rows["slices"], pa.list_(pa.int16())),
                         "pngs": pa.array(rows["pngs"], pa.list_(pa.binary()))})

    def _track(self, source: str, data: bytes | None, uri: str | None) -> dict:
        if data is None and uri is None:
            raise BadAudioError(source, "no audio bytes in the dataset row")
        c = self.codec.config
        pngs, silent, samples, pending = {}, 0, 0, []
        with contextlib.nullcontext(data) if data is not None else storage.local_file(uri) as encoded:
            for block in stream_audio(encoded, c.sample_rate, source, self.max_seconds):
                pending.append(block)
                samples += len(block)
                if sum(map(len, pending)) >= c.slice_size * self.codec.slices_per_batch:
                    audio = np.concatenate(pending)
                    full = len(audio) // c.slice_size * c.slice_size
                    silent += self._add_images(audio[:full], pngs, silent)
                    pending = [audio[full:]]
        # the rest: its full slices, or, for a track shorter than one slice, the zero-padded slice
        audio = np.concatenate(pending)
        if samples < c.slice_size or len(audio) >= c.slice_size:
            silent += self._add_images(audio, pngs, silent)
        audible = sorted(pngs)
        if self.slices == "random" and audible:
            rng = np.random.default_rng([self.seed, zlib.crc32(source.encode())])
            audible = [audible[rng.integers(len(audible))]]
        return {"slices": audible, "pngs": [pngs[i] for i in audible], "silent": silent,
                "seconds": samples / c.sample_rate}

    def _add_images(self, audio: np.ndarray, pngs: dict[int, bytes], silent: int) -> int:
        """Images of consecutive slices that follow the `len(pngs) + silent` made so far; the audible ones go into
        `pngs` by their index in the track. Returns how many were silent (all white)."""
        images = self.codec.audio_to_images(audio)
        first = len(pngs) + silent
        audible = (~is_silent(images)).nonzero().flatten().tolist()
        pngs.update((first + i, png_bytes(images[i].numpy())) for i in audible)
        return images.shape[0] - len(audible)


# output


def resolve_mel_config(config: PreprocessConfig) -> MelConfig:
    if config.model:
        return load_mel_config(config.model)
    if config.mel_config:
        return MelConfig.from_json(storage.read_text(config.mel_config), config.mel_config)
    return MelConfig()


def genre_table(counts: collections.Counter, selected: list[str]) -> str:
    lines = [f"{'genre':<24} {'tracks':>8}"]
    for genre, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        mark = " *" if selected and genre in selected else ""
        lines.append(f"{genre or '(none)':<24} {n:>8}{mark}")
    lines.append(f"{'total':<24} {sum(counts.values()):>8}")
    return "\n".join(lines)


def make_spectrograms(tracks: ray.data.Dataset, mel: MelConfig, config: TrackSettings,
                      counter=None) -> ray.data.Dataset:
    """Tracks -> SpectrogramMaker's rows (slices or a reject reason per track) on a pool of CPU actors; also
    the audio-to-audio commands' way in (audiodiff.remix). `counter`: an audiodiff.progress counter of tracks."""
    pool = (ray.data.ActorPoolStrategy(size=config.num_workers) if config.num_workers else
            ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(cluster_capacity("CPU", cpu_only=True)))))
    # Ray Data's own actor fault tolerance (restart, retry the batch) applies; `max_restarts` could only be set
    # through the deprecated **ray_remote_args, so TrackTries bounds the tries of a track instead
    return tracks.map_batches(
        SpectrogramMaker,
        fn_constructor_args=(mel, config.slices, config.seed, config.max_seconds, uuid.uuid4().hex, counter),
        batch_size=config.tracks_per_batch, batch_format="pyarrow", num_cpus=ACTOR_CPUS, compute=pool,
    )


def run_preprocess(config: PreprocessConfig) -> dict:
    """Run the whole stage on the current Ray; returns the stats written to stats.json, and the output."""
    ownership.check_apart(config.sources, config.output)
    check_paths_reachable(config.shared_path, config.output, config.sources)
    mel = resolve_mel_config(config)
    started = time.time()
    opened = [open_source(uri, config) for uri in config.sources]
    prepare_output(config.output, mel.to_json(), config.overwrite)
    counts = sum((o.genre_counts for o in opened), collections.Counter())
    print(genre_table(counts, config.only_genres), flush=True)
    missing = [g for g in config.only_genres if g not in counts]
    if missing:
        print(f"note: no tracks of genre {', '.join(missing)} in the sources", flush=True)
    tracks = opened[0].dataset.union(*[o.dataset for o in opened[1:]]) if len(opened) > 1 else opened[0].dataset
    if config.limit is not None:
        tracks = tracks.limit(config.limit)
    skipped = sum((o.skipped_by_extension for o in opened), collections.Counter())
    sink = SpectrogramSink(config.output, started, dict(skipped))
    selected = sum(n for genre, n in counts.items() if not config.only_genres or genre in config.only_genres)
    with worker_errors(), progress.Progress("preprocess", min(selected, config.limit or selected), "tracks",
                                            workers=True) as made:
        make_spectrograms(tracks, mel, config, made.counter).write_datasink(
            sink, ray_remote_args={"num_cpus": LIGHT_CPUS, "max_retries": WORKER_RETRIES})
    return {**read_stats(config.output), "output": config.output}


def summary_line(stats: dict) -> str:
    skipped = stats.get("skipped_by_extension")
    return (f"preprocess: {stats['tracks_read']} tracks read, {stats['tracks_written']} written, "
            f"{stats['tracks_rejected']} rejected" + (f", {describe_skipped(skipped)} skipped" if skipped else "")
            + f"; {stats['slices_written']} slices "
            f"({stats['seconds_of_audio']:.0f} s of audio) in {stats['elapsed_seconds']:.1f} s -> {stats['output']}")
