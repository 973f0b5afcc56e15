"""Quality figures for generated audio, on Ray Data: the Fréchet and the kernel distance between embeddings of
clips and of a reference, and the floors that make them readable.

Like FID and FAD: embed many short stretches of each set, fit a Gaussian to each set's vectors, and measure
the Fréchet distance between the two Gaussians (0 for identical statistics; larger is worse); beside it the
kernel distance of the same vectors (unbiased MMD^2, as the Kernel Audio Distance: about 0 for two draws of
one distribution, usable with few clips). The pure functions are in `audiodiff.metrics`, which the fine-tune
loop uses too; `run_evaluate` embeds whole collections.

Floors (unless `no_floors`), each scored with both figures, and the clips' figures as multiples of them:
- `reference_halves`: the reference against itself, split in two by track (file, or a dataset's audio_file),
  what two sets of real music of this kind score against each other;
- `rendered_reference`: the reference rendered through the clips' own codec and vocoder (audio -> the clips'
  model's mel slices -> Griffin-Lim -> audio, embedded as the clips are), against the reference: the best
  figure clips of that mel config can reach. Its codec is the generate output's model (the manifest's model
  column), a spectrogram dataset's mel config, or `clips_model`; for plain audio clips without it, none.

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
import ray
import torch
from ray.data.expressions import col, lit

from audiodiff import checks, memorisation, ownership, progress, storage
from audiodiff.audio import AUDIO_EXTENSIONS, folder_genre, load_audio, resample
from audiodiff.dataset import Spectrograms, decode_image, mel_config, open_spectrograms
from audiodiff.errors import AudiodiffError, BadAudioError
from audiodiff.mel import MelCodec, MelConfig
from audiodiff.metrics import (MEL_DIM, distances, embedding_statistics, frechet_distance, halves, kernel_distance,
                               median_bandwidth, mel_embedding)
from audiodiff.model_files import load_mel_config
from audiodiff.outputs import MANIFEST, output_file, read_manifest
from audiodiff.runtime import LIGHT_CPUS, check_paths_reachable, cluster_capacity

DEFAULT_SAMPLE_RATE = 16000  # for an embedding module without a `sample_rate` attribute (VGGish's rate)
_ITEMS = pa.schema([("side", pa.string()), ("source", pa.string()), ("data", pa.binary()), ("is_image", pa.bool_()),
                    ("genre", pa.string()), ("track", pa.string())])
_VECTORS = pa.schema([("side", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                      ("vectors", pa.list_(pa.list_(pa.float32()))), ("genre", pa.string()), ("track", pa.string())])
RENDERED = "rendered"  # the side of the reference rendered through the clips' codec and vocoder


@dataclasses.dataclass
class EvaluateConfig:
    clips: str
    reference: str | None = None  # None: the memorisation check alone (`training`)
    embedding: str = "mel"  # "mel", or the path or URI of a TorchScript embedding module
    output: str | None = None  # where the result goes as JSON
    by_genre: bool = False  # also the distance of each genre's clips to each genre's reference
    # longer audio files are rejects (not cut): a file is decoded whole into a worker's memory, 159 MB at 30 min
    max_seconds: float = 30 * 60
    shared_path: bool = False  # local --clips and --reference that every node of a multi-node cluster mounts

    clips_model: str | None = None  # the model whose codec made the clips, for audio clips without a manifest
    no_floors: bool = False  # skip the floors (the reference's halves, the reference through the clips' codec)
    training: str | None = None  # a spectrogram dataset: each clip's nearest training slice (audiodiff.memorisation)

    def __post_init__(self):
        """The checks that need no data and no cluster (audiodiff.checks)."""
        checks.finite(self)
        checks.positive(self, "max_seconds")
        for name in ("clips", "reference", "embedding", "training"):
            if getattr(self, name) == "":
                raise AudiodiffError(f"{checks.flag(self, name)} is empty; give a path or URI")
        if self.reference is None and self.training is None:
            raise AudiodiffError("give --reference (the quality figures), --training (the memorisation check) or both")



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

    def __init__(self, model: bytes | None, mel: MelConfig, source: str, max_seconds: float | None = None,
                 render: MelConfig | None = None):
        torch.set_num_threads(1)  # several workers share the CPUs
        self.embedding = _embedding(model, mel, source)
        self.mel = mel
        self.max_seconds = max_seconds
        self.render = render  # the clips' mel config, for the RENDERED side's items

    def __call__(self, batch: pa.Table) -> pa.Table:
        sources, data = batch["source"].to_pylist(), batch["data"].to_pylist()
        vectors, reasons, images = [[] for _ in sources], [None] * len(sources), {}
        rendered = batch["side"].to_pylist()
        for i, (source, item, is_image) in enumerate(zip(sources, data, batch["is_image"].to_pylist())):
            try:
                if rendered[i] == RENDERED:
                    vectors[i] = self._rendered(self._decode(item, source) if is_image else None, item, source)
                elif is_image:
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
                         "vectors": [list(v) for v in vectors], "genre": batch["genre"], "track": batch["track"]},
                        schema=_VECTORS)

    def _rendered(self, image: np.ndarray | None, audio_file: bytes, source: str) -> np.ndarray:
        """An item through the clips' codec and vocoder, each slice embedded as a clip of its own is. An image
        already of the clips' config needs only the vocoder."""
        render, codec = MelCodec(self.render), MelCodec(self.mel)
        if image is not None and self.render == self.mel:
            slices = codec.images_to_audio(image[None]).numpy()
        else:
            audio = (load_audio(audio_file, self.render.sample_rate, source, self.max_seconds) if image is None else
                     resample(codec.images_to_audio(image[None])[0].numpy(), self.mel.sample_rate,
                              self.render.sample_rate))
            slices = render.images_to_audio(render.audio_to_images(audio)).numpy()
        rate = self.embedding.sample_rate
        return np.concatenate([self.embedding.of_audio(resample(a, self.render.sample_rate, rate)) for a in slices])

    def _decode(self, png: bytes, source: str) -> np.ndarray:
        return decode_image(png, source, (self.mel.y_res, self.mel.x_res))


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
    file_genres: dict[str, str] = dataclasses.field(default_factory=dict)  # file -> genre, where the data has none
    codec: MelConfig | None = None  # clips: the mel config of the model that made them, where known
    spectrograms: Spectrograms | None = None  # unit "slices": the dataset, opened


