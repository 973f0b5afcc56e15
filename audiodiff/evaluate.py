"""A quality figure for generated audio: the Fréchet distance between embeddings of clips and of a reference.

Like FID and FAD: embed many short stretches of each set, fit a Gaussian to each set's vectors, and measure
the Fréchet distance between the two Gaussians (0 for identical statistics; larger is worse). The pure functions
(`mel_embedding`, `embedding_statistics`, `frechet_distance`) need no Ray and no I/O, so the fine-tune loop can
score its EMA samples against held-out training images; `run_evaluate` does the same for whole collections
on Ray Data.

Inputs (`--clips`, `--reference`; local, file://, s3://, gs://):
- a generate output (`manifest.parquet`): its clips' WAV files, so clips of any model and mel config compare;
- a folder (or one file) of audio, recursively: every format preprocess reads (`audio.AUDIO_EXTENSIONS`);
- a spectrogram dataset from `audiodiff preprocess` (`mel_config.json`, `data/part-*.parquet`): its images.

Everything is brought to mel images of one config: a spectrogram dataset's `mel_config.json` when either side
is one (both must then agree), else diffusers' defaults, `MelConfig()` (256 mels, 22050 Hz, 256-frame slices).
Audio is decoded, resampled and cut into that config's slices by the codec, as preprocess does.

A user's embedding (`--embedding model.pt`) is a TorchScript module (`torch.jit.save`; loaded with
`torch.jit.load`). That is not a pickle, but a program that runs with the user's rights, as PyTorch's security
policy says of TorchScript: only a file the user trusts. It receives float32 audio [batch, samples] at its
`sample_rate` attribute (16000 Hz when it has none): each audio file is cut into segments as long as the config's
mel slices (zero padded when shorter than one), a file's segments in one batch; a spectrogram slice is turned back
into audio by the codec's Griffin-Lim, as generated clips are. It returns [batch, dim] or [batch, n, dim]; every
vector counts.

A file that does not decode, an audio file longer than `max_seconds` (rejected whole, not cut) or an image that
is not the dataset's size is skipped and reported in `rejected`; the run carries on. A side with fewer than two vectors stops the run.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from ray.data.expressions import col, lit

from audiodiff import checks, ownership, progress, storage
from audiodiff.audio import AUDIO_EXTENSIONS, folder_genre, load_audio, resample
from audiodiff.dataset import spectrogram_files
from audiodiff.encode import png_image
from audiodiff.errors import AudiodiffError, BadAudioError
from audiodiff.mel import MelCodec, MelConfig
from audiodiff.runtime import LIGHT_CPUS, check_paths_reachable, cluster_capacity

# The built-in embedding (see `mel_embedding`): levels in 32 bands, texture and onsets in 16, per window of
# 16 frames (0.37 s at 22050 Hz, hop 512: a note or a beat).
LEVEL_BANDS = 32
DYNAMICS_BANDS = 16
WINDOW_FRAMES = 16
MEL_DIM = LEVEL_BANDS + 2 * DYNAMICS_BANDS
DEFAULT_SAMPLE_RATE = 16000  # for an embedding module without a `sample_rate` attribute (VGGish's rate)
_ITEMS = pa.schema([("side", pa.string()), ("source", pa.string()), ("data", pa.binary()), ("is_image", pa.bool_()),
                    ("genre", pa.string())])
_VECTORS = pa.schema([("side", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                      ("vectors", pa.list_(pa.list_(pa.float32()))), ("genre", pa.string())])


@dataclasses.dataclass
class EvaluateConfig:
    clips: str
    reference: str
    embedding: str = "mel"  # "mel", or the path or URI of a TorchScript embedding module
    output: str | None = None  # where the result goes as JSON
    by_genre: bool = False  # also the distance of each genre's clips to each genre's reference
    # longer audio files are rejects (not cut): a file is decoded whole into a worker's memory, 159 MB at 30 min
    max_seconds: float = 30 * 60
    shared_path: bool = False  # local --clips and --reference that every node of a multi-node cluster mounts

    def __post_init__(self):
        """The checks that need no data and no cluster (audiodiff.checks)."""
        checks.finite(self)
        checks.positive(self, "max_seconds")
        for name in ("clips", "reference", "embedding"):
            if not getattr(self, name):
                raise AudiodiffError(f"{checks.flag(self, name)} is empty; give a path or URI")


# the pure functions


def mel_embedding(images: torch.Tensor | np.ndarray, config: MelConfig) -> np.ndarray:
    """uint8 mel images [batch, y_res, width] (as the models make them and `MelCodec.audio_to_images` cuts
    them) -> float32 vectors [batch * (width // 16), 64], one per window of 16 frames, image by image.

    Per window, in dB below the image's loudest bin (what the image's grey levels encode, so a clip's
    loudness does not matter):
    - the mean level in 32 bands of equal mel width: the spectral envelope (timbre, register, noise vs tones);
    - the level's standard deviation over the window in 16 bands: texture (steady drone vs moving notes);
    - the mean rise from frame to frame in 16 bands (spectral flux): onsets (drums, plucked notes).
    These are the hand-made features music-genre classification started from (envelope, texture windows,
    flux), so they tell apart what a listener would: white noise is loud and flat in every band, silence is
    one level everywhere, a drone is steady in a few low bands, beats rise sharply in the low and the noise
    bands, an arpeggio in its note's harmonics. The bands are pooled from the image's mel bins, so 64-bin
    (tiny) and 256-bin (full) images land in one space (near, not on, each other: shorter slices and wider
    filters shift the levels a little); 64 dimensions keep the covariance estimable from a few hundred
    vectors. Distances come out in dB squared. Needs no trained weights.
    """
    images = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))  # may be read-only
    if images.ndim != 3 or images.shape[1] != config.y_res:
        raise ValueError(f"mel_embedding takes images [batch, {config.y_res}, width], got {tuple(images.shape)}")
    db = images.float() * (config.top_db / 255.0) - config.top_db
    window = min(WINDOW_FRAMES, db.shape[-1])
    windows = db.shape[-1] // window

    def bands(count: int) -> torch.Tensor:  # [batch, count, windows, window]
        pooled = torch.nn.functional.adaptive_avg_pool2d(db[:, None], (count, db.shape[-1]))[:, 0]
        return pooled[..., :windows * window].unflatten(-1, (windows, window))

    coarse = bands(DYNAMICS_BANDS)
    features = torch.cat([bands(LEVEL_BANDS).mean(-1), coarse.std(-1, correction=0),
                          coarse.diff(dim=-1).clamp_min(0).mean(-1)], dim=1)  # [batch, 64, windows]
    return features.transpose(1, 2).reshape(-1, features.shape[1]).cpu().numpy()


def embedding_statistics(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectors [n, dim] -> their mean [dim] and covariance [dim, dim], in float64."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) < 2:
        raise ValueError(f"embedding_statistics needs at least 2 vectors [n, dim], got shape {vectors.shape}")
    return vectors.mean(axis=0), np.cov(vectors, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between two Gaussians: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

    The trace of the square root is taken through symmetric eigen decompositions, of S1 and then of
    S1^1/2 S2 S1^1/2 (which has the eigenvalues of S1 S2), with eigenvalues clamped at 0: exact for the
    rank-deficient covariances of fewer vectors than dimensions, where the usual scipy `sqrtm` of S1 S2 goes
    complex or unstable. Rounding can leave a hair below 0 for equal statistics; the result is at least 0.
    """
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    product = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.linalg.eigvalsh((product + product.T) / 2).clip(min=0)).sum()
    distance = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root
    return max(float(distance), 0.0)


