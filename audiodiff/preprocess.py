"""Audio collections -> spectrogram dataset, on Ray Data CPU workers, streaming.

Sources (several per run): a folder or URI of audio files; HF-style parquet (an `audio` column of
`{bytes, path}`, an optional `genre` column) on disk, object storage or the hub (`hf://`, or a dataset id);
a dataset saved with `datasets.save_to_disk` (local). Every source becomes rows of
`{source, bytes, genre, uri}` (a dataset's rows carry the encoded audio; an audio file only its URI, which the worker
reads itself); `SpectrogramMaker` turns each track into PNG slices or a reject reason;
`audiodiff.dataset.SpectrogramSink` writes the spectrogram dataset (its format is described there).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import os
import posixpath
import re
import tempfile
import time
import uuid
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from audiodiff import checks, ownership, progress, storage
from audiodiff.audio import AUDIO_EXTENSIONS, folder_genre, stream_audio
from audiodiff.dataset import ArrowStreamFiles, SpectrogramSink, filter_genres, is_saved_dataset, prepare_output, \
    read_stats
from audiodiff.encode import png_bytes
from audiodiff.errors import AudiodiffError, BadAudioError
from audiodiff.mel import MelCodec, MelConfig, is_silent
from audiodiff.runtime import ACTOR_CPUS, LIGHT_CPUS, check_paths_reachable, cluster_capacity, worker_errors

# Ray Data restarts a spectrogram actor and retries its batch, without limit, when its worker dies (a node lost, the
# OOM killer, a crash in a decoder), and Ray retries a write up to this many times. A track whose worker died this
# many times while on it is a reject (`TrackTries`), so a track that kills every worker it meets cannot loop forever.
WORKER_RETRIES = 3
# A track is its encoded `bytes` (rows of HF-style datasets), or, for audio files, the `uri` the worker streams it
# from (so that a worker never holds a whole long file).
TRACK_SCHEMA = pa.schema([("source", pa.string()), ("bytes", pa.binary()), ("genre", pa.string()),
                          ("uri", pa.string())])


@dataclasses.dataclass
class PreprocessConfig:
    sources: list[str]
    output: str
    model: str | None = None  # the mel config comes from this model (hub id, folder, URI or preset) ...
    mel_config: str | None = None  # ... or from this mel_config.json (path or URI); else diffusers' defaults
    genres: list[str] = dataclasses.field(default_factory=list)
    limit: int | None = None
    slices: str = "all"  # "all" full slices per track, or "random": one per track, as the notebook
    genre_from_folder: bool = False
    split: str = "train"
    # CPU actors; default: up to every CPU the cluster has or can scale to
    num_workers: int | None = dataclasses.field(default=None, metadata={"flag": "--num-cpus"})
    tracks_per_batch: int = 4
    seed: int = 0
    overwrite: bool = False
    max_seconds: float = 4 * 3600  # longer tracks are rejects (a bound on the time one track takes, not on memory)
    shared_path: bool = False  # a local --output that every node of a multi-node cluster mounts

    def __post_init__(self):
        """The checks that need no data and no cluster (audiodiff.checks)."""
        checks.finite(self)
        if not self.sources:
            raise AudiodiffError("give at least one SOURCE")
        checks.one_of(self, "slices", ("all", "random"))
        checks.at_least(self, 1, "limit", "num_workers", "tracks_per_batch")
        checks.positive(self, "max_seconds")
        if self.model and self.mel_config:
            raise AudiodiffError("give the mel config by --model or by --mel-config, not both")


@dataclasses.dataclass
class Tracks:
    """One source, opened: the rows to process and the genre of every track in it (before filtering)."""

    dataset: ray.data.Dataset
    genre_counts: collections.Counter
    skipped_by_extension: collections.Counter = dataclasses.field(default_factory=collections.Counter)


# sources


def open_source(uri: str, config: PreprocessConfig) -> Tracks:
    if uri.startswith("hf://"):
        return _open_parquet(_hub_parquet_files(uri), storage.hub_filesystem(), uri, config)
    if storage.is_hub_id(uri):
        return open_source(f"hf://datasets/{uri}", config)
    local = not storage.is_remote(uri)
    uri = storage.absolute(uri)  # a relative path: Ray workers do not run in the driver's directory
    if not storage.exists(uri):
        raise AudiodiffError(f"{uri}: source not found (not a file, a folder, an object-storage URI or a hub id)")
    if is_saved_dataset(uri):
        if not local:
            raise AudiodiffError(f"{uri}: datasets saved with save_to_disk are read from local disk only; "
                                 "write it as parquet (Dataset.to_parquet) to read it from object storage")
        return _open_saved_dataset(storage.resolve(uri)[1], config)
    files = storage.list_files(uri) if storage.is_dir(uri) else [uri]
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet:
        fs = storage.resolve(uri)[0]
        tracks = _open_parquet([storage.resolve(f)[1] for f in parquet], fs, uri, config)
        return dataclasses.replace(tracks, skipped_by_extension=skipped_by_extension(files, (".parquet",)))
    audio = [f for f in files if f.lower().endswith(AUDIO_EXTENSIONS)]
    skipped = skipped_by_extension(files, AUDIO_EXTENSIONS)
    if not audio:
        found = f" (only {describe_skipped(skipped)})" if skipped else ""
        raise AudiodiffError(f"{uri}: no audio or parquet files found{found}; audio is chosen by extension: "
                             "README.md, 'Audio formats', lists them")
    return dataclasses.replace(_open_audio_files(audio, config), skipped_by_extension=skipped)


def skipped_by_extension(files: list[str], kept: tuple[str, ...]) -> collections.Counter:
    """How many of `files` are not of the `kept` extensions, per extension (lower case; "(none)" for none)."""
    extensions = (os.path.splitext(posixpath.basename(f))[1].lower() or "(none)" for f in files
                  if not f.lower().endswith(kept))
    return collections.Counter(extensions)


def describe_skipped(counts: dict) -> str:
    """{".txt": 3, ".jpg": 1} -> "4 files of other types (.txt 3, .jpg 1)"."""
    top = ", ".join(f"{ext} {n}" for ext, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{sum(counts.values())} file{'s' if sum(counts.values()) != 1 else ''} of other types ({top})"


def _open_audio_files(files: list[str], config: PreprocessConfig) -> Tracks:
    genres = {f: folder_genre(f) if config.genre_from_folder else None for f in files}
    counts = collections.Counter(genres.values())
    selected = [f for f in files if not config.genres or genres[f] in config.genres]
    if not selected:
        return Tracks(ray.data.from_arrow(TRACK_SCHEMA.empty_table()), counts)
    # Blocks of one actor call's tracks: a quarter of the objects a block per track makes Ray's driver schedule
    # (1 ms of its CPU per track, measured). But at least one block for each worker of a fixed pool, --limit
    # counted, so that every actor gets work from the start (Ray warns otherwise), and at most 1000 blocks. Built in
    # the driver, as `from_items` does, not by `from_arrow`, which runs a Ray task per block to read its size.
    rows = [{"source": f, "bytes": None, "genre": genres[f], "uri": f} for f in selected]
    used = min(len(rows), config.limit or len(rows))
    per_block = max(1, min(config.tracks_per_batch, used // (config.num_workers or 1)), -(-len(rows) // 1000))
    return Tracks(ray.data.from_items(rows, override_num_blocks=-(-len(rows) // per_block)), counts)


def _hub_parquet_files(uri: str) -> list[str]:
    """hf://datasets/owner/name[/folder] -> its parquet files for the split (or the hub's parquet export)."""
    from huggingface_hub import HfFileSystem

    path = uri.removeprefix("hf://")
    fs = HfFileSystem()
    try:
        if path.endswith(".parquet"):
            return [path]
        files = sorted(fs.glob(f"{path}/**/*.parquet"))
        if not files:  # datasets stored in other formats: the hub's own parquet export
            files = sorted(fs.glob(f"{path}@refs%2Fconvert%2Fparquet/**/*.parquet"))
    except Exception as e:  # noqa: BLE001 - fsspec raises many kinds; all mean "cannot read the hub"
        raise AudiodiffError(f"{uri}: cannot list the dataset on the Hugging Face Hub "
                             f"({type(e).__name__}: {e})") from None
    if not files:
        raise AudiodiffError(f"{uri}: no parquet files on the Hugging Face Hub")
    return files