def _open_side(name: str, uri: str) -> _Side:
    if not storage.exists(uri):
        raise AudiodiffError(f"--{name} {uri}: not found")
    manifest = storage.join(uri, MANIFEST)
    mel = mel_config(uri)
    if mel is not None:
        try:
            data = open_spectrograms(uri)  # refuses a dataset that preprocess did not finish
        except AudiodiffError as e:
            raise AudiodiffError(f"--{name} {e}") from None
        if "image" not in data.columns:
            raise AudiodiffError(f"--{name} {data.files[0]}: no 'image' column (columns: {', '.join(data.columns)})")
        return _Side(name, uri, "slices", data.files, mel, codec=mel, spectrograms=data)
    if storage.exists(manifest):
        try:
            table = read_manifest(uri)
            wavs = table["wav"].to_pylist()
        except (OSError, pa.ArrowInvalid, KeyError) as e:
            raise AudiodiffError(f"--{name} {manifest}: not a generate manifest with a 'wav' column ({e})") from None
        if not wavs:
            raise AudiodiffError(f"--{name} {manifest}: lists no clips")
        files = [output_file(uri, wav) for wav in wavs]
        genres = table["genre"].to_pylist() if "genre" in table.column_names else [None] * len(files)
        models = set(table["model"].to_pylist()) if "model" in table.column_names else set()
        codec = _model_mel(models.pop(), f"--{name} {manifest}: its model") if len(models) == 1 else None
        return _Side(name, uri, "clips", files, file_genres={f: g for f, g in zip(files, genres) if g}, codec=codec)
    files = storage.list_files(uri, AUDIO_EXTENSIONS) if storage.is_dir(uri) else [uri]
    if not files:
        raise AudiodiffError(f"--{name} {uri}: no audio files (chosen by extension: README.md, 'Audio formats'), "
                             "generate output (manifest.parquet) or spectrogram dataset (mel_config.json) there")
    # audio: a file's genre is the name of its folder, as preprocess --genre-from-folder takes it
    return _Side(name, uri, "files", files, file_genres={f: folder_genre(f) for f in files})