# embeddings, per worker


class _MelEmbedding:
    """The built-in embedding: audio -> the config's mel slices -> `mel_embedding`."""

    def __init__(self, mel: MelConfig):
        self.codec = MelCodec(mel)
        self.sample_rate = mel.sample_rate

    def of_audio(self, audio: np.ndarray) -> np.ndarray:
        return mel_embedding(self.codec.audio_to_images(audio), self.codec.config)

    def of_images(self, images: np.ndarray) -> list[np.ndarray]:
        return list(mel_embedding(images, self.codec.config).reshape(len(images), -1, MEL_DIM))


class _ScriptedEmbedding:
    """A user's TorchScript module on audio segments as long as the config's mel slices."""

    def __init__(self, model: bytes, mel: MelConfig, source: str):
        try:
            self.module = torch.jit.load(io.BytesIO(model), map_location="cpu").eval()
        except RuntimeError as e:
            raise AudiodiffError(f"{source}: not a TorchScript module saved with torch.jit.save "
                                 f"({str(e).strip().splitlines()[0]})") from None
        self.source = source
        self.sample_rate = int(getattr(self.module, "sample_rate", DEFAULT_SAMPLE_RATE))
        self.segment = round(mel.slice_size * self.sample_rate / mel.sample_rate)
        self.codec = MelCodec(mel)

    def of_audio(self, audio: np.ndarray) -> np.ndarray:
        audio = np.pad(audio, (0, max(0, self.segment - len(audio))))
        segments = audio[:len(audio) // self.segment * self.segment].reshape(-1, self.segment)
        with torch.no_grad():
            out = self.module(torch.from_numpy(segments))
        if not isinstance(out, torch.Tensor) or out.ndim not in (2, 3) or out.shape[0] != len(segments):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise AudiodiffError(f"{self.source}: an embedding module must map audio [batch, samples] to "
                                 f"[batch, dim] or [batch, n, dim]; it gave {shape} for {tuple(segments.shape)}")
        return out.reshape(-1, out.shape[-1]).float().numpy()

    def of_images(self, images: np.ndarray) -> list[np.ndarray]:
        audio = self.codec.images_to_audio(images).numpy()
        return [self.of_audio(resample(a, self.codec.config.sample_rate, self.sample_rate)) for a in audio]


def _embedding(model: bytes | None, mel: MelConfig, source: str) -> _MelEmbedding | _ScriptedEmbedding:
    return _MelEmbedding(mel) if model is None else _ScriptedEmbedding(model, mel, source)


class _Embedder:
    """Per actor (or task): the embedding, built once; per batch: each item's vectors, or the reason it has none.

    Rows in: `side`, `source`, `data` (an audio file, or a spectrogram's PNG), `is_image` (whether a PNG).
    Rows out: `side`, `source`, `reason` (None when embedded), `vectors` (a list of vectors, empty if none)."""

    def __init__(self, model: bytes | None, mel: MelConfig, source: str, max_seconds: float | None = None):
        torch.set_num_threads(1)  # several workers share the CPUs
        self.embedding = _embedding(model, mel, source)
        self.mel = mel
        self.max_seconds = max_seconds

    def __call__(self, batch: pa.Table) -> pa.Table:
        sources, data = batch["source"].to_pylist(), batch["data"].to_pylist()
        vectors, reasons, images = [[] for _ in sources], [None] * len(sources), {}
        for i, (source, item, is_image) in enumerate(zip(sources, data, batch["is_image"].to_pylist())):
            try:
                if is_image:
                    images[i] = self._decode(item, source)
                else:
                    audio = load_audio(item, self.embedding.sample_rate, source, self.max_seconds)
                    vectors[i] = self.embedding.of_audio(audio)
            except Exception as e:  # noqa: BLE001 - one odd file must not take its batch down (RAY_NOTES.md)
                reasons[i] = _reason(e)
        if images:  # embedded together: one batched Griffin-Lim for a user's embedding
            try:
                for i, v in zip(images, self.embedding.of_images(np.stack(list(images.values())))):
                    vectors[i] = v
            except Exception as e:  # noqa: BLE001 - as above
                for i in images:
                    reasons[i] = _reason(e)
        return pa.table({"side": batch["side"], "source": sources, "reason": reasons,
                         "vectors": [list(v) for v in vectors], "genre": batch["genre"]}, schema=_VECTORS)

    def _decode(self, png: bytes, source: str) -> np.ndarray:
        return png_image(png, source, (self.mel.y_res, self.mel.x_res))


def _reason(error: Exception) -> str:
    return error.reason if isinstance(error, BadAudioError) else f"unexpected error: {type(error).__name__}: {error}"


# inputs


@dataclasses.dataclass
class _Side:
    """One input, opened: what it is, its files, and a spectrogram dataset's mel config."""

    name: str  # "clips" or "reference", as the flags
    uri: str
    unit: str  # what an item is: "clips" (generate output), "files" (audio) or "slices" (spectrograms)
    files: list[str]
    mel: MelConfig | None = None
    genres: dict[str, str] = dataclasses.field(default_factory=dict)  # file -> genre, where the data has none


def _open_side(name: str, uri: str) -> _Side:
    if not storage.exists(uri):
        raise AudiodiffError(f"--{name} {uri}: not found")
    mel_json = storage.join(uri, "mel_config.json")
    manifest = storage.join(uri, "manifest.parquet")
    if storage.exists(mel_json):
        mel = MelConfig.from_json(storage.read_text(mel_json), mel_json)
        parts = spectrogram_files(uri)  # refuses a dataset that preprocess did not finish
        fs, path = storage.resolve(parts[0])
        try:
            columns = pq.read_schema(path, filesystem=fs).names
        except (OSError, pa.ArrowInvalid) as e:
            raise AudiodiffError(f"--{name} {parts[0]}: not readable parquet ({e})") from None
        if "image" not in columns:
            raise AudiodiffError(f"--{name} {parts[0]}: no 'image' column (columns: {', '.join(columns)})")
        return _Side(name, uri, "slices", parts, mel)
    if storage.exists(manifest):
        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(manifest)))
            wavs = table["wav"].to_pylist()
        except (OSError, pa.ArrowInvalid, KeyError) as e:
            raise AudiodiffError(f"--{name} {manifest}: not a generate manifest with a 'wav' column ({e})") from None
        if not wavs:
            raise AudiodiffError(f"--{name} {manifest}: lists no clips")
        files = [storage.join(uri, *wav.split("/")) for wav in wavs]
        genres = table["genre"].to_pylist() if "genre" in table.column_names else [None] * len(files)
        return _Side(name, uri, "clips", files, genres={f: g for f, g in zip(files, genres) if g})
    files = storage.list_files(uri, AUDIO_EXTENSIONS) if storage.is_dir(uri) else [uri]
    if not files:
        raise AudiodiffError(f"--{name} {uri}: no audio files (chosen by extension: README.md, 'Audio formats'), "
                             "generate output (manifest.parquet) or spectrogram dataset (mel_config.json) there")
    # audio: a file's genre is the name of its folder, as preprocess --genre-from-folder takes it
    return _Side(name, uri, "files", files, genres={f: folder_genre(f) for f in files})