def _open_parquet(paths: list[str], filesystem, uri: str, config: PreprocessConfig) -> Tracks:
    split_files = [p for p in paths if re.search(rf"(^|[/_-]){re.escape(config.split)}([/_-]|$)", p)]
    paths = split_files or paths
    genres, schema = [], None
    for path in paths:  # file by file, so that one that is not parquet (ArrowInvalid) is named
        try:
            with pq.ParquetFile(path, filesystem=filesystem) as file:
                schema = schema or file.schema_arrow
                genres += (file.read(columns=["genre"])["genre"].to_pylist() if "genre" in schema.names
                           else [None] * file.metadata.num_rows)
        except (OSError, pa.ArrowInvalid) as e:
            raise AudiodiffError(f"{uri}: cannot read {path} as parquet ({e})") from None
    if "audio" not in schema.names:
        raise AudiodiffError(f"{uri}: parquet has no 'audio' column (columns: {', '.join(schema.names)})")
    columns = ["audio"] + (["genre"] if "genre" in schema.names else [])
    dataset = ray.data.read_parquet(paths, filesystem=filesystem, include_paths=True, num_cpus=LIGHT_CPUS)
    return _hf_tracks(dataset.select_columns(columns + ["path"]), genres, config)


def _open_saved_dataset(path: str, config: PreprocessConfig) -> Tracks:
    import datasets

    try:
        saved = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise AudiodiffError(f"{path}: cannot open the saved dataset ({e})") from None
    if isinstance(saved, datasets.DatasetDict):
        if config.split not in saved:
            raise AudiodiffError(f"{path}: no split '{config.split}' (splits: {', '.join(saved)})")
        saved = saved[config.split]
    if "audio" not in saved.column_names:
        raise AudiodiffError(f"{path}: dataset has no 'audio' column (columns: {', '.join(saved.column_names)})")
    genres = saved["genre"] if "genre" in saved.column_names else [None] * len(saved)
    files = [f["filename"] for f in saved.cache_files]
    dataset = ray.data.read_datasource(ArrowStreamFiles(files, include_paths=True), num_cpus=LIGHT_CPUS)
    return _hf_tracks(dataset, genres, config)


