"""Fine-tuning: DDPM noise-prediction training of the UNet with Ray Train (DDP; NCCL on GPUs, gloo on CPU).

`train_loop_per_worker` is the notebook's loop with DDP, autocast (`--precision`, audiodiff.devices: bf16 on
CUDA and on CPUs with native bf16), gradient accumulation and clipping, a warm-up + decay schedule, EMA,
samples and checkpoints added in plain sight.

Data. The images are decoded once, on Ray Data CPU workers, and stay uint8 until they reach the worker's
device. A dataset that fits in a quarter of each node's object store is materialised once for the whole run,
its blocks in file order: each worker reads them zero-copy and walks a permutation seeded by (seed, epoch),
rank r taking its share of every step, like torch's DistributedSampler: the order is the same on any run with
one seed, and a resumed run continues mid-epoch at the exact batch. A larger dataset streams through Ray
Train's dataset shards, its files in an order seeded per epoch and a local shuffle buffer seeded by (seed,
epoch, rank); a resume skips as many batches as the epoch had used. A small held-out part of the images (by a
hash of (audio_file, slice)) is never trained on: the quality figure compares samples against it.

Randomness. A micro-batch's noise and timesteps come from a generator seeded by (seed, its slot in the run's
global order of micro-batches), so the random state of a run is its step count: a resumed run ends with the
weights of an uninterrupted one, also on another number of workers that keeps the global batch (per-worker
batch x workers x accumulation), since the images and noise of each slot stay the same.

DDP: gradients are bucket views and, without accumulation, the graph is static (torch 2.11's static graph
breaks no_sync, pytorch/pytorch#143580); `--grad-compression bf16` halves the all-reduced bytes between nodes.

A checkpoint holds `unet/` (live weights), `ema/` (diffusers' EMAModel.save_pretrained), `optimizer.pt`
and `lr_schedule.pt` (CPU tensors, loaded with weights_only onto the worker's device) and `state.json` (step,
the run's configuration, metrics). Rank 0 writes it and Ray Train uploads it on a thread of its own while
training goes on. The exported pipeline carries the EMA weights and the scheduler class the model came with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
import warnings
import zlib

import numpy as np
import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import logging as diffusers_logging
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from ray.data.expressions import col
from ray.train.v2._internal.execution import context as train_context  # its logger is named by its file

from audiodiff import checks, devices, ownership, progress, sampling, storage
from audiodiff.dataset import columns, decode_images, first_image_size, read_spectrograms
from audiodiff.errors import AudiodiffError
from audiodiff.metrics import (embedding_statistics, frechet_distance, halves, kernel_distance, median_bandwidth,
                               mel_embedding)
from audiodiff.mel import MelCodec
from audiodiff.models import Conditioning, PipelineParts, load_model, save_model
from audiodiff.outputs import PEAK_DBFS, clip_row, encode_clip, write_clip, write_manifest_and_gallery
from audiodiff.runtime import (ACTOR_CPUS, LIGHT_CPUS, check_paths_reachable, cluster_capacity, largest_node, require_gpus,
                               smallest_object_store, worker_errors)

RUN_NAME = "finetune"
GENRES_STATE = "genres.pt"  # a genre model's checkpointed vectors and their EMA
LR_SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup", "linear": "linear"}
WARMUP_FRACTION = 0.1  # the default warm-up: at most this share of the run (and at most 500 steps)
HOLDOUT_FRACTION, MAX_HOLDOUT = 0.1, 256  # images kept out of training for the quality figure
OBJECT_STORE_SHARE = 0.25  # a dataset up to this share of the object store is held in it for the whole run
# Fields that do not change what a run computes; every other field must match on --resume.
RESUMABLE_CHANGES = {"output", "resume", "max_failures", "checkpoint_every", "log_every", "sample_every",
                     "num_samples", "sample_scheduler", "sample_steps", "stop_at_step", "cpus_per_worker",
                     "shared_path"}
# Stochastic DDIM (the samples' eta): a briefly trained model's deterministic (eta 0) DDIM samples are noise
# These may change on --resume as long as the global batch (batch_size x num_workers x grad_accum) stays.
WORLD_CHANGES = {"num_workers", "grad_accum"}
GRAD_COMPRESSIONS = ("none", "bf16")
# Stochastic DDIM (the samples' eta): a briefly trained model's deterministic (eta 0) DDIM samples are noise
# texture where eta 1 (or DDPM) shows the spectra it has learned (measured on the demo's tiny model).
SAMPLE_ETA = 1.0
log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig:
    data: str
    model: str
    output: str
    num_workers: int = 1
    gpu: bool = False
    precision: str = "auto"  # autocast of the forward pass; auto is resolved here, on the driver
    cpus_per_worker: float | None = None  # default: 1 with --gpu; else the CPUs left once data is ready
    epochs: int = 3
    batch_size: int = 4  # per worker
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_steps: int | None = None  # default: min(500, WARMUP_FRACTION of the run)
    adam_beta1: float = 0.95  # teticio's defaults
    adam_beta2: float = 0.999
    weight_decay: float = 1e-6
    grad_accum: int = 1
    grad_compression: str = "none"  # "bf16": DDP all-reduces bf16 gradients (for DDP between nodes)
    max_grad_norm: float = 1.0
    ema_max_decay: float = 0.9999
    checkpoint_every: int = 500  # optimizer steps
    log_every: int = 10
    sample_every: int = 500  # optimizer steps; samples and the quality figure also come at the end
    num_samples: int = 8
    sample_scheduler: str = "ddim"  # the samples' sampler (audiodiff.sampling.SAMPLERS)
    sample_steps: int = 20
    seed: int = 0
    genres: list[str] = dataclasses.field(default_factory=list)
    condition: str | None = None  # "genre": one model for every genre of the data, steerable by --genre
    label_dropout: float = 0.1  # share of images trained with the null vector (classifier-free guidance)
    stream: bool = False  # stream the data even if it would fit in the object store
    resume: bool = False
    stop_at_step: int | None = None  # end this run there (checkpointed); --resume continues it
    max_failures: int = 0
    shared_path: bool = False  # a local --output that every node of a multi-node cluster mounts

    def __post_init__(self):
        """The checks that need no data, no model and no cluster (audiodiff.checks)."""
        self.precision = devices.resolve_precision(self.precision, self.gpu)  # the rule: audiodiff.devices
        checks.finite(self)
        devices.check_precision(self.precision, self.gpu)
        if self.precision == "fp16":
            raise AudiodiffError("--precision fp16 trains only with loss scaling, which finetune does not do; use bf16 "
                                 "(the default with --gpu) or fp32")
        checks.at_least(self, 1, "num_workers", "batch_size", "epochs", "grad_accum", "log_every", "sample_every",
                        "checkpoint_every", "num_samples", "sample_steps", "stop_at_step")
        checks.at_least(self, 0, "seed", "warmup_steps")
        checks.positive(self, "lr", "cpus_per_worker")
        checks.one_of(self, "lr_schedule", sorted(LR_SCHEDULES))
        checks.one_of(self, "grad_compression", GRAD_COMPRESSIONS)
        sampling.check_scheduler(self.sample_scheduler)
        if self.condition not in (None, "genre"):
            raise AudiodiffError(f"--condition must be 'genre', got '{self.condition}'")
        if not 0 <= self.label_dropout < 1:
            raise AudiodiffError(f"--label-dropout must lie in [0, 1), got {self.label_dropout}")

    @property
    def checkpoints(self) -> str:
        return storage.join(self.output, "checkpoints")


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
    holdout: object  # ref of uint8 [n, height, width]
    genres: list[str] | None = None  # a genre model's genres, in the order of their vectors (then the null one)

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


# data


def _row_key(audio_file: str, slice_index: int) -> str:
    return f"{audio_file}#{slice_index}"


def _holdout_keys(rows: list[dict]) -> set[str]:
    """The rows kept out of training: the smallest hashes of (audio_file, slice), a fixed share of the data."""
    keys = [_row_key(r["audio_file"], r["slice"]) for r in rows]
    count = max(1, min(MAX_HOLDOUT, round(len(keys) * HOLDOUT_FRACTION)))
    return set(sorted(keys, key=lambda k: zlib.crc32(k.encode()))[:count])


def _images(dataset: ray.data.Dataset, keys: set[str], held_out: bool, size: tuple[int, int], uri: str,
            genres: list[str] | None = None) -> ray.data.Dataset:
    """The decoded images of the rows whose key is (or is not) in `keys`, each checked to be a PNG of `size`
    (an image that is not stops the run naming `uri` and its row); with `genres`, each image's `label` too: the
    index of its genre (`len(genres)`, the null vector's, for none)."""
    def flag(batch: pa.Table) -> pa.Table:
        held = [_row_key(a, s) in keys for a, s in zip(batch["audio_file"].to_pylist(), batch["slice"].to_pylist())]
        return batch.append_column("held_out", pa.array(held, pa.bool_()))

    def decode_labelled(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = {genre: i for i, genre in enumerate(genres or [])}
        labels = {"label": np.array([index.get(g, len(genres)) for g in batch["genre"]])} if genres is not None else {}
        return {**decode_images(batch, size, uri), **labels}

    flagged = dataset.map_batches(flag, batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    chosen = flagged.filter(expr=col("held_out") == held_out, num_cpus=LIGHT_CPUS)
    keyed = ["image", "audio_file", "slice"] + (["genre"] if genres is not None else [])
    return chosen.select_columns(keyed).map_batches(decode_labelled, num_cpus=LIGHT_CPUS)


class LatentEncoder:
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
    height, width = first_image_size(config.data)
    if (height, width) != parts.image_size:
        raise AudiodiffError(f"{config.data}: images are {height}x{width} but the model makes "
                             f"{parts.image_size[0]}x{parts.image_size[1]} (height x width); "
                             f"preprocess with --model {config.model}")
    # blocks in file order, so a seeded permutation picks the same images on every run
    with _ordered(), worker_errors():
        dataset = read_spectrograms(config.data, config.genres, shuffle_seed=None if not config.stream else config.seed)
        names = columns(config.data)
        if not {"audio_file", "slice"} <= set(names):
            raise AudiodiffError(f"{config.data}: no audio_file and slice columns (columns: {', '.join(names)}); "
                                 "preprocess the audio with audiodiff")
        total_rows = dataset.count()
        if total_rows == 0:
            raise AudiodiffError(f"{config.data}: no images of genre {', '.join(config.genres)}" if config.genres
                                 else f"{config.data}: the dataset is empty")
        if total_rows == 1:
            raise AudiodiffError(f"{config.data}: one image; fine-tuning needs at least 2 (one is held out)")
        if config.condition == "genre" and "genre" not in names:
            raise AudiodiffError(f"{config.data}: --condition genre, but the data has no genre column")
        keyed = ["audio_file", "slice"] + (["genre"] if config.condition == "genre" else [])
        dataset = dataset.select_columns(["image", *keyed])
        rows = dataset.select_columns(keyed).take_all()
        keys = _holdout_keys(rows)
        genres = _genre_names(rows, parts, config.model) if config.condition == "genre" else None
        held = np.stack([row["image"] for row in _images(dataset, keys, True, (height, width), config.data).take_all()])
        train = _images(dataset, keys, False, (height, width), config.data, genres)
        fits = total_rows * height * width < OBJECT_STORE_SHARE * smallest_object_store()
        # latents are made once and held, spilling to disk if they must: streaming would encode them every epoch
        in_memory = (fits and not config.stream) or parts.vqvae is not None
        if parts.vqvae is not None:
            train = train.map_batches(LatentEncoder, fn_constructor_args=(config.model, config.gpu),
                                      batch_size=config.batch_size, num_gpus=1 if config.gpu else 0,
                                      num_cpus=1 if config.gpu else ACTOR_CPUS,
                                      compute=ray.data.ActorPoolStrategy(size=config.num_workers))
        datasets, blocks = {}, None
        if in_memory:
            train = train.materialize()
            blocks = train.to_numpy_refs()
        else:
            datasets["train"] = train
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
                   warmup_steps=warmup, cpus=cpus, in_memory=in_memory, blocks=blocks, holdout=holdout, genres=genres)
    return plan, datasets


class InMemoryImages:
    """The training images (or latents, and labels) held in the object store, read zero-copy by every worker of
    a node."""

    def __init__(self, blocks: list):
        self.blocks = ray.get(blocks)
        sizes = [len(next(iter(block.values()))) for block in self.blocks]
        self.where = np.concatenate([np.stack([np.full(n, i), np.arange(n)], axis=1)
                                     for i, n in enumerate(sizes)])  # image index -> (block, row)

    def batches(self, c: TrainConfig, plan: RunPlan, rank: int, world: int, epoch: int, first_step: int):
        """Rank `rank`'s micro-batches of one epoch from step `first_step` on: {column: array}, the images
        uint8 [batch, height, width]."""
        order = np.random.default_rng([c.seed, epoch]).permutation(len(self.where))
        per_step = c.batch_size * world * c.grad_accum
        for step in range(first_step, plan.steps_per_epoch):
            chosen = order[step * per_step:(step + 1) * per_step].reshape(c.grad_accum, world, c.batch_size)[:, rank]
            for micro in chosen:
                yield {name: np.stack([self.blocks[b][name][r] for b, r in self.where[micro]])
                       for name in self.blocks[0]}


@contextlib.contextmanager
def _ordered():
    """Ray Data keeps blocks in file order for datasets made (and materialised) inside."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def _streamed_batches(c: TrainConfig, plan: RunPlan, rank: int, epoch: int, first_step: int):
    """Rank `rank`'s micro-batches of one epoch from its dataset shard, from step `first_step` on. The files
    come in an order seeded per epoch and a local buffer shuffles rows; which rows reach which worker depends on
    Ray Data's split, so a resumed epoch skips as many batches as were used, not the very same rows."""
    shard = ray.train.get_dataset_shard("train")
    seed = int(np.random.SeedSequence([c.seed, epoch, rank]).generate_state(1)[0])
    batches = shard.iter_batches(batch_size=c.batch_size, drop_last=True, local_shuffle_buffer_size=16 * c.batch_size,
                                 local_shuffle_seed=seed)
    skip, end = first_step * c.grad_accum, plan.steps_per_epoch * c.grad_accum
    index = -1
    for index, batch in enumerate(batches):
        if index >= end:
            return
        if index >= skip:
            yield batch
    if index + 1 < end:  # every rank must make the same number of steps (each report is a barrier)
        raise RuntimeError(f"rank {rank}'s shard ran out after {index + 1} of {end} batches in epoch {epoch}")


def _micro_generator(seed: int, slot: int, device: torch.device) -> torch.Generator:
    """The generator of the micro-batch at `slot` of the run's global order (steps, then accumulation, then
    ranks: the order in which InMemoryImages lays out a step's images)."""
    state = np.random.SeedSequence([seed, slot]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state >> 1))


# the loop


class GenreConditioned(torch.nn.Module):
    """A conditional UNet with its learned genre vectors (the last one the null vector), trained as one module so
    that DDP averages the vectors' gradients with the UNet's."""

    def __init__(self, unet, vectors: torch.Tensor):
        super().__init__()
        self.unet, self.vectors = unet, torch.nn.Parameter(vectors)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor):
        return self.unet(sample, timesteps, encoder_hidden_states=self.vectors[labels][:, None, :])


