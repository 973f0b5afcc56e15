"""The training data plan: what the driver works out before training (the held-out images, the run's sizes and
steps) and how each worker draws its micro-batches.

The images are decoded once, on Ray Data CPU workers, and stay uint8 until they reach the worker's device. A
dataset that fits in a quarter of each node's object store is materialised once for the whole run, its blocks
in file order: each worker reads them zero-copy and walks a permutation seeded by (seed, epoch), rank r taking
its share of every step, like torch's DistributedSampler: the order is the same on any run with one seed, and
a resumed run continues mid-epoch at the exact batch. A larger dataset streams through Ray Train's dataset
shards, its files in an order seeded per epoch and a local shuffle buffer seeded by (seed, epoch, rank); a
resume skips as many batches as the epoch had used. A small held-out part of the images (by a hash of
the track's file name and the slice) is never trained on: the quality figure compares samples against it.

A micro-batch's noise and timesteps come from a generator seeded by (seed, its slot in the run's global order
of micro-batches), so the random state of a run is its step count: a resumed run ends with the weights of an
uninterrupted one, also on another number of workers that keeps the global batch (per-worker batch x workers x
accumulation), since the images and noise of each slot stay the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
from ray.data.expressions import col

from audiodiff import devices, sampling
from audiodiff.dataset import decode_images, open_spectrograms, slice_key
from audiodiff.errors import AudiodiffError
from audiodiff.models import PipelineParts, load_model
from audiodiff.runtime import (ACTOR_CPUS, LIGHT_CPUS, cluster_capacity, largest_node, smallest_object_store,
                               worker_errors)

if TYPE_CHECKING:
    from audiodiff.train import TrainConfig

WARMUP_FRACTION = 0.1  # the default warm-up: at most this share of the run (and at most 500 steps)
HOLDOUT_FRACTION, MAX_HOLDOUT = 0.1, 256  # images kept out of training for the quality figure
OBJECT_STORE_SHARE = 0.25  # a dataset up to this share of the object store is held in it for the whole run


@dataclasses.dataclass
class RunPlan:
    """What the driver works out before training: sizes, steps and the data handed to the workers."""

    rows: int
    holdout_rows: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    cpus: float  # per worker
    in_memory: bool
    blocks: list | None  # refs of {column: array} blocks when the data is held in the object store
    where: np.ndarray | None  # (block, row) of each training image in the blocks, in an order no file layout changes
    holdout: object  # ref of uint8 [n, height, width]
    model_genres: list[str] | None = None  # a genre model's genres, in the order of its vectors (then the null one)

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def _holdout_keys(keys: list[str]) -> set[str]:
    """The rows kept out of training: the smallest hashes of their keys (slice_key), a fixed share of the data."""
    count = max(1, min(MAX_HOLDOUT, round(len(keys) * HOLDOUT_FRACTION)))
    return set(sorted(keys, key=lambda k: zlib.crc32(k.encode()))[:count])


def _flagged(dataset: ray.data.Dataset, keys: set[str], genres: list[str] | None) -> ray.data.Dataset:
    """The rows' `image`, `audio_file`, `slice` (and `genre` given `genres`) and `held_out`: whether the row's key is
    in `keys`. (This function's and `_decoded`'s steps name nothing of this module's: a Ray Data worker that runs
    them imports audiodiff.dataset, not torch's training stack and diffusers.)"""
    def flag(batch: pa.Table) -> pa.Table:
        held = [slice_key(a, s) in keys for a, s in zip(batch["audio_file"].to_pylist(), batch["slice"].to_pylist())]
        return batch.append_column("held_out", pa.array(held, pa.bool_()))

    keyed = ["image", "audio_file", "slice"] + (["genre"] if genres is not None else [])
    return dataset.select_columns(keyed).map_batches(flag, batch_format="pyarrow", num_cpus=LIGHT_CPUS)


def _split(flagged: ray.data.Dataset, held_out: bool) -> ray.data.Dataset:
    return flagged.filter(expr=col("held_out") == held_out, num_cpus=LIGHT_CPUS)


def _decoded(flagged: ray.data.Dataset, size: tuple[int, int], uri: str, genres: list[str] | None) -> ray.data.Dataset:
    """The flagged rows with their images decoded, each checked to be a PNG of `size` (an image that is not stops the
    run naming `uri` and its row); with `genres`, each row's `label` too: the index of its genre (`len(genres)`,
    the null vector's, for none)."""
    def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = {genre: i for i, genre in enumerate(genres or [])}
        labels = {"label": np.array([index.get(g, len(genres)) for g in batch["genre"]])} if genres is not None else {}
        kept = {name: batch[name] for name in ("audio_file", "slice", "held_out")}
        return {**decode_images(batch, size, uri), **kept, **labels}

    return flagged.map_batches(decode, num_cpus=LIGHT_CPUS)


def _training_rows(blocks: list[dict[str, np.ndarray]]) -> np.ndarray:
    """[rows, 2]: (block, row) of each training image, sorted by its key. Preprocess writes a track's slices in
    whichever order its workers finish, so the seeded shuffle starts from the keys' order (the full path only
    breaks ties between folders' same-named files), not the blocks'."""
    found = [(slice_key(a, s), a, b, r) for b, block in enumerate(blocks)
             for r, (a, s, held) in enumerate(zip(block["audio_file"], block["slice"], block["held_out"])) if not held]
    return np.array([(b, r) for *_, b, r in sorted(found, key=lambda f: f[:2])], np.int64).reshape(-1, 2)


class LatentDistributions:
    """A latent model's images -> their latent distributions (the VAE encoder's mean and log-variance, as
    `latent`), computed once before training on the workers' devices; each step draws its latents from them,
    as encoding every batch would (teticio's `train_unet.py --vae`), without running the encoder again."""

    def __init__(self, model: str, gpu: bool):
        devices.check_gpu_visible("finetune's latent encoder")
        devices.set_fp32_precision("fp32")
        self.device = torch.device("cuda" if gpu else "cpu")
        self.vqvae = load_model(model).vqvae.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = sampling.to_model_space(torch.from_numpy(batch.pop("image")).to(self.device))
        with torch.no_grad():
            moments = self.vqvae.encode(images.to(self.vqvae.dtype)).latent_dist.parameters
        return {**batch, "latent": moments.float().cpu().numpy()}


def _genre_names(rows: list[dict], parts: PipelineParts, model: str) -> list[str]:
    """A genre model's genres: those it was trained on, then the data's new ones."""
    if parts.cross_attention_dim is None:
        raise AudiodiffError(f"{model}: --condition genre needs a conditional UNet (UNet2DConditionModel); start from "
                             "a preset (tiny, full) or a model fine-tuned with --condition genre")
    known = parts.conditioning.names if parts.conditioning is not None else []
    found = sorted({r["genre"] for r in rows if r.get("genre")} - set(known))
    if not known and not found:
        raise AudiodiffError(f"{model}: --condition genre, but the data has no genres (its genre column is empty)")
    return [*known, *found]


def plan_run(config: TrainConfig, parts: PipelineParts) -> tuple[RunPlan, dict[str, ray.data.Dataset]]:
    """Splits off the held-out images, reads and decodes the training images once when they fit in the
    object store (else sets them up to stream) and sizes the run. Returns the plan and Ray Train's datasets."""
    data = open_spectrograms(config.data)  # listed once: object storage lists are recursive
    height, width = data.first_image_size()
    if (height, width) != parts.image_size:
        raise AudiodiffError(f"{config.data}: images are {height}x{width} but the model makes "
                             f"{parts.image_size[0]}x{parts.image_size[1]} (height x width); "
                             f"preprocess with --model {config.model}")
    if not {"audio_file", "slice"} <= set(data.columns):
        raise AudiodiffError(f"{config.data}: no audio_file and slice columns (columns: {', '.join(data.columns)}); "
                             "preprocess the audio with audiodiff")
    if config.condition == "genre" and "genre" not in data.columns:
        raise AudiodiffError(f"{config.data}: --condition genre, but the data has no genre column")
    keyed = ["audio_file", "slice"] + (["genre"] if config.condition == "genre" else [])
    rows = data.small_columns(keyed, config.only_genres).to_pylist()
    total_rows = len(rows)
    if total_rows == 0:
        raise AudiodiffError(f"{config.data}: no images of genre {', '.join(config.only_genres)}"
                             if config.only_genres else f"{config.data}: the dataset is empty")
    if total_rows == 1:
        raise AudiodiffError(f"{config.data}: one image; fine-tuning needs at least 2 (one is held out)")
    keys = _holdout_keys([slice_key(r["audio_file"], r["slice"]) for r in rows])
    genres = _genre_names(rows, parts, config.model) if config.condition == "genre" else None
    fits = total_rows * height * width < OBJECT_STORE_SHARE * smallest_object_store()
    # latents are made once and held, spilling to disk if they must: streaming would encode them every epoch
    in_memory = (fits and not config.stream) or parts.vqvae is not None
    # blocks in file order, so a seeded permutation picks the same images on every run
    with _ordered(), worker_errors():
        dataset = data.read(config.only_genres, shuffle_seed=None if not config.stream else config.seed)
        flagged = _flagged(dataset, keys, genres)
        datasets, blocks, where = {}, None, None
        if in_memory:  # one pass: the held-out images are picked from the materialised blocks
            decoded = _decoded(flagged, (height, width), config.data, genres).materialize()
            blocks = decoded.to_numpy_refs()
            fetched = ray.get(blocks)
            held = np.concatenate([block["image"][block["held_out"]] for block in fetched])
            if parts.vqvae is not None:  # the training rows' latents, in blocks of their own
                blocks = _split(decoded, False).map_batches(
                    LatentDistributions, fn_constructor_args=(config.model, config.gpu),
                    batch_size=config.batch_size, num_gpus=1 if config.gpu else 0,
                    num_cpus=1 if config.gpu else ACTOR_CPUS,
                    compute=ray.data.ActorPoolStrategy(size=config.num_workers)).materialize().to_numpy_refs()
                fetched = ray.get(blocks)
            where = _training_rows(fetched)
        else:
            held = np.stack([row["image"] for row in
                             _decoded(_split(flagged, True), (height, width), config.data, genres).take_all()])
            datasets["train"] = _decoded(_split(flagged, False), (height, width), config.data, genres)
    holdout = ray.put(held)
    rows = total_rows - len(held)
    per_step = config.batch_size * config.num_workers * config.grad_accum
    steps_per_epoch = rows // per_step
    if steps_per_epoch == 0:
        raise AudiodiffError(f"{config.data}: {rows} training images are fewer than one step needs "
                             f"({config.batch_size} x {config.num_workers} workers x {config.grad_accum} accumulation)")
    total = steps_per_epoch * config.epochs
    warmup = config.warmup_steps if config.warmup_steps is not None else min(500, int(WARMUP_FRACTION * total))
    # held in memory, the data needs no CPU while training runs: the workers take all of it
    cpus = config.cpus_per_worker or (1 if config.gpu else
                                      max(1, int(min(largest_node("CPU"), cluster_capacity("CPU") / config.num_workers)))
                                      if in_memory else 0.5)
    plan = RunPlan(rows=rows, holdout_rows=len(held), steps_per_epoch=steps_per_epoch, total_steps=total,
                   warmup_steps=warmup, cpus=cpus, in_memory=in_memory, blocks=blocks, where=where, holdout=holdout,
                   model_genres=genres)
    return plan, datasets


class InMemoryImages:
    """The training images (or latents, and labels) held in the object store, read zero-copy by every worker of
    a node."""

    SERVED = ("image", "latent", "label")

    def __init__(self, blocks: list, where: np.ndarray):
        self.blocks = ray.get(blocks)
        self.where = where  # image index -> (block, row)
        self.columns = [name for name in self.SERVED if name in self.blocks[0]]

    def batches(self, config: TrainConfig, plan: RunPlan, rank: int, world: int, epoch: int, first_step: int):
        """Rank `rank`'s micro-batches of one epoch from step `first_step` on: {column: array}, the images
        uint8 [batch, height, width]."""
        order = np.random.default_rng([config.seed, epoch]).permutation(len(self.where))
        per_step = config.batch_size * world * config.grad_accum
        for step in range(first_step, plan.steps_per_epoch):
            chosen = order[step * per_step:(step + 1) * per_step]
            chosen = chosen.reshape(config.grad_accum, world, config.batch_size)[:, rank]
            for micro in chosen:
                yield {name: np.stack([self.blocks[b][name][r] for b, r in self.where[micro]])
                       for name in self.columns}


@contextlib.contextmanager
def _ordered():
    """Ray Data keeps blocks in file order for datasets made (and materialised) inside."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def streamed_batches(config: TrainConfig, plan: RunPlan, rank: int, epoch: int, first_step: int):
    """Rank `rank`'s micro-batches of one epoch from its dataset shard, from step `first_step` on. The files
    come in an order seeded per epoch and a local buffer shuffles rows; which rows reach which worker depends on
    Ray Data's split, so a resumed epoch skips as many batches as were used, not the very same rows."""
    shard = ray.train.get_dataset_shard("train")
    seed = int(np.random.SeedSequence([config.seed, epoch, rank]).generate_state(1)[0])
    batches = shard.iter_batches(batch_size=config.batch_size, drop_last=True,
                                 local_shuffle_buffer_size=16 * config.batch_size, local_shuffle_seed=seed)
    skip, end = first_step * config.grad_accum, plan.steps_per_epoch * config.grad_accum
    index = -1
    for index, batch in enumerate(batches):
        if index >= end:
            return
        if index >= skip:
            yield batch
    if index + 1 < end:  # every rank must make the same number of steps (each report is a barrier)
        raise RuntimeError(f"rank {rank}'s shard ran out after {index + 1} of {end} batches in epoch {epoch}")


def micro_generator(seed: int, slot: int, device: torch.device) -> torch.Generator:
    """The generator of the micro-batch at `slot` of the run's global order (steps, then accumulation, then
    ranks: the order in which InMemoryImages lays out a step's images)."""
    state = np.random.SeedSequence([seed, slot]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state >> 1))