def _hf_tracks(dataset: ray.data.Dataset, genres, config: PreprocessConfig) -> Tracks:
    """Rows of a Hugging Face audio dataset as tracks of the chosen genres; `genres` is its genre column."""
    tracks = dataset.map_batches(_hf_rows_to_tracks, batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    return Tracks(filter_genres(tracks, config.genres), collections.Counter(genres))


def _hf_rows_to_tracks(batch: pa.Table) -> pa.Table:
    audio = batch["audio"].combine_chunks()
    data = audio.field("bytes").to_pylist()
    names = audio.field("path").to_pylist()
    files = batch["path"].to_pylist()
    # the audio's own name where the dataset kept one, else its file and a hash of its bytes: stable, unique
    sources = [name or f"{file}#{hashlib.sha1(d or b'').hexdigest()[:12]}" for name, file, d in zip(names, files, data)]
    genres = batch["genre"] if "genre" in batch.column_names else pa.nulls(batch.num_rows, pa.string())
    return pa.table({"source": sources, "bytes": pa.array(data, pa.binary()), "genre": genres.cast(pa.string()),
                     "uri": pa.nulls(batch.num_rows, pa.string())}, schema=TRACK_SCHEMA)


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
        # imported here, in the driver: the workers that unpickle this module's classes need no diffusers (seconds)
        from audiodiff.models import load_mel_config

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


def make_spectrograms(tracks: ray.data.Dataset, mel: MelConfig, config: PreprocessConfig,
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
    """Run the whole stage on the current Ray; returns the stats written to stats.json."""
    ownership.check_apart(config.sources, config.output)
    check_paths_reachable(config.shared_path, config.output, config.sources)
    mel = resolve_mel_config(config)
    started = time.time()
    opened = [open_source(uri, config) for uri in config.sources]
    prepare_output(config.output, mel.to_json(), config.overwrite)
    counts = sum((o.genre_counts for o in opened), collections.Counter())
    print(genre_table(counts, config.genres), flush=True)
    missing = [g for g in config.genres if g not in counts]
    if missing:
        print(f"note: no tracks of genre {', '.join(missing)} in the sources", flush=True)
    tracks = opened[0].dataset.union(*[o.dataset for o in opened[1:]]) if len(opened) > 1 else opened[0].dataset
    if config.limit is not None:
        tracks = tracks.limit(config.limit)
    skipped = sum((o.skipped_by_extension for o in opened), collections.Counter())
    sink = SpectrogramSink(config.output, started, dict(skipped))
    selected = sum(n for genre, n in counts.items() if not config.genres or genre in config.genres)
    with worker_errors(), progress.Progress("preprocess", min(selected, config.limit or selected), "tracks",
                                            workers=True) as made:
        make_spectrograms(tracks, mel, config, made.counter).write_datasink(
            sink, ray_remote_args={"num_cpus": LIGHT_CPUS, "max_retries": WORKER_RETRIES})
    return read_stats(config.output)


def summary_line(stats: dict, output: str) -> str:
    skipped = stats.get("skipped_by_extension")
    return (f"preprocess: {stats['tracks_read']} tracks read, {stats['tracks_written']} written, "
            f"{stats['tracks_rejected']} rejected" + (f", {describe_skipped(skipped)} skipped" if skipped else "")
            + f"; {stats['slices_written']} slices "
            f"({stats['seconds_of_audio']:.0f} s of audio) in {stats['elapsed_seconds']:.1f} s -> {output}")