def ddp_options(c: TrainConfig) -> dict:
    """DistributedDataParallel's arguments: gradients as views of the all-reduce buckets (no copy, less memory);
    a static graph (the same parameters used every step) only without accumulation, whose no_sync torch 2.11's
    static graph breaks (pytorch/pytorch#143580)."""
    return {"gradient_as_bucket_view": True, "static_graph": c.grad_accum == 1}


def _initial_vectors(parts: PipelineParts, genres: list[str], seed: int) -> torch.Tensor:
    """[genres + 1, dim]: the model's own vectors for the genres it knows, seeded random ones for new genres."""
    vectors = torch.randn(len(genres) + 1, parts.cross_attention_dim, generator=torch.Generator().manual_seed(seed))
    if parts.conditioning is not None:
        known = len(parts.conditioning.names)
        vectors[:known], vectors[-1] = parts.conditioning.vectors, parts.conditioning.null
    return vectors


def train_loop_per_worker(loop_config: dict) -> None:
    c = TrainConfig(**loop_config["config"])
    plan: RunPlan = loop_config["plan"]
    # Ray Train logs every report of every worker at INFO ("Reporting training result ..."); our line suffices
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    torch.set_num_threads(plan.threads)
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    preflight = devices.check_gpu_visible(f"finetune worker {rank}")
    if preflight:
        log.info(preflight)
    devices.set_fp32_precision(c.precision)
    device = ray.train.torch.get_device()
    parts = load_model(c.model, conditional=c.condition is not None)
    unet = parts.unet.to(device).train()
    genre_model = GenreConditioned(unet, _initial_vectors(parts, plan.genres, c.seed)).to(device) if plan.genres else None
    trained = genre_model or unet  # what the optimizer and DDP see
    noise_scheduler = sampling.make_scheduler("ddpm", parts.scheduler.config)
    ema_settings = dict(decay=c.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4, foreach=True)
    ema = EMAModel(unet.parameters(), model_cls=type(unet), model_config=unet.config, **ema_settings)
    ema_vectors = EMAModel([genre_model.vectors], **ema_settings) if genre_model else None
    optimizer = torch.optim.AdamW(trained.parameters(), lr=c.lr, betas=(c.adam_beta1, c.adam_beta2),
                                  weight_decay=c.weight_decay)
    lr_schedule = get_scheduler(LR_SCHEDULES[c.lr_schedule], optimizer, num_warmup_steps=plan.warmup_steps,
                                num_training_steps=plan.total_steps)
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            step, history, ema = load_training_state(folder, unet, optimizer, lr_schedule, device, genre_model,
                                                     ema_vectors)
    ema.to(device)
    model = ray.train.torch.prepare_model(trained, parallel_strategy_kwargs=ddp_options(c))
    if c.grad_compression == "bf16" and world > 1:
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    vqvae = parts.vqvae.to(device).eval() if parts.vqvae is not None else None
    samples = Sampler(c, parts, unet, ema, ema_vectors, plan, device) if rank == 0 else None
    memory = InMemoryImages(plan.blocks) if plan.in_memory else None
    stop = min(plan.total_steps, c.stop_at_step or plan.total_steps)
    loss_sum, images_seen, started = torch.zeros((), device=device), 0, time.perf_counter()
    run_started, first_step = started, step
    while step < stop:
        epoch, first = divmod(step, plan.steps_per_epoch)
        batches = (memory.batches(c, plan, rank, world, epoch, first) if plan.in_memory
                   else _streamed_batches(c, plan, rank, epoch, first))
        for micro, batch in enumerate(batches):
            slot = (step * c.grad_accum + micro % c.grad_accum) * world + rank
            generator = _micro_generator(c.seed, slot, device)
            if vqvae is not None:  # a latent model: latents drawn from each image's cached distribution
                moments = torch.from_numpy(batch["latent"]).to(device, non_blocking=True)
                clean = DiagonalGaussianDistribution(moments).sample(generator) * vqvae.config.scaling_factor
            else:
                clean = sampling.to_model_space(torch.from_numpy(batch["image"]).to(device, non_blocking=True))
            noise = torch.randn(clean.shape, generator=generator, device=device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                      generator=generator, device=device)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            conditions = ()
            if genre_model:  # label dropout: some images train the null vector, for classifier-free guidance
                labels = torch.from_numpy(batch["label"]).to(device)
                dropped = torch.rand(labels.shape, generator=generator, device=device) < c.label_dropout
                conditions = (torch.where(dropped, len(plan.genres), labels),)
            accumulating = (micro + 1) % c.grad_accum != 0
            sync = model.no_sync() if accumulating and world > 1 else contextlib.nullcontext()
            with sync:
                with devices.autocast(device, c.precision):
                    prediction = model(noisy, timesteps, *conditions).sample
                loss = F.mse_loss(prediction.float(), noise)
                (loss / c.grad_accum).backward()
            loss_sum += loss.detach()
            images_seen += clean.shape[0]
            if accumulating:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(unet.parameters())
            if ema_vectors:
                ema_vectors.step([genre_model.vectors])
            step += 1
            logging_step = step % c.log_every == 0 or step == stop
            sample_step = step % c.sample_every == 0 or step == stop
            checkpoint_step = step % c.checkpoint_every == 0 or step == stop
            if not (logging_step or sample_step or checkpoint_step):
                continue
            elapsed = time.perf_counter() - started
            metrics = {"step": step, "loss": loss_sum.item() / (images_seen / c.batch_size),  # the host sync
                       "lr": lr_schedule.get_last_lr()[0], "images_per_second": images_seen * world / elapsed}
            if sample_step and samples:
                metrics.update(samples.write(step))
            history.append(metrics)
            if rank == 0:
                per_step = (time.perf_counter() - run_started) / (step - first_step)
                left = f"  about {progress.duration((stop - step) * per_step)} left" if step < stop else ""
                # Ray Train's workers log through the root logger; a print() there comes out twice (Ray 2.60).
                log.info(f"step {step}/{plan.total_steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                         f"{metrics['images_per_second']:.1f} images/s{left}"
                         + (f"  quality (Fréchet distance) {metrics['frechet_distance']:.2f} (floor "
                            f"{metrics.get('frechet_floor', float('nan')):.2f}), kernel distance "
                            f"{metrics['kernel_distance']:.4f}" if "frechet_distance" in metrics else ""))
                samples.log_scalars(metrics)
            checkpoint = None
            if checkpoint_step and rank == 0:
                folder = tempfile.mkdtemp(prefix="audiodiff-checkpoint-")  # Ray Train deletes it once uploaded
                save_training_state(folder, unet, ema, optimizer, lr_schedule, step, history, c, genre_model,
                                    ema_vectors)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            # the ranks wait for rank 0 to write the checkpoint, not to upload it (a thread of Ray Train's does)
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            loss_sum, images_seen, started = torch.zeros((), device=device), 0, time.perf_counter()
            if step >= stop:
                break
    if samples:
        samples.close()