def _model_mel(model: str, named: str) -> MelConfig:
    try:
        return load_mel_config(model)
    except (AudiodiffError, OSError) as e:
        raise AudiodiffError(f"{named} {model}: its mel config is not readable ({e}); give --clips-model, the "
                             "model (or a copy of it) that made the clips, or --no-floors") from None


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
    if side.unit == "slices":
        rows, names = side.spectrograms.read(), side.spectrograms.columns
        items = {"source": col("image").struct.field("path"), "data": col("image").struct.field("bytes"),
                 "is_image": lit(True), "genre": col("genre") if "genre" in names else lit(""),
                 "track": col("audio_file") if "audio_file" in names else lit("")}
    else:  # the genres of files are the side's own (`_Side.file_genres`), set on the driver
        fs = storage.resolve(side.files[0])[0]
        rows = ray.data.read_binary_files([storage.resolve(f)[1] for f in side.files], filesystem=fs,
                                          include_paths=True, num_cpus=LIGHT_CPUS)
        items = {"source": col("path"), "data": col("bytes"), "is_image": lit(False), "genre": lit(""),
                 "track": col("path")}
    return rows.with_columns({"side": lit(side.name), **items}, num_cpus=LIGHT_CPUS).select_columns(_ITEMS.names)


def _embed(sides: list[_Side], model: bytes | None, mel: MelConfig, source: str, max_seconds: float,
           render: MelConfig | None) -> pa.Table:
    """The sides' items through the embedding (the RENDERED side's through `render` first); their rows,
    collected on the driver. The built-in embedding has nothing worth keeping between batches (its codec takes
    milliseconds to build), so it runs as tasks on the worker processes Ray keeps warm; a user's module is loaded
    once per actor."""
    if model is None:
        udf = {"fn": _embed_with_mel, "fn_args": (mel, max_seconds, render)}
    else:
        actors = max(1, int(cluster_capacity("CPU", cpu_only=True)))
        udf = {"fn": _Embedder, "fn_constructor_args": (model, mel, source, max_seconds, render),
               "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=actors)}
    embedded = _items(sides[0]).union(*[_items(side) for side in sides[1:]]).map_batches(
        **udf, batch_size=8, batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    batches = []
    with progress.Progress("evaluate", sum(map(_item_count, sides)), "items") as embedding:
        for batch in embedded.iter_batches(batch_size=None, batch_format="pyarrow"):
            batches.append(batch)
            embedding.advance(batch.num_rows)
    return pa.concat_tables(batches)


def _item_count(side: _Side) -> int:
    """A side's items: its files, or a spectrogram dataset's slices."""
    return side.spectrograms.count() if side.unit == "slices" else len(side.files)


def _embed_with_mel(batch: pa.Table, mel: MelConfig, max_seconds: float, render: MelConfig | None) -> pa.Table:
    return _Embedder(None, mel, "mel", max_seconds, render)(batch)


def _side_vectors(rows: pa.Table, side: _Side) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, list[dict]]:
    """One side's rows (one per item) -> its vectors [n, dim], each vector's genre ("" for none) and track,
    its summary, and its rejects (sources named by the URIs given)."""
    rows = rows.filter(pc.equal(rows["side"], side.name))
    per_vector = rows["vectors"].combine_chunks().flatten()
    values = np.asarray(per_vector.flatten(), dtype=np.float32)
    vectors = values.reshape(len(per_vector), -1) if len(per_vector) else values.reshape(0, 0)
    uris = {storage.resolve(f)[1]: f for f in side.files}
    item_genres = [genre or side.file_genres.get(uris.get(source), "")
                   for source, genre in zip(rows["source"].to_pylist(), rows["genre"].to_pylist())]
    counts = [len(v) for v in rows["vectors"].to_pylist()]
    genres = np.repeat(np.array(item_genres, dtype=object), counts) if counts else np.array([], dtype=object)
    tracks = np.repeat(np.array([t or s for t, s in zip(rows["track"].to_pylist(), rows["source"].to_pylist())],
                                dtype=object), counts) if counts else np.array([], dtype=object)
    rejected = [{"side": side.name, "source": uris.get(r["source"], r["source"]), "reason": r["reason"]}
                for r in rows.filter(pc.is_valid(rows["reason"])).select(["source", "reason"]).to_pylist()]
    summary = {"uri": side.uri, "unit": side.unit, "items": len(rows), "vectors": len(vectors)}
    return vectors, genres, tracks, summary, rejected


def by_genre(clips: tuple[np.ndarray, np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray, np.ndarray],
             bandwidth: float) -> tuple[dict, dict]:
    """(vectors, genres, tracks) of each side -> {clips' genre: {reference's genre: Fréchet distance}} over the
    genres with at least 2 vectors on a side, and the same of the kernel distance (with one kernel, the whole
    reference's, for every cell)."""
    def groups(vectors, genres, tracks):
        return {g: (vectors[genres == g], tracks[genres == g]) for g in sorted(set(genres) - {""})
                if (genres == g).sum() >= 2}

    ours, theirs = groups(*clips), groups(*reference)
    statistics = {g: embedding_statistics(v) for g, (v, _) in theirs.items()}
    return ({g: {r: frechet_distance(*embedding_statistics(v), *statistics[r]) for r in theirs}
             for g, (v, _) in ours.items()},
            {g: {r: kernel_distance(v, theirs[r][0], bandwidth, t, theirs[r][1]) for r in theirs}
             for g, (v, t) in ours.items()})


def _floors(reference: np.ndarray, tracks: np.ndarray, rendered: np.ndarray | None, rendered_tracks: np.ndarray,
            codec: MelConfig | None, bandwidth: float) -> dict:
    """Both figures of the reference's halves against each other, and of the rendered reference against the
    reference; None for a floor that cannot be had (too few vectors, no codec known)."""
    floors = {"reference_halves": None, "rendered_reference": None}
    first = halves(len(reference), tracks)
    if first is not None:
        floors["reference_halves"] = {
            **distances(reference[first], reference[~first], bandwidth, tracks[first], tracks[~first]),
            "split": "tracks" if len(set(tracks)) >= 2 else "vectors",
            "vectors": [int(first.sum()), int((~first).sum())]}
    if rendered is not None and len(rendered) >= 2:
        floors["rendered_reference"] = {**distances(rendered, reference, bandwidth, rendered_tracks, tracks),
                                        "mel_config": dataclasses.asdict(codec), "vectors": len(rendered)}
    return floors


def _above(result: dict) -> dict:
    """The clips' figures as multiples of each floor's (None where the floor is not above 0)."""
    return {name: {figure: result[figure] / floor[figure] if floor[figure] > 0 else None
                   for figure in ("frechet_distance", "kernel_distance")}
            for name, floor in result["floors"].items() if floor is not None}


def run_evaluate(config: EvaluateConfig) -> dict:
    """The quality figures (with --reference) and the memorisation check (with --training) on the current Ray;
    returns (and writes to `config.output` as JSON) them."""
    if config.output and storage.exists(config.output) and \
            (ownership.read_record(config.output) or {}).get(ownership.WRITTEN_BY) != ownership.mark("evaluate"):
        raise AudiodiffError(f"--output {config.output}: a file `audiodiff evaluate` did not write; it replaces only "
                             "its own results: choose another --output")
    result = (_figures(config) if config.reference else
              {ownership.WRITTEN_BY: ownership.mark("evaluate"), "output": config.output})
    if config.training:
        check_paths_reachable(config.shared_path, inputs=[config.clips, config.training])
        clips, mel = memorisation.clip_images(config.clips, config.training)
        result["memorisation"] = memorisation.check_clips(clips, config.training, mel)
    if config.output:
        storage.write_bytes(config.output, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _figures(config: EvaluateConfig) -> dict:
    """Embed both sides (and the rendered reference, for its floor), then both figures and the floors, what was
    compared, and what was rejected."""
    sides = [_open_side("clips", config.clips), _open_side("reference", config.reference)]
    if config.clips_model:
        sides[0].codec = _model_mel(config.clips_model, "--clips-model")
    mel = _evaluation_mel(sides)
    if config.embedding != "mel" and not storage.exists(config.embedding):
        raise AudiodiffError(f"--embedding {config.embedding}: not found; give 'mel' or a TorchScript module's file")
    model = None if config.embedding == "mel" else storage.read_bytes(config.embedding)
    if model is not None:  # a module that does not load or gives the wrong shape stops here, before any worker
        _ScriptedEmbedding(model, mel, config.embedding).of_audio(np.zeros(1, np.float32))
    check_paths_reachable(config.shared_path, inputs=[config.clips, config.reference])  # the workers read both
    render = None if config.no_floors else sides[0].codec
    embedded = sides + ([dataclasses.replace(sides[1], name=RENDERED)] if render is not None else [])
    rows = _embed(embedded, model, mel, config.embedding, config.max_seconds, render)
    summaries, vectors, tracks, rejected, labelled = {}, {}, {}, [], []
    for side in sides:
        vectors[side.name], genres, tracks[side.name], summaries[side.name], side_rejected = _side_vectors(rows, side)
        labelled.append((vectors[side.name], genres, tracks[side.name]))
        rejected += side_rejected
        if len(vectors[side.name]) < 2:
            reasons = "; ".join(f"{r['source']}: {r['reason']}" for r in side_rejected[:3])
            raise AudiodiffError(f"--{side.name} {side.uri}: {len(vectors[side.name])} embedding vectors, at least "
                                 "2 needed" + (f" ({len(side_rejected)} rejected: {reasons})" if side_rejected else ""))
    bandwidth = median_bandwidth(vectors["reference"])
    result = {ownership.WRITTEN_BY: ownership.mark("evaluate"),
              "frechet_distance": frechet_distance(*embedding_statistics(vectors["clips"]),
                                                   *embedding_statistics(vectors["reference"])),
              "kernel_distance": kernel_distance(vectors["clips"], vectors["reference"], bandwidth, tracks["clips"],
                                                 tracks["reference"]),
              "kernel_bandwidth": bandwidth, "embedding": config.embedding, "mel_config": dataclasses.asdict(mel),
              "output": config.output, **summaries}
    if not config.no_floors:
        rendered, _, rendered_tracks, _, rendered_rejected = (_side_vectors(rows, embedded[2]) if render is not None
                                                              else (None,) * 4 + ([],))
        known = {r["source"] for r in rejected}
        rejected += [r for r in rendered_rejected if r["source"] not in known]  # a reference file's own is reported
        result["floors"] = _floors(vectors["reference"], tracks["reference"], rendered, rendered_tracks, render,
                                   bandwidth)
        result["above_floors"] = _above(result)
    result["rejected"] = rejected
    if config.by_genre:
        result["by_genre"], result["by_genre_kernel"] = by_genre(*labelled, bandwidth)
        if not result["by_genre"]:
            raise AudiodiffError(f"--by-genre: no genre has clips in {config.clips} and reference in "
                                 f"{config.reference} (genres come from the manifest's genre column, a dataset's "
                                 "genre column or an audio file's folder)")
    return result


def summary_line(result: dict) -> str:
    copies = f"\n  {memorisation.summary(result['memorisation'])}" if "memorisation" in result else ""
    if "frechet_distance" not in result:
        return f"evaluate: {copies.strip()}" + (f" -> {result['output']}" if result["output"] else "")
    return _figures_line(result) + copies


def _figures_line(result: dict) -> str:
    clips, reference = result["clips"], result["reference"]
    rejected = f", {len(result['rejected'])} files rejected" if result["rejected"] else ""
    matrix = "".join(f"\n  {genre} clips to reference " + ", ".join(f"{r} {d:.2f}" for r, d in row.items())
                     for genre, row in result.get("by_genre", {}).items())
    floors = "".join(f"\n  floor: {FLOOR_NAMES[name]}: " + _floor_text(floor, result["above_floors"].get(name), name)
                     for name, floor in result.get("floors", {}).items())
    return (f"evaluate: Fréchet distance {result['frechet_distance']:.2f}, kernel distance "
            f"{result['kernel_distance']:.4f} ({result['embedding']} embedding) between {clips['items']} {clips['unit']} "
            f"and {reference['items']} reference {reference['unit']}{rejected}"
            + (f" -> {result['output']}" if result["output"] else "") + floors + matrix)


FLOOR_NAMES = {"reference_halves": "the reference's halves against each other",
               "rendered_reference": "the reference through the clips' codec and Griffin-Lim"}


def _floor_text(floor: dict | None, above: dict | None, name: str) -> str:
    if floor is None:
        return "not measured (" + ("a half has fewer than 2 vectors" if name == "reference_halves" else
                                   "the clips' codec is unknown: give --clips-model") + ")"
    ratio = above["frechet_distance"]
    return (f"Fréchet {floor['frechet_distance']:.2f}, kernel {floor['kernel_distance']:.4f}; the clips' Fréchet "
            f"distance is " + (f"{ratio:.1f}x it" if ratio is not None else "above a floor of 0"))
