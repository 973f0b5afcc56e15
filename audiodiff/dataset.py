"""The spectrogram dataset: its format, the writer preprocess uses and the reader (`open_spectrograms`) that
finetune and evaluate use.

Our layout under one URI (DESIGN.md, "Spectrogram dataset"):
```
mel_config.json          the codec's numbers, written first
data/part-*.parquet      image {bytes: PNG grayscale, path}, audio_file, slice (int16), genre (string|null)
rejects.parquet          source, reason
stats.json               counts; written last: without it the dataset is incomplete and readers refuse it
```
The reader also takes teticio's spectrogram datasets: parquet files anywhere under the URI (as the hub keeps them),
or a `datasets.save_to_disk` folder (`dataset_dict.json` + a split folder of Arrow stream files, or one split's
`state.json`), locally, on object storage or on the hub (`hf://datasets/...`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import posixpath
import re
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import FileShuffleConfig
from ray.data.datasource import Datasink, FileBasedDatasource
from ray.data.expressions import col

from audiodiff import ownership, storage
from audiodiff.encode import png_image
from audiodiff.errors import AudiodiffError
from audiodiff.runtime import LIGHT_CPUS

if TYPE_CHECKING:
    from audiodiff.mel import MelConfig

SLICE_SCHEMA = pa.schema(
    [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("audio_file", pa.string()),
     ("slice", pa.int16()), ("genre", pa.string())],
    # datasets reads these features, so `load_dataset("parquet", ...)` gives a working Image column
    metadata={"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "audio_file": {"dtype": "string", "_type": "Value"},
        "slice": {"dtype": "int16", "_type": "Value"}, "genre": {"dtype": "string", "_type": "Value"}}}}),
        **ownership.SCHEMA_MARK},
)
REJECT_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string())], metadata=ownership.SCHEMA_MARK)
DATA_DIR = "data"  # the parquet parts; rejects and stats sit beside it so "all parts" never includes them
REJECTS = "rejects.parquet"
STATS = "stats.json"
MEL_CONFIG = "mel_config.json"


# writing


class SpectrogramSink(Datasink):
    """Writes each task's good slices as one parquet part (whole or absent) and returns what it saw, so
    that the driver can write the rejects and the stats once everything is in.

    A part is named by the tracks it holds, so a write that Ray retries (its worker died after writing, before
    reporting) writes the same file again instead of a second copy beside it.

    Rows in: `source`, `genre`, `reason` (None for a good track), `seconds`, `silent`, `slices` (indices),
    `pngs` (one PNG per index)."""

    def __init__(self, output: str, started: float, skipped_by_extension: dict | None = None):
        self.output = output
        self.started = started
        self.skipped_by_extension = skipped_by_extension or {}  # files of a source not read for their type

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
            tracks = "\n".join(sorted({s["audio_file"] for s in slices}))
            name = f"part-{hashlib.sha256(tracks.encode()).hexdigest()[:20]}.parquet"
            storage.write_bytes(storage.join(self.output, DATA_DIR, name), buffer.getvalue())
        return seen

    def on_write_complete(self, write_result) -> None:
        """On the driver, once every part is written: rejects.parquet, then stats.json."""
        tracks = [t for r in write_result.write_returns for t in r["tracks"]]
        rejects = [t for r in write_result.write_returns for t in r["rejects"]]
        write_rejects(self.output, [{"source": s, "reason": r} for s, r in rejects])
        per_genre = collections.defaultdict(lambda: {"tracks": 0, "slices": 0})
        for genre, _, n_slices, _ in tracks:
            per_genre[genre or "unknown"]["tracks"] += 1
            per_genre[genre or "unknown"]["slices"] += n_slices
        stats = {
            ownership.WRITTEN_BY: ownership.mark("preprocess"),
            "tracks_read": len(tracks) + len(rejects),
            "tracks_written": len(tracks),
            "tracks_rejected": len(rejects),
            "slices_written": sum(t[2] for t in tracks),
            "silent_slices_skipped": sum(t[3] for t in tracks),
            "seconds_of_audio": round(sum(t[1] for t in tracks), 3),
            "per_genre": dict(sorted(per_genre.items())),
            "skipped_by_extension": dict(sorted(self.skipped_by_extension.items())),
            "elapsed_seconds": round(time.time() - self.started, 3),
        }
        storage.write_bytes(storage.join(self.output, STATS), (json.dumps(stats, indent=2) + "\n").encode())


def write_rejects(output: str, rejects: list[dict]) -> None:
    """`rejects.parquet` (REJECT_SCHEMA rows: the input and why it was not used) under `output`."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), buffer)
    storage.write_if_changed(storage.join(output, REJECTS), buffer.getvalue())


