"""Opening sources: every kind of audio collection that preprocess and the audio-to-audio commands read, as rows
of tracks (`TRACK_SCHEMA`).

Sources: a folder or URI of audio files; HF-style parquet (an `audio` column of `{bytes, path}`, an optional
`genre` column) on disk, object storage or the hub (`hf://`, or a dataset id); a dataset saved with
`datasets.save_to_disk` (local). A dataset's rows carry the encoded audio; an audio file only its URI, which the
worker reads itself.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import posixpath
import re

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from audiodiff import checks, storage
from audiodiff.audio import AUDIO_EXTENSIONS, folder_genre
from audiodiff.dataset import ArrowStreamFiles, filter_genres, is_saved_dataset, read_parquet
from audiodiff.errors import AudiodiffError
from audiodiff.runtime import LIGHT_CPUS

# A track is its encoded `bytes` (rows of HF-style datasets), or, for audio files, the `uri` the worker streams it
# from (so that a worker never holds a whole long file).
TRACK_SCHEMA = pa.schema([("source", pa.string()), ("bytes", pa.binary()), ("genre", pa.string()),
                          ("uri", pa.string())])


@dataclasses.dataclass(kw_only=True)
class TrackSettings:
    """How tracks are read from sources and cut into slices: preprocess's flags (its config adds its own), which
    the audio-to-audio commands take at their defaults."""

    only_genres: list[str] = dataclasses.field(default_factory=list, metadata={"flag": "--genre"})  # a filter
    genre_from_folder: bool = False
    split: str = "train"
    limit: int | None = None
    slices: str = "all"  # "all" full slices per track, or "random": one per track, as the notebook
    # CPU actors; default: up to every CPU the cluster has or can scale to
    num_workers: int | None = dataclasses.field(default=None, metadata={"flag": "--num-cpus"})
    tracks_per_batch: int = 4
    seed: int = 0
    max_seconds: float = 4 * 3600  # longer tracks are rejects (a bound on the time one track takes, not on memory)

    def __post_init__(self):
        """The checks that need no data and no cluster (audiodiff.checks)."""
        checks.finite(self)
        checks.one_of(self, "slices", ("all", "random"))
        checks.at_least(self, 1, "limit", "num_workers", "tracks_per_batch")
        checks.positive(self, "max_seconds")


@dataclasses.dataclass
class Tracks:
    """One source, opened: the rows to process and the genre of every track in it (before filtering)."""

    dataset: ray.data.Dataset
    genre_counts: collections.Counter
    skipped_by_extension: collections.Counter = dataclasses.field(default_factory=collections.Counter)



def open_source(uri: str, settings: TrackSettings) -> Tracks:
    if uri.startswith("hf://"):
        return _open_parquet(_hub_parquet_files(uri), storage.hub_filesystem(), uri, settings)
    if storage.is_hub_id(uri):
        return open_source(f"hf://datasets/{uri}", settings)
    local = not storage.is_remote(uri)
    uri = storage.absolute(uri)  # a relative path: Ray workers do not run in the driver's directory
    if not storage.exists(uri):
        raise AudiodiffError(f"{uri}: source not found (not a file, a folder, an object-storage URI or a hub id)")
    if is_saved_dataset(uri):
        if not local:
            raise AudiodiffError(f"{uri}: datasets saved with save_to_disk are read from local disk only; "
                                 "write it as parquet (Dataset.to_parquet) to read it from object storage")
        return _open_saved_dataset(storage.resolve(uri)[1], settings)
    files = storage.list_files(uri) if storage.is_dir(uri) else [uri]
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet:
        fs = storage.resolve(uri)[0]
        tracks = _open_parquet([storage.resolve(f)[1] for f in parquet], fs, uri, settings)
        return dataclasses.replace(tracks, skipped_by_extension=skipped_by_extension(files, (".parquet",)))
    audio = [f for f in files if f.lower().endswith(AUDIO_EXTENSIONS)]
    skipped = skipped_by_extension(files, AUDIO_EXTENSIONS)
    if not audio:
        found = f" (only {describe_skipped(skipped)})" if skipped else ""
        raise AudiodiffError(f"{uri}: no audio or parquet files found{found}; audio is chosen by extension: "
                             "README.md, 'Audio formats', lists them")
    return dataclasses.replace(_open_audio_files(audio, settings), skipped_by_extension=skipped)


def skipped_by_extension(files: list[str], kept: tuple[str, ...]) -> collections.Counter:
    """How many of `files` are not of the `kept` extensions, per extension (lower case; "(none)" for none)."""
    extensions = (os.path.splitext(posixpath.basename(f))[1].lower() or "(none)" for f in files
                  if not f.lower().endswith(kept))
    return collections.Counter(extensions)


def describe_skipped(counts: dict) -> str:
    """{".txt": 3, ".jpg": 1} -> "4 files of other types (.txt 3, .jpg 1)"."""
    top = ", ".join(f"{ext} {n}" for ext, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{sum(counts.values())} file{'s' if sum(counts.values()) != 1 else ''} of other types ({top})"


def _open_audio_files(files: list[str], settings: TrackSettings) -> Tracks:
    genres = {f: folder_genre(f) if settings.genre_from_folder else None for f in files}
    counts = collections.Counter(genres.values())
    selected = [f for f in files if not settings.only_genres or genres[f] in settings.only_genres]
    if not selected:
        return Tracks(ray.data.from_arrow(TRACK_SCHEMA.empty_table()), counts)
    # Blocks of one actor call's tracks: a quarter of the objects a block per track makes Ray's driver schedule
    # (1 ms of its CPU per track, measured). But at least one block for each worker of a fixed pool, --limit
    # counted, so that every actor gets work from the start (Ray warns otherwise), and at most 1000 blocks. Built in
    # the driver, as `from_items` does, not by `from_arrow`, which runs a Ray task per block to read its size.
    rows = [{"source": f, "bytes": None, "genre": genres[f], "uri": f} for f in selected]
    used = min(len(rows), settings.limit or len(rows))
    per_block = max(1, min(settings.tracks_per_batch, used // (settings.num_workers or 1)), -(-len(rows) // 1000))
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


def _open_parquet(paths: list[str], filesystem, uri: str, settings: TrackSettings) -> Tracks:
    split_files = [p for p in paths if re.search(rf"(^|[/_-]){re.escape(settings.split)}([/_-]|$)", p)]
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
    dataset = read_parquet(paths, filesystem=filesystem, include_paths=True)
    return _hf_tracks(dataset.select_columns(columns + ["path"]), genres, settings)


def _open_saved_dataset(path: str, settings: TrackSettings) -> Tracks:
    import datasets

    try:
        saved = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise AudiodiffError(f"{path}: cannot open the saved dataset ({e})") from None
    if isinstance(saved, datasets.DatasetDict):
        if settings.split not in saved:
            raise AudiodiffError(f"{path}: no split '{settings.split}' (splits: {', '.join(saved)})")
        saved = saved[settings.split]
    if "audio" not in saved.column_names:
        raise AudiodiffError(f"{path}: dataset has no 'audio' column (columns: {', '.join(saved.column_names)})")
    genres = saved["genre"] if "genre" in saved.column_names else [None] * len(saved)
    files = [f["filename"] for f in saved.cache_files]
    dataset = ray.data.read_datasource(ArrowStreamFiles(files, include_paths=True), num_cpus=LIGHT_CPUS)
    return _hf_tracks(dataset, genres, settings)


def _hf_tracks(dataset: ray.data.Dataset, genres, settings: TrackSettings) -> Tracks:
    """Rows of a Hugging Face audio dataset as tracks of the chosen genres; `genres` is its genre column."""
    tracks = dataset.map_batches(_hf_rows_to_tracks, batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    return Tracks(filter_genres(tracks, settings.only_genres), collections.Counter(genres))


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