class Sampler:
    """Rank 0's view of progress: clips from the EMA weights (--sample-scheduler, fixed seeds) under
    `OUTPUT/samples/step-<N>/` with a gallery, their quality figure against the held-out images, and
    TensorBoard events under `OUTPUT/logs/` (scalars, spectrograms, audio)."""

    def __init__(self, c: TrainConfig, parts: PipelineParts, unet, ema, ema_vectors, plan: RunPlan,
                 device: torch.device):
        from torch.utils.tensorboard import SummaryWriter

        self.c, self.unet, self.ema, self.ema_vectors, self.mel = c, unet, ema, ema_vectors, parts.mel
        self.genres = plan.genres
        self.vqvae, self.device = parts.vqvae, device
        self.scheduler = sampling.make_scheduler(c.sample_scheduler, parts.scheduler.config)
        self.codec = MelCodec(parts.mel, device=device)
        images = ray.get(plan.holdout)
        held = mel_embedding(images, parts.mel)
        self.reference, self.held, self.bandwidth = embedding_statistics(held), held, median_bandwidth(held)
        self.groups = _image_groups(len(held), len(images))  # the kernel distance leaves out pairs of one image
        # the floor, as evaluate's: the held-out images' halves against each other (images in turn: tracks unknown)
        first = halves(len(held), self.groups)
        self.floors = {} if first is None else {
            "frechet_floor": frechet_distance(*embedding_statistics(held[first]), *embedding_statistics(held[~first])),
            "kernel_floor": kernel_distance(held[first], held[~first], self.bandwidth, self.groups[first],
                                            self.groups[~first])}
        self.logs = tempfile.mkdtemp(prefix="audiodiff-logs-")
        self.writer = SummaryWriter(self.logs)

    def write(self, step: int) -> dict:
        c, mel = self.c, self.mel
        seeds = list(range(c.num_samples))
        genres = [self.genres[s % len(self.genres)] for s in seeds] if self.genres else [None] * len(seeds)
        conditions = {}
        if self.genres:  # the samples go round the genres, each from the EMA of its vector
            vectors = self.ema_vectors.shadow_params[0]
            conditions["encoding"] = vectors[[s % len(self.genres) for s in seeds]][:, None, :]
        self.ema.store(self.unet.parameters())
        self.ema.copy_to(self.unet.parameters())
        self.unet.eval()  # as the exported model runs (dropout off), in the run's precision
        try:
            with devices.autocast(self.device, c.precision):
                images = sampling.sample(self.unet, self.scheduler, sampling.generators(seeds, self.device),
                                         mel.y_res, mel.x_res, c.sample_steps, eta=SAMPLE_ETA, vqvae=self.vqvae,
                                         **conditions)
        finally:
            self.unet.train()
            self.ema.restore(self.unet.parameters())
        audio = self.codec.images_to_audio(images).cpu().numpy()
        images = images.cpu().numpy()
        folder = storage.join(c.output, "samples", f"step-{step}")
        rows = []
        for seed, genre, image, clip in zip(seeds, genres, images, audio):
            row = clip_row(f"sample-{seed:02d}", seed, "standard", mel.x_res, mel, c.sample_scheduler, c.sample_steps,
                           f"{c.output} (EMA, step {step})", genre=genre)
            write_clip(folder, row["wav"], row["png"], *encode_clip(image, clip, mel.sample_rate, PEAK_DBFS))
            rows.append(row)
        vectors = mel_embedding(images, mel)
        figures = {"frechet_distance": frechet_distance(*embedding_statistics(vectors), *self.reference),
                   "kernel_distance": kernel_distance(vectors, self.held, self.bandwidth,
                                                      _image_groups(len(vectors), len(images)), self.groups),
                   **self.floors}
        write_manifest_and_gallery(folder, rows, f"step {step}: {len(rows)} samples from the EMA weights "
                                                 f"({c.sample_scheduler} {c.sample_steps}); Fréchet distance "
                                                 f"{figures['frechet_distance']:.2f} (floor "
                                                 f"{figures.get('frechet_floor', float('nan')):.2f}), kernel "
                                                 f"distance {figures['kernel_distance']:.4f}")
        self.writer.add_images("samples/spectrograms", images[:, None], step, dataformats="NCHW")
        for seed, clip in zip(seeds[:4], audio):  # Griffin-Lim's output can pass 1.0: peak-normalise
            self.writer.add_audio(f"samples/{seed:02d}", clip[None] / max(1e-9, float(abs(clip).max())), step,
                                  sample_rate=mel.sample_rate)
        return figures

    def log_scalars(self, metrics: dict) -> None:
        """Scalars at every log step; the event files reach the output at sample steps and at the end."""
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, metrics["step"])
        if "frechet_distance" in metrics:
            self.writer.flush()
            storage.upload_dir(self.logs, storage.join(self.c.output, "logs"))

    def close(self) -> None:
        self.writer.close()
        storage.upload_dir(self.logs, storage.join(self.c.output, "logs"))