def prepare_output(output: str, mel_config_json: str, overwrite: bool) -> None:
    """Makes `output` ready for a new dataset: refuses a folder holding anything but a dataset preprocess wrote
    (ownership.check_only_ours), and one already there unless `overwrite`; removes the stats first (so a reader
    never takes a half-replaced dataset for complete), then the old parts, and writes the mel config (a bad or
    read-only output stops the job here, before any work)."""
    ours = ownership.check_only_ours(output, "preprocess", lambda f: _is_dataset_file(output, f, mel_config_json))
    if [f for f in ours if f != MEL_CONFIG] and not overwrite:
        raise AudiodiffError(f"{output}: already holds a spectrogram dataset; "
                             "choose another --output or pass --overwrite")
    for relative in sorted(ours, key=lambda f: f != STATS):
        if relative not in (MEL_CONFIG, REJECTS):  # both are replaced whole below and at the end
            storage.delete(storage.join(output, *relative.split("/")))
    storage.write_bytes(storage.join(output, MEL_CONFIG), mel_config_json.encode())


_PART = re.compile(rf"^{DATA_DIR}/part-[0-9a-f]{{20}}\.parquet$")


def _is_dataset_file(output: str, relative: str, mel_config_json: str) -> bool:
    """Whether a file under `output` is one preprocess wrote there, by its content; a mel config counts as ours
    beside a dataset preprocess wrote, or when it holds what this run writes."""
    uri = storage.join(output, *relative.split("/"))
    if relative == STATS:
        return (ownership.read_record(uri) or {}).get(ownership.WRITTEN_BY) == ownership.mark("preprocess")
    if relative == REJECTS:
        return ownership.is_our_parquet(uri, REJECT_SCHEMA)
    if _PART.match(relative):
        return ownership.is_our_parquet(uri, SLICE_SCHEMA)
    if relative == MEL_CONFIG and not ownership.is_link(uri):
        if storage.read_bytes(uri) == mel_config_json.encode():
            return True
        data = storage.join(output, DATA_DIR)
        parts = [f"{DATA_DIR}/{f.rsplit('/', 1)[-1]}" for f in storage.list_files(data)] \
            if storage.is_dir(data) and not ownership.is_link(data) else []
        beside = [f for f in (STATS, REJECTS) if storage.exists(storage.join(output, f))] + parts
        return any(_is_dataset_file(output, f, mel_config_json) for f in beside)
    return False


def read_stats(output: str) -> dict:
    return storage.read_json(storage.join(output, STATS))


# reading


class ArrowStreamFiles(FileBasedDatasource):
    """The Arrow IPC stream files that `datasets.save_to_disk` writes, in blocks of a few rows."""

    _ROWS_PER_BLOCK = 16

    def _read_stream(self, f, path):
        for batch in pa.ipc.open_stream(f):
            for start in range(0, batch.num_rows, self._ROWS_PER_BLOCK):
                yield pa.Table.from_batches([batch.slice(start, self._ROWS_PER_BLOCK)])


def saved_dataset_files(uri: str, split: str = "train") -> list[str]:
    """The Arrow files of one split of a `datasets.save_to_disk` folder (a DatasetDict or a single Dataset),
    read from its own index files, so that object storage works as a local disk does."""
    damaged = "; a damaged datasets.save_to_disk folder: save the dataset again"
    if storage.exists(storage.join(uri, "dataset_dict.json")):
        splits = storage.read_json(storage.join(uri, "dataset_dict.json"), damaged).get("splits")
        if not isinstance(splits, list):
            raise AudiodiffError(f"{storage.join(uri, 'dataset_dict.json')}: lists no splits{damaged}")
        if split not in splits:
            raise AudiodiffError(f"{uri}: no split '{split}' (splits: {', '.join(map(str, splits))})")
        uri = storage.join(uri, split)
    state = storage.join(uri, "state.json")
    try:
        return [storage.join(uri, f["filename"]) for f in storage.read_json(state, damaged)["_data_files"]]
    except (KeyError, TypeError):
        raise AudiodiffError(f"{state}: lists no data files (_data_files){damaged}") from None


