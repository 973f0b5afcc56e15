"""Audio collections -> spectrogram dataset, on Ray Data CPU workers, streaming.

Sources (several per run): a folder or URI of audio files; HF-style parquet (an `audio` column of
`{bytes, path}`, an optional `genre` column) on disk, object storage or the hub (`hf://`, or a dataset id);
a dataset saved with `datasets.save_to_disk` (local). Every source becomes rows of
`{source, bytes, genre}`; `SpectrogramMaker` turns each track into PNG slices or a reject reason;
`SpectrogramSink` writes the parts, `rejects.parquet` and `stats.json`.

Output under URI: `mel_config.json`, `data/part-*.parquet` (image {bytes, path}, audio_file, slice, genre),
`rejects.parquet` (source, reason), `stats.json`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import re
import time
import uuid
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data.datasource import Datasink, FileBasedDatasource
from ray.data.expressions import col

from audiodiff import storage
from audiodiff.audio import AUDIO_EXTENSIONS, load_audio
from audiodiff.encode import png_bytes
from audiodiff.errors import AudiodiffError, BadAudioError
from audiodiff.mel import MelCodec, MelConfig
from audiodiff.runtime import cluster_capacity

TRACK_SCHEMA = pa.schema([("source", pa.string()), ("bytes", pa.binary()), ("genre", pa.string())])
SLICE_SCHEMA = pa.schema(
    [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("audio_file", pa.string()),
     ("slice", pa.int16()), ("genre", pa.string())],
    # datasets reads these features, so `load_dataset("parquet", ...)` gives a working Image column
    metadata={"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "audio_file": {"dtype": "string", "_type": "Value"},
        "slice": {"dtype": "int16", "_type": "Value"}, "genre": {"dtype": "string", "_type": "Value"}}}})},
)
REJECT_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string())])
DATA_DIR = "data"  # the parquet parts; rejects and stats sit beside it so "all parts" never includes them
REJECTS = "rejects.parquet"
# Reading, reshaping rows, filtering and writing parts are light next to the spectrograms. Spectrogram actors
# take 3/4 of a CPU and every light step 1/4, so a full pool of one actor per core still leaves room to
# feed and drain it; with whole CPUs a light step that does not fuse into the actors (after --limit, say)
# waits forever for a CPU on a 2-core machine (as RAY_NOTES.md's Train + Data hang).
ACTOR_CPUS = 0.75
LIGHT_CPUS = 0.25
_HUB_DATASET_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclasses.dataclass
class PreprocessConfig:
    sources: list[str]
    output: str
    mel: MelConfig = dataclasses.field(default_factory=MelConfig)
    genres: list[str] = dataclasses.field(default_factory=list)
    limit: int | None = None
    slices: str = "all"  # "all" full slices per track, or "random": one per track, as the notebook
    genre_from_folder: bool = False
    split: str = "train"
    num_workers: int | None = None  # CPU actors; default: up to every CPU the cluster has or can scale to
    tracks_per_batch: int = 4
    seed: int = 0
    overwrite: bool = False


@dataclasses.dataclass
class Tracks:
    """One source, opened: the rows to process and the genre of every track in it (before filtering)."""

    dataset: ray.data.Dataset
    genre_counts: collections.Counter


# sources


def open_source(uri: str, config: PreprocessConfig) -> Tracks:
    if uri.startswith("hf://"):
        return _open_parquet(_hub_parquet_files(uri), _hub_filesystem(), uri, config)
    local = not storage.is_remote(uri)
    if not storage.exists(uri):
        if local and _HUB_DATASET_ID.match(uri) and not uri.startswith("."):
            return open_source(f"hf://datasets/{uri}", config)
        raise AudiodiffError(f"{uri}: source not found (not a file, a folder, an object-storage URI or a hub id)")
    saved_by_datasets = any(storage.exists(storage.join(uri, marker)) for marker in ("state.json", "dataset_dict.json"))
    if saved_by_datasets:
        if not local:
            raise AudiodiffError(f"{uri}: datasets saved with save_to_disk are read from local disk only; "
                                 "write it as parquet (Dataset.to_parquet) to read it from object storage")
        return _open_saved_dataset(storage.resolve(uri)[1], config)
    files = storage.list_files(uri) if storage.is_dir(uri) else [uri]
    parquet = [f for f in files if f.endswith(".parquet")]
    if parquet:
        fs = storage.resolve(uri)[0]
        return _open_parquet([storage.resolve(f)[1] for f in parquet], fs, uri, config)
    audio = [f for f in files if f.lower().endswith(AUDIO_EXTENSIONS)]
    if not audio:
        raise AudiodiffError(f"{uri}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) or parquet files found")
    return _open_audio_files(audio, config)


def _open_audio_files(files: list[str], config: PreprocessConfig) -> Tracks:
    genres = {f: posixpath.basename(posixpath.dirname(f.replace(os.sep, "/"))) if config.genre_from_folder
              else None for f in files}
    counts = collections.Counter(genres.values())
    selected = [f for f in files if not config.genres or genres[f] in config.genres]
    if not selected:
        return Tracks(ray.data.from_arrow(TRACK_SCHEMA.empty_table()), counts)
    fs = storage.resolve(files[0])[0]
    # the reader names files by their path inside the filesystem; map back to the URIs we listed
    by_path = {storage.resolve(f)[1]: f for f in selected}
    dataset = ray.data.read_binary_files([storage.resolve(f)[1] for f in selected], filesystem=fs,
                                         include_paths=True, num_cpus=LIGHT_CPUS)

    def to_tracks(batch: pa.Table) -> pa.Table:
        sources = [by_path[p] for p in batch["path"].to_pylist()]
        return pa.table({"source": sources, "bytes": batch["bytes"],
                         "genre": [genres[s] for s in sources]}, schema=TRACK_SCHEMA)

    return Tracks(dataset.map_batches(to_tracks, batch_format="pyarrow", num_cpus=LIGHT_CPUS), counts)


def _hub_filesystem():
    from huggingface_hub import HfFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(HfFileSystem()))


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
    try:
        schema = pq.read_schema(paths[0], filesystem=filesystem)
        genres = (pq.read_table(paths, columns=["genre"], filesystem=filesystem)["genre"].to_pylist()
                  if "genre" in schema.names else [None] * sum(pq.read_metadata(p, filesystem=filesystem).num_rows
                                                             for p in paths))
    except OSError as e:
        raise AudiodiffError(f"{uri}: cannot read parquet ({e})") from None
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
    dataset = ray.data.read_datasource(_ArrowStreamFiles(files, include_paths=True), num_cpus=LIGHT_CPUS)
    return _hf_tracks(dataset, genres, config)


def _hf_tracks(dataset: ray.data.Dataset, genres, config: PreprocessConfig) -> Tracks:
    """Rows of a Hugging Face audio dataset as tracks of the chosen genres; `genres` is its genre column."""
    tracks = dataset.map_batches(_hf_rows_to_tracks, batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    return Tracks(filter_genres(tracks, config.genres), collections.Counter(genres))


class _ArrowStreamFiles(FileBasedDatasource):
    """The Arrow IPC stream files that `datasets.save_to_disk` writes, in blocks of a few tracks."""

    _ROWS_PER_BLOCK = 16

    def _read_stream(self, f, path):
        for batch in pa.ipc.open_stream(f):
            for start in range(0, batch.num_rows, self._ROWS_PER_BLOCK):
                yield pa.Table.from_batches([batch.slice(start, self._ROWS_PER_BLOCK)])


def _hf_rows_to_tracks(batch: pa.Table) -> pa.Table:
    audio = batch["audio"].combine_chunks()
    data = audio.field("bytes").to_pylist()
    names = audio.field("path").to_pylist()
    files = batch["path"].to_pylist()
    # the audio's own name where the dataset kept one, else its file and a hash of its bytes: stable, unique
    sources = [name or f"{file}#{hashlib.sha1(d or b'').hexdigest()[:12]}" for name, file, d in zip(names, files, data)]
    genres = batch["genre"] if "genre" in batch.column_names else pa.nulls(batch.num_rows, pa.string())
    return pa.table({"source": sources, "bytes": pa.array(data, pa.binary()), "genre": genres.cast(pa.string())},
                    schema=TRACK_SCHEMA)


def filter_genres(dataset: ray.data.Dataset, genres: list[str]) -> ray.data.Dataset:
    """Rows whose `genre` is one of `genres`; all rows when none are given."""
    if not genres:
        return dataset
    return dataset.filter(expr=col("genre").is_in(list(genres)), num_cpus=LIGHT_CPUS)


# work per track


class SpectrogramMaker:
    """Per actor: one codec; per track: decode, mono, resample, slice, mel, PNG, or a reject reason."""

    def __init__(self, mel: MelConfig, slices: str, seed: int):
        torch.set_num_threads(1)  # one actor per CPU
        self.codec = MelCodec(mel)
        self.slices = slices
        self.seed = seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = collections.defaultdict(list)
        for source, data, genre in zip(batch["source"].to_pylist(), batch["bytes"].to_pylist(),
                                       batch["genre"].to_pylist()):
            try:
                track = self._track(source, data)
                reason = None if track["slices"] else f"entirely silent ({track['silent']} silent slices)"
            except BadAudioError as e:
                track, reason = {"slices": [], "pngs": [], "silent": 0, "seconds": 0.0}, e.reason
            except Exception as e:  # noqa: BLE001 - one odd track must not take its batch down (RAY_NOTES.md)
                track, reason = {"slices": [], "pngs": [], "silent": 0, "seconds": 0.0}, \
                    f"unexpected error: {type(e).__name__}: {e}"
            for key, value in {"source": source, "genre": genre, "reason": reason, **track}.items():
                rows[key].append(value)
        return pa.table({"source": pa.array(rows["source"], pa.string()), "genre": pa.array(rows["genre"], pa.string()),
                         "reason": pa.array(rows["reason"], pa.string()), "seconds": rows["seconds"],
                         "silent": rows["silent"], "slices": pa.array(rows["slices"], pa.list_(pa.int16())),
                         "pngs": pa.array(rows["pngs"], pa.list_(pa.binary()))})

    def _track(self, source: str, data: bytes | None) -> dict:
        if data is None:
            raise BadAudioError(source, "no audio bytes in the dataset row")
        audio = load_audio(data, self.codec.config.sample_rate, source)
        images = self.codec.audio_to_images(audio)
        audible = (images.flatten(1).amin(dim=1) < 255).nonzero().flatten().tolist()  # silence is all white
        silent = images.shape[0] - len(audible)
        if self.slices == "random" and audible:
            rng = np.random.default_rng([self.seed, zlib.crc32(source.encode())])
            audible = [audible[rng.integers(len(audible))]]
        return {"slices": audible, "pngs": [png_bytes(images[i].numpy()) for i in audible], "silent": silent,
                "seconds": len(audio) / self.codec.config.sample_rate}


# output


class SpectrogramSink(Datasink):
    """Writes each task's good slices as one parquet part (whole or absent) and returns what it saw, so
    that the driver can write the rejects and the stats once everything is in."""

    def __init__(self, output: str, started: float):
        self.output = output
        self.started = started

    @property
    def min_rows_per_write(self) -> int:
        return 32  # tracks per part: about 150 slices of 30 s tracks, instead of many tiny parquet files

    def write(self, blocks, ctx) -> dict:
        slices, seen = [], {"tracks": [], "rejects": []}
        for block in blocks:
            for row in block.to_pylist():
                if row["reason"] is not None:
                    seen["rejects"].append((row["source"], row["reason"]))
                    continue
                seen["tracks"].append((row["genre"], row["seconds"], len(row["slices"]), row["silent"]))
                stem = posixpath.splitext(posixpath.basename(row["source"]))[0]
                slices.extend({"image": {"bytes": png, "path": f"{stem}_{i}.png"}, "audio_file": row["source"],
                               "slice": i, "genre": row["genre"]} for i, png in zip(row["slices"], row["pngs"]))
        if slices:
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(slices, schema=SLICE_SCHEMA), buffer)
            name = f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
            storage.write_bytes(storage.join(self.output, DATA_DIR, name), buffer.getvalue())
        return seen

    def on_write_complete(self, write_result) -> None:
        """On the driver, once every part is written: rejects.parquet, then stats.json."""
        tracks = [t for r in write_result.write_returns for t in r["tracks"]]
        rejects = [t for r in write_result.write_returns for t in r["rejects"]]
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{"source": s, "reason": r} for s, r in rejects], schema=REJECT_SCHEMA),
                       buffer)
        storage.write_bytes(storage.join(self.output, REJECTS), buffer.getvalue())
        per_genre = collections.defaultdict(lambda: {"tracks": 0, "slices": 0})
        for genre, _, n_slices, _ in tracks:
            per_genre[genre or "unknown"]["tracks"] += 1
            per_genre[genre or "unknown"]["slices"] += n_slices
        stats = {
            "tracks_read": len(tracks) + len(rejects),
            "tracks_written": len(tracks),
            "tracks_rejected": len(rejects),
            "slices_written": sum(t[2] for t in tracks),
            "silent_slices_skipped": sum(t[3] for t in tracks),
            "seconds_of_audio": round(sum(t[1] for t in tracks), 3),
            "per_genre": dict(sorted(per_genre.items())),
            "elapsed_seconds": round(time.time() - self.started, 3),
        }
        storage.write_bytes(storage.join(self.output, "stats.json"), (json.dumps(stats, indent=2) + "\n").encode())


def _prepare_output(config: PreprocessConfig) -> None:
    data = storage.join(config.output, DATA_DIR)
    parts = storage.list_files(data) if storage.exists(data) else []
    if parts and not config.overwrite:
        raise AudiodiffError(f"{config.output}: already holds a spectrogram dataset; "
                             "choose another --output or pass --overwrite")
    for part in parts:
        fs, path = storage.resolve(part)
        fs.delete_file(path)
    # written first: a bad or read-only output stops the job before any work
    storage.write_bytes(storage.join(config.output, "mel_config.json"), config.mel.to_json().encode())


def genre_table(counts: collections.Counter, selected: list[str]) -> str:
    lines = [f"{'genre':<24} {'tracks':>8}"]
    for genre, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
        mark = " *" if selected and genre in selected else ""
        lines.append(f"{genre or '(none)':<24} {n:>8}{mark}")
    lines.append(f"{'total':<24} {sum(counts.values()):>8}")
    return "\n".join(lines)


def run_preprocess(config: PreprocessConfig) -> dict:
    """Run the whole stage on the current Ray; returns the stats written to stats.json."""
    if config.slices not in ("all", "random"):
        raise AudiodiffError(f"--slices must be 'all' or 'random', got '{config.slices}'")
    if not config.sources:
        raise AudiodiffError("give at least one SOURCE")
    started = time.time()
    opened = [open_source(uri, config) for uri in config.sources]
    _prepare_output(config)
    counts = sum((o.genre_counts for o in opened), collections.Counter())
    print(genre_table(counts, config.genres), flush=True)
    missing = [g for g in config.genres if g not in counts]
    if missing:
        print(f"note: no tracks of genre {', '.join(missing)} in the sources", flush=True)
    tracks = opened[0].dataset.union(*[o.dataset for o in opened[1:]]) if len(opened) > 1 else opened[0].dataset
    if config.limit is not None:
        tracks = tracks.limit(config.limit)
    pool = (ray.data.ActorPoolStrategy(size=config.num_workers) if config.num_workers else
            ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(cluster_capacity("CPU")))))
    spectrograms = tracks.map_batches(
        SpectrogramMaker, fn_constructor_args=(config.mel, config.slices, config.seed),
        batch_size=config.tracks_per_batch, batch_format="pyarrow", num_cpus=ACTOR_CPUS, compute=pool,
    )
    spectrograms.write_datasink(SpectrogramSink(config.output, started), ray_remote_args={"num_cpus": LIGHT_CPUS})
    return json.loads(storage.read_bytes(storage.join(config.output, "stats.json")))