def _image_groups(vectors: int, images: int) -> np.ndarray:
    """Each of `mel_embedding`'s vectors' image (it embeds image by image)."""
    return np.arange(vectors) // (vectors // images)


def result_settings(c: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(c).items() if k not in RESUMABLE_CHANGES}


def on_cpu(state):
    """A state dict (nested dicts, lists and tuples) with its tensors copied to the CPU: a checkpoint then loads
    on a CPU-only driver and onto any rank's GPU, whatever device it was made on."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {key: on_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_cpu(value) for value in state)
    return state


def save_training_state(folder, unet, ema, optimizer, lr_schedule, step, history, c: TrainConfig,
                        genre_model=None, ema_vectors=None) -> None:
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)  # safetensors: device-free
    if genre_model:
        torch.save(on_cpu({"vectors": genre_model.vectors, "ema": ema_vectors.state_dict()}),
                   os.path.join(folder, GENRES_STATE))
    ema.save_pretrained(os.path.join(folder, "ema"))
    torch.save(on_cpu(optimizer.state_dict()), os.path.join(folder, "optimizer.pt"))
    torch.save(lr_schedule.state_dict(), os.path.join(folder, "lr_schedule.pt"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({ownership.WRITTEN_BY: ownership.mark("finetune"), "step": step, "config": result_settings(c),
                   "history": history}, f)


def load_training_state(folder, unet, optimizer, lr_schedule, device: torch.device, genre_model=None,
                        ema_vectors=None) -> tuple[int, list, EMAModel]:
    """The state of `folder` onto this worker's `device` (each rank its own GPU: a CUDA_VISIBLE_DEVICES shared
    by a node's workers would put every rank's copy on cuda:0 otherwise)."""
    unet.load_state_dict(type(unet).from_pretrained(os.path.join(folder, "unet")).state_dict())
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    ema = load_ema(folder, type(unet))
    if genre_model:
        genres = torch.load(os.path.join(folder, GENRES_STATE), map_location=device, weights_only=True)
        with torch.no_grad():
            genre_model.vectors.copy_(genres["vectors"])
        ema_vectors.load_state_dict(genres["ema"])
        ema_vectors.to(device)  # EMAModel.load_state_dict keeps the tensors where they were loaded
    optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), map_location=device, weights_only=True))
    lr_schedule.load_state_dict(torch.load(os.path.join(folder, "lr_schedule.pt"), weights_only=True))
    return state["step"], state["history"], ema


def load_ema(checkpoint_folder: str, model_cls) -> EMAModel:
    """diffusers' EMAModel keeps its counters in the saved model's config, and loading it back warns (twice)
    that a UNet2DModel does not expect them: quiet, since nothing is wrong."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return EMAModel.from_pretrained(os.path.join(checkpoint_folder, "ema"), model_cls, foreach=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)