def is_saved_dataset(uri: str) -> bool:
    return any(storage.exists(storage.join(uri, marker)) for marker in ("state.json", "dataset_dict.json"))


def spectrogram_files(uri: str) -> list[str]:
    """The files holding a dataset's images: our parts (only once the dataset is complete), a saved
    dataset's Arrow files, or every parquet file under the URI (teticio's layout)."""
    if not storage.exists(uri):
        raise AudiodiffError(f"{uri}: no such dataset")
    if is_saved_dataset(uri):
        return saved_dataset_files(uri)
    # ours has mel_config.json, written first, and stats.json, written last; the hub's parquet layout has neither
    if storage.exists(storage.join(uri, MEL_CONFIG)) and not storage.exists(storage.join(uri, STATS)):
        raise AudiodiffError(f"{uri}: incomplete spectrogram dataset (no {STATS}: preprocess did not finish); "
                             "run preprocess again with --overwrite")
    parts = storage.join(uri, DATA_DIR)
    root = parts if storage.exists(parts) else uri
    files = [f for f in storage.list_files(root, (".parquet",)) if not f.endswith(REJECTS)]
    if not files:
        raise AudiodiffError(f"{uri}: no parquet files; run `audiodiff preprocess` first")
    return files


@dataclasses.dataclass(frozen=True)
class Spectrograms:
    """A spectrogram dataset, opened once: its files listed (a recursive LIST on object storage) and its columns
    read a single time, for every reader (finetune's plan, evaluate)."""

    uri: str
    files: list[str]
    columns: list[str]

    def _check_can_choose(self, genres: list[str]) -> None:
        if genres and "genre" not in self.columns:
            raise AudiodiffError(f"{self.uri}: has no genre column, so --genre cannot choose; leave it out to use "
                                 "every image")

    def read(self, genres: list[str] = (), shuffle_seed: int | None = None) -> ray.data.Dataset:
        """The rows (`image`, and `audio_file`/`slice`/`genre` where present) as a Ray dataset, optionally of some
        genres only, optionally with the files in an order seeded by `shuffle_seed` and the execution (each epoch
        of a streamed fine-tune another order)."""
        self._check_can_choose(genres)
        fs = storage.resolve(self.files[0])[0]
        paths = [storage.resolve(f)[1] for f in self.files]
        shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
        if self.files[0].endswith(".parquet"):
            dataset = read_parquet(paths, filesystem=fs, shuffle=shuffle)
        else:
            dataset = ray.data.read_datasource(ArrowStreamFiles(paths, filesystem=fs, shuffle=shuffle),
                                               num_cpus=LIGHT_CPUS)
        return filter_genres(dataset, genres)

    def small_columns(self, names: list[str], genres: list[str] = ()) -> pa.Table:
        """Some columns of every row (of some genres only, given `genres`), read here without Ray: the small ones
        that plan a fine-tune (the parquet files' other columns stay unread)."""
        self._check_can_choose(genres)
        wanted = list(dict.fromkeys([*names, *(["genre"] if genres else [])]))

        def columns_of(file: str) -> pa.Table:
            fs, path = storage.resolve(file)
            try:
                if path.endswith(".parquet"):
                    return pq.read_table(path, filesystem=fs, columns=wanted)
                with fs.open_input_stream(path) as f:
                    return pa.ipc.open_stream(f).read_all().select(wanted)
            except (OSError, KeyError, pa.ArrowInvalid) as e:
                raise AudiodiffError(f"{file}: not a part of a spectrogram dataset ({type(e).__name__}: {e}); "
                                     "preprocess the audio again") from None

        # the files at once: on object storage each is a round trip or more
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            table = pa.concat_tables(pool.map(columns_of, self.files))
        return table.filter(pc.is_in(table["genre"], pa.array(list(genres)))) if genres else table

    def first_image_size(self) -> tuple[int, int]:
        """(height, width) of the first image, read without starting Ray; checks the format."""
        fs, path = storage.resolve(self.files[0])
        try:
            if path.endswith(".parquet"):
                column = pq.ParquetFile(path, filesystem=fs).read_row_group(0, columns=["image"])["image"]
            else:
                with fs.open_input_stream(path) as f:  # the first batch only, not the whole shard
                    column = pa.ipc.open_stream(f).read_next_batch().column("image")
            height, width = png_image(column[0]["bytes"].as_py(), f"{self.uri}: the first image").shape
        except (OSError, KeyError, IndexError, StopIteration, pa.ArrowInvalid) as e:
            raise AudiodiffError(f"{self.uri}: not a spectrogram dataset ({type(e).__name__}: {e})") from None
        return height, width

    def count(self) -> int:
        """How many images, from the parquet footers (or the Arrow files' batches), without starting Ray."""
        total = 0
        for file in self.files:
            fs, path = storage.resolve(file)
            if path.endswith(".parquet"):
                total += pq.read_metadata(path, filesystem=fs).num_rows
            else:
                with fs.open_input_stream(path) as f:
                    total += sum(batch.num_rows for batch in pa.ipc.open_stream(f))
        return total