def _evaluation_mel(sides: list[_Side]) -> MelConfig:
    configs = {side.mel for side in sides if side.mel is not None}
    if len(configs) > 1:
        raise AudiodiffError(f"--clips {sides[0].uri} and --reference {sides[1].uri} are spectrogram datasets of "
                             f"different mel configs ({sides[0].mel} vs {sides[1].mel}); compare one with the "
                             "other's audio, or make both with one config")
    return configs.pop() if configs else MelConfig()


# on Ray


def _items(side: _Side) -> ray.data.Dataset:
    """One side's files as `_Embedder`'s rows: an audio file, or a spectrogram slice, per row. Reshaped by
    expressions, which Ray evaluates in its own read tasks (no import of this module and torch there)."""
    fs = storage.resolve(side.files[0])[0]
    paths = [storage.resolve(f)[1] for f in side.files]
    if side.unit == "slices":
        rows = ray.data.read_parquet(paths, filesystem=fs, num_cpus=LIGHT_CPUS)
        has_genre = "genre" in pq.read_schema(paths[0], filesystem=fs).names
        items = {"source": col("image").struct.field("path"), "data": col("image").struct.field("bytes"),
                 "is_image": lit(True), "genre": col("genre") if has_genre else lit("")}
    else:  # the genres of files are the side's own (`_Side.genres`), set on the driver
        rows = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True, num_cpus=LIGHT_CPUS)
        items = {"source": col("path"), "data": col("bytes"), "is_image": lit(False), "genre": lit("")}
    return rows.with_columns({"side": lit(side.name), **items}, num_cpus=LIGHT_CPUS).select_columns(_ITEMS.names)