# driver


def loss_curve_png(history: list[dict]) -> bytes:
    """The loss by step (and the quality figure where measured), drawn with matplotlib."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = [h for h in history if "frechet_distance" in h]
    figure, axes = plt.subplots(1, 2 if quality else 1, figsize=(11 if quality else 6.4, 3.6), squeeze=False)
    loss_axes = axes[0][0]
    loss_axes.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".", color="navy")
    loss_axes.set(xlabel="optimizer step", ylabel="training loss (noise MSE)", title="loss")
    loss_axes.grid(alpha=0.3)
    if quality:
        axes[0][1].plot([h["step"] for h in quality], [h["frechet_distance"] for h in quality], marker="o",
                        color="darkred")
        if "frechet_floor" in quality[-1]:
            axes[0][1].axhline(quality[-1]["frechet_floor"], color="grey", linestyle="--",
                               label="floor: held-out halves")
            axes[0][1].legend()
        axes[0][1].set(xlabel="optimizer step", ylabel="Fréchet distance to held-out data",
                       title="sample quality (lower is better)")
        axes[0][1].grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def export(checkpoint: ray.train.Checkpoint, parts: PipelineParts, output: str, genres: list[str] | None) -> list[dict]:
    """Write the EMA weights (and a genre model's EMA genre vectors) as a pipeline folder (with the model's own
    scheduler class), with metrics.jsonl and loss.png beside the components."""
    with checkpoint.as_directory() as folder:
        load_ema(folder, type(parts.unet)).copy_to(parts.unet.parameters())
        if genres:
            vectors = torch.load(os.path.join(folder, GENRES_STATE), map_location="cpu",
                                 weights_only=True)["ema"]["shadow_params"][0]
            parts.conditioning = Conditioning(names=genres, vectors=vectors[:-1], null=vectors[-1])
        with open(os.path.join(folder, "state.json")) as f:
            history = json.load(f)["history"]
    save_model(parts, output)
    storage.write_bytes(storage.join(output, "metrics.jsonl"),
                        "".join(json.dumps(h) + "\n" for h in history).encode())
    storage.write_bytes(storage.join(output, "loss.png"), loss_curve_png(history))
    return history


def settings_made_with(recorded: dict) -> dict:
    """A checkpoint's recorded settings, completed with those added to audiodiff after it was made: such a run
    behaved as their defaults do, except precision, which before it was a setting was bf16 autocast on CUDA
    and fp32 on CPU."""
    made_with = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    made_with |= {f.name: f.default_factory() for f in dataclasses.fields(TrainConfig)
                  if f.default_factory is not dataclasses.MISSING}
    made_with["precision"] = "bf16" if recorded.get("gpu") else "fp32"
    return made_with | recorded


def _check_output_ours(config: TrainConfig) -> None:
    """The export replaces a pipeline's files: finetune writes into a new or empty folder, or one an earlier finetune
    wrote (ownership), as its checkpoints' state.json or its samples' pages say."""
    found = ownership.names_in(config.output)
    if not found:
        return
    run_folder, samples = storage.join(config.checkpoints, RUN_NAME), storage.join(config.output, "samples")
    states = [f for f in storage.list_files(run_folder) if f.endswith("state.json")] \
        if storage.is_dir(run_folder) else []
    pages = [f for f in storage.list_files(samples) if f.endswith("index.html")] if storage.is_dir(samples) else []
    marks = [(ownership.read_record(f) or {}).get(ownership.WRITTEN_BY) for f in states]
    if ownership.mark("finetune") not in marks and not any(map(ownership.is_our_gallery, pages)):
        raise ownership.refusal(config.output, "finetune", found)


def keep_global_batch(config: TrainConfig, before: dict) -> TrainConfig:
    """On --resume with another number of workers: the config with the gradient accumulation that keeps the run's
    global batch (per-worker batch x workers x accumulation), or an AudiodiffError naming the numbers."""
    if config.num_workers == before["num_workers"]:
        return config
    images = before["batch_size"] * before["num_workers"] * before["grad_accum"]
    per_pass = config.batch_size * config.num_workers
    if images % per_pass:
        passes = images // config.batch_size
        fitting = [n for n in range(1, passes + 1) if passes % n == 0]
        raise AudiodiffError(
            f"{config.output}: --resume on {config.num_workers} workers cannot keep the run's global batch of {images} "
            f"images ({before['batch_size']} per worker x {before['num_workers']} workers x {before['grad_accum']} "
            f"accumulation) with --batch-size {config.batch_size}; use --num-workers {', '.join(map(str, fitting))}")
    if config.grad_accum != images // per_pass:
        print(f"finetune: resuming on {config.num_workers} workers with --grad-accum {images // per_pass}: the run's "
              f"global batch of {images} images stays", flush=True)
    return dataclasses.replace(config, grad_accum=images // per_pass)


def _check_resume(config: TrainConfig) -> TrainConfig:
    """A run's checkpoints are continued only with --resume, and only with the settings they were made with
    (another number of workers with the accumulation that keeps the global batch: the config returned)."""
    run_folder = storage.join(config.checkpoints, RUN_NAME)
    saved = sorted(f for f in storage.list_files(run_folder) if f.endswith("state.json")) \
        if storage.exists(run_folder) else []
    if saved and not config.resume:
        raise AudiodiffError(f"{config.output}: a run's checkpoints are already there; pass --resume to continue "
                             "it, or choose another --output")
    if saved:
        before = storage.read_json(saved[-1], fix="; a damaged checkpoint: remove that checkpoint's folder to resume "
                                                  "from the one before, or choose another --output").get("config")
        if before is None:
            raise AudiodiffError(f"{config.output}: its checkpoints were made by an older audiodiff that did not "
                                 "record the run's settings; choose another --output")
        before = settings_made_with(before)
        config = keep_global_batch(config, before)
        now = result_settings(config)
        same_world = config.num_workers == before["num_workers"]
        changed = sorted(k for k in now if before.get(k) != now[k] and (same_world or k not in WORLD_CHANGES))
        if changed:
            raise AudiodiffError(f"{config.output}: --resume with settings that change the result: "
                                 + ", ".join(f"{k} was {before.get(k)!r}, now {now[k]!r}" for k in changed)
                                 + "; resume with the run's settings or choose another --output")
    return config


def run_finetune(config: TrainConfig) -> dict:
    """Checks what needs the cluster, the output and the data (the config checked itself), then trains on the
    current Ray and exports the model."""
    if config.gpu:
        require_gpus(config.num_workers, f"--gpu with {config.num_workers} workers")
    _check_output_ours(config)
    check_paths_reachable(config.shared_path, config.output, [config.data, config.model])
    # Ray Train workers run in a directory of their own: local paths must be absolute
    config = dataclasses.replace(config, output=storage.absolute(config.output),
                                 model=storage.absolute(config.model) if os.path.exists(config.model) else config.model)
    config = _check_resume(config)
    parts = load_model(config.model, conditional=config.condition is not None)
    if parts.cross_attention_dim is not None and config.condition is None:
        raise AudiodiffError(f"{config.model}: a conditional model; fine-tune it with --condition genre")
    plan, datasets = plan_run(config, parts)
    warmup_note = ""
    if plan.warmup_steps > WARMUP_FRACTION * plan.total_steps:
        warmup_note = f" (more than {WARMUP_FRACTION:.0%} of the run, as --warmup-steps asked)"
    print(f"finetune: {plan.rows} training images ({plan.holdout_rows} held out for the quality figure, "
          f"{'held in the object store' if plan.in_memory else 'streamed'}), {config.num_workers} worker(s) x "
          f"{plan.threads} thread(s), {plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps, "
          f"warm-up {plan.warmup_steps} steps{warmup_note}, {config.lr_schedule} schedule", flush=True)
    fs, checkpoints = storage.resolve(config.checkpoints)
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": dataclasses.asdict(config), "plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.gpu,
            resources_per_worker={"CPU": plan.cpus, **({"GPU": 1} if config.gpu else {})}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=checkpoints, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures)),
        datasets=datasets,
    )
    with worker_errors(ray.train.TrainingFailedError):  # a streamed image that is not a PNG of the model's size
        result = trainer.fit()
    history = export(result.checkpoint, parts, config.output, plan.genres)
    quality = [h for h in history if "frechet_distance" in h]
    return {"steps": history[-1]["step"], "total_steps": plan.total_steps, "images": plan.rows,
            "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
            "frechet_distance": quality[-1]["frechet_distance"] if quality else None,
            "kernel_distance": quality[-1]["kernel_distance"] if quality else None, "output": config.output}


def summary_line(result: dict) -> str:
    stopped = "" if result["steps"] == result["total_steps"] else f" (stopped; --resume goes on to {result['total_steps']})"
    return (f"finetune: {result['steps']} steps{stopped} on {result['images']} images, loss {result['first_loss']:.4f} -> "
            f"{result['last_loss']:.4f}, quality (Fréchet distance to held-out data) {result['frechet_distance']:.2f}, "
            f"kernel distance {result['kernel_distance']:.4f} -> {result['output']}")