def mel_config(uri: str) -> MelConfig | None:
    """The codec's numbers a dataset's images were made with (mel_config.json, written first); teticio's datasets
    have none."""
    from audiodiff.mel import MelConfig  # here: the codec's torch import would slow every Ray Data step of this module

    path = storage.join(uri, MEL_CONFIG)
    return MelConfig.from_json(storage.read_text(path), path) if storage.exists(path) else None


def open_spectrograms(uri: str) -> Spectrograms:
    """The dataset at `uri` (ours, complete, or teticio's), opened; refuses what is not one, naming it."""
    files = spectrogram_files(uri)
    # the first file's schema, not Dataset.schema(): on Arrow stream files that starts a read and cancels it
    fs, path = storage.resolve(files[0])
    try:
        if path.endswith(".parquet"):
            columns = pq.read_schema(path, filesystem=fs).names
        else:
            with fs.open_input_stream(path) as f:
                columns = pa.ipc.open_stream(f).schema.names
    except (OSError, pa.ArrowInvalid) as e:
        raise AudiodiffError(f"{uri}: not a spectrogram dataset ({type(e).__name__}: {e})") from None
    return Spectrograms(uri, files, columns)


def slice_key(audio_file: str, slice_index: int) -> str:
    """A slice's name by its track's file name, not its folder: finetune's held-out split and training order key the
    rows by it, so that the same tracks split alike wherever they lie (the demo's genres came out apart or not
    depending on its output folder)."""
    return f"{posixpath.basename(audio_file)}#{slice_index}"


def decode_image(png: bytes, name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """One image of the dataset: uint8 [height, width], checked to be a PNG of `size` (height, width) before it
    is decoded; BadImageError naming `name` otherwise."""
    return png_image(png, name, size)


def decode_images(batch: dict[str, np.ndarray], size: tuple[int, int] | None = None, uri: str = "") -> dict[str, np.ndarray]:
    """PNG bytes -> uint8 [batch, height, width]; images stay uint8 until they reach the accelerator. Each image
    is checked against `size` (height, width) before it is decoded; one that is not a PNG of that size raises
    BadImageError naming the dataset `uri` and the row (its audio_file and slice, or the image's path)."""
    names = ([f"{a}#{i}" for a, i in zip(batch["audio_file"], batch["slice"])] if "audio_file" in batch else
             [item.get("path") or "an image without a path" for item in batch["image"]])
    return {"image": np.stack([decode_image(item["bytes"], f"{uri}: {name}", size)
                               for item, name in zip(batch["image"], names)])}


def read_parquet(paths: list[str], **options) -> ray.data.Dataset:
    """`ray.data.read_parquet` of files already listed, on Ray Data's first parquet path: its second lists them
    again in a task (1.4-3.8 s against 0.1-0.6 s for the demo's dataset) whose threads race at the end and at times
    print an InterruptedError traceback into the job's log (ray-project/ray#64388). Sets the process's current
    DataContext, so Ray Data's later parquet reads here take the first path too."""
    ray.data.DataContext.get_current().use_datasource_v2 = False
    return ray.data.read_parquet(paths, num_cpus=LIGHT_CPUS, **options)


def filter_genres(dataset: ray.data.Dataset, genres: list[str]) -> ray.data.Dataset:
    """Rows whose `genre` is one of `genres`; all rows when none are given."""
    if not genres:
        return dataset
    return dataset.filter(expr=col("genre").is_in(list(genres)), num_cpus=LIGHT_CPUS)