def _embed(sides: list[_Side], model: bytes | None, mel: MelConfig, source: str, max_seconds: float) -> pa.Table:
    """Both sides' items through the embedding; their rows, collected on the driver. The built-in embedding
    has nothing worth keeping between batches (its codec takes milliseconds to build), so it runs as tasks on
    the worker processes Ray keeps warm; a user's module is loaded once per actor."""
    if model is None:
        udf = {"fn": _embed_with_mel, "fn_args": (mel, max_seconds)}
    else:
        actors = max(1, int(cluster_capacity("CPU", cpu_only=True)))
        udf = {"fn": _Embedder, "fn_constructor_args": (model, mel, source, max_seconds),
               "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=actors)}
    embedded = _items(sides[0]).union(_items(sides[1])).map_batches(
        **udf, batch_size=8, batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    batches = []
    with progress.Progress("evaluate", sum(map(_item_count, sides)), "items") as embedding:
        for batch in embedded.iter_batches(batch_size=None, batch_format="pyarrow"):
            batches.append(batch)
            embedding.advance(batch.num_rows)
    return pa.concat_tables(batches)


def _item_count(side: _Side) -> int:
    """A side's items: its files, or a spectrogram dataset's slices (from its parquet footers)."""
    if side.unit != "slices":
        return len(side.files)
    fs = storage.resolve(side.files[0])[0]
    return sum(pq.read_metadata(storage.resolve(f)[1], filesystem=fs).num_rows for f in side.files)


def _embed_with_mel(batch: pa.Table, mel: MelConfig, max_seconds: float) -> pa.Table:
    return _Embedder(None, mel, "mel", max_seconds)(batch)


def _side_vectors(rows: pa.Table, side: _Side) -> tuple[np.ndarray, np.ndarray, dict, list[dict]]:
    """One side's rows (one per item) -> its vectors [n, dim], each vector's genre ("" for none), its summary,
    and its rejects (sources named by the URIs given)."""
    rows = rows.filter(pc.equal(rows["side"], side.name))
    per_vector = rows["vectors"].combine_chunks().flatten()
    values = np.asarray(per_vector.flatten(), dtype=np.float32)
    vectors = values.reshape(len(per_vector), -1) if len(per_vector) else values.reshape(0, 0)
    uris = {storage.resolve(f)[1]: f for f in side.files}
    item_genres = [genre or side.genres.get(uris.get(source), "")
                   for source, genre in zip(rows["source"].to_pylist(), rows["genre"].to_pylist())]
    counts = [len(v) for v in rows["vectors"].to_pylist()]
    genres = np.repeat(np.array(item_genres, dtype=object), counts) if counts else np.array([], dtype=object)
    rejected = [{"side": side.name, "source": uris.get(r["source"], r["source"]), "reason": r["reason"]}
                for r in rows.filter(pc.is_valid(rows["reason"])).select(["source", "reason"]).to_pylist()]
    summary = {"uri": side.uri, "unit": side.unit, "items": len(rows), "vectors": len(vectors)}
    return vectors, genres, summary, rejected


def by_genre(clips: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray]) -> dict:
    """{clips' genre: {reference's genre: Fréchet distance}} over the genres with at least 2 vectors on a side."""
    def groups(vectors, genres):
        return {g: vectors[genres == g] for g in sorted(set(genres) - {""}) if (genres == g).sum() >= 2}

    ours, theirs = groups(*clips), groups(*reference)
    statistics = {g: embedding_statistics(v) for g, v in theirs.items()}
    return {g: {r: frechet_distance(*embedding_statistics(v), *statistics[r]) for r in theirs}
            for g, v in ours.items()}


def run_evaluate(config: EvaluateConfig) -> dict:
    """Embed both sides on the current Ray, then the Fréchet distance; returns (and writes to
    `config.output` as JSON) the distance, what was compared, and what was rejected."""
    if config.output and storage.exists(config.output) and \
            (ownership.read_record(config.output) or {}).get(ownership.WRITTEN_BY) != ownership.mark("evaluate"):
        raise AudiodiffError(f"--output {config.output}: a file `audiodiff evaluate` did not write; it replaces only "
                             "its own results: choose another --output")
    sides = [_open_side("clips", config.clips), _open_side("reference", config.reference)]
    mel = _evaluation_mel(sides)
    if config.embedding != "mel" and not storage.exists(config.embedding):
        raise AudiodiffError(f"--embedding {config.embedding}: not found; give 'mel' or a TorchScript module's file")
    model = None if config.embedding == "mel" else storage.read_bytes(config.embedding)
    if model is not None:  # a module that does not load or gives the wrong shape stops here, before any worker
        _ScriptedEmbedding(model, mel, config.embedding).of_audio(np.zeros(1, np.float32))
    check_paths_reachable(config.shared_path, inputs=[config.clips, config.reference])  # the workers read both
    rows = _embed(sides, model, mel, config.embedding, config.max_seconds)
    summaries, statistics, rejected, labelled = {}, [], [], []
    for side in sides:
        vectors, genres, summaries[side.name], side_rejected = _side_vectors(rows, side)
        labelled.append((vectors, genres))
        rejected += side_rejected
        if len(vectors) < 2:
            reasons = "; ".join(f"{r['source']}: {r['reason']}" for r in side_rejected[:3])
            raise AudiodiffError(f"--{side.name} {side.uri}: {len(vectors)} embedding vectors, at least 2 needed"
                                 + (f" ({len(side_rejected)} rejected: {reasons})" if side_rejected else ""))
        statistics.append(embedding_statistics(vectors))
    result = {ownership.WRITTEN_BY: ownership.mark("evaluate"),
              "frechet_distance": frechet_distance(*statistics[0], *statistics[1]), "embedding": config.embedding,
              "mel_config": dataclasses.asdict(mel), **summaries, "rejected": rejected}
    if config.by_genre:
        result["by_genre"] = by_genre(*labelled)
        if not result["by_genre"]:
            raise AudiodiffError(f"--by-genre: no genre has clips in {config.clips} and reference in "
                                 f"{config.reference} (genres come from the manifest's genre column, a dataset's "
                                 "genre column or an audio file's folder)")
    if config.output:
        storage.write_bytes(config.output, (json.dumps(result, indent=2) + "\n").encode())
    return result


def summary_line(result: dict, config: EvaluateConfig) -> str:
    clips, reference = result["clips"], result["reference"]
    rejected = f", {len(result['rejected'])} files rejected" if result["rejected"] else ""
    matrix = "".join(f"\n  {genre} clips to reference " + ", ".join(f"{r} {d:.2f}" for r, d in row.items())
                     for genre, row in result.get("by_genre", {}).items())
    return (f"evaluate: Fréchet distance {result['frechet_distance']:.2f} ({config.embedding} embedding) between "
            f"{clips['items']} {clips['unit']} and {reference['items']} reference {reference['unit']}{rejected}"
            + (f" -> {config.output}" if config.output else "") + matrix)
