"""Fine-tuning: DDPM noise-prediction training of the UNet with Ray Train (DDP; NCCL on GPUs, gloo on CPU).

`train_loop_per_worker` is the notebook's loop with DDP, autocast (`--precision`, audiodiff.devices: bf16 on
CUDA and on CPUs with native bf16), gradient accumulation and clipping, a warm-up + decay schedule, EMA,
samples and checkpoints added in plain sight. Beside it: the data plan (`train_data`), the checkpoint format
and the resume rule (`train_checkpoint`), and rank 0's report of progress and the export (`train_report`).

DDP: gradients are bucket views and, without accumulation, the graph is static (torch 2.11's static graph
breaks no_sync, pytorch/pytorch#143580); `--grad-compression bf16` halves the all-reduced bytes between nodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
import time

import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from ray.train.v2._internal.execution import context as train_context  # its logger is named by its file

from audiodiff import checks, devices, ownership, sampling, storage
from audiodiff.errors import AudiodiffError
from audiodiff.models import PipelineParts, load_model
from audiodiff.outputs import GALLERY
from audiodiff.runtime import check_paths_reachable, require_gpus, worker_errors
from audiodiff.train_checkpoint import RUN_NAME, check_resume, load_training_state, save_training_state
from audiodiff.train_data import (WARMUP_FRACTION, InMemoryImages, RunPlan, micro_generator, plan_run,
                                  streamed_batches)
from audiodiff.train_report import Reporter, best_sample, export, samples_since_best

LR_SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup", "linear": "linear"}
GRAD_COMPRESSIONS = ("none", "bf16")
EXPORTS = ("best", "last")
# What Ray Train ranks checkpoints by (lower is better): the quality figure of a sample step, infinite at other steps,
# so that the best sample steps' checkpoints are the ones num_to_keep keeps (and the latest, which Ray always keeps)
CHECKPOINT_SCORE = "checkpoint_frechet_distance"
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
    sample_scheduler: str = sampling.PREVIEW_SAMPLER  # the samples' sampler (audiodiff.sampling.SAMPLERS)
    sample_steps: int = sampling.PREVIEW_STEPS
    seed: int = 0
    only_genres: list[str] = dataclasses.field(default_factory=list, metadata={"flag": "--genre"})  # a filter
    condition: str | None = None  # "genre": one model for every genre of the data, steerable by --genre
    label_dropout: float = 0.1  # share of images trained with the null vector (classifier-free guidance)
    stream: bool = False  # stream the data even if it would fit in the object store
    resume: bool = False
    stop_at_step: int | None = None  # end this run there (checkpointed); --resume continues it
    export: str = "best"  # the exported EMA weights: those of the sample step with the best quality figure, or the last
    patience: int | None = None  # end the run after this many sample steps without a better figure (checkpointed)
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
                        "checkpoint_every", "num_samples", "sample_steps", "stop_at_step", "patience")
        checks.at_least(self, 0, "seed", "warmup_steps")
        checks.positive(self, "lr", "cpus_per_worker")
        checks.one_of(self, "lr_schedule", sorted(LR_SCHEDULES))
        checks.one_of(self, "grad_compression", GRAD_COMPRESSIONS)
        checks.one_of(self, "export", EXPORTS)
        sampling.check_scheduler(self.sample_scheduler)
        if self.condition not in (None, "genre"):
            raise AudiodiffError(f"--condition must be 'genre', got '{self.condition}'")
        if not 0 <= self.label_dropout < 1:
            raise AudiodiffError(f"--label-dropout must lie in [0, 1), got {self.label_dropout}")

    @property
    def checkpoints(self) -> str:
        return storage.join(self.output, "checkpoints")



class GenreConditioned(torch.nn.Module):
    """A conditional UNet with its learned genre vectors (the last one the null vector), trained as one module so
    that DDP averages the vectors' gradients with the UNet's."""

    def __init__(self, unet, vectors: torch.Tensor):
        super().__init__()
        self.unet, self.vectors = unet, torch.nn.Parameter(vectors)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor):
        return self.unet(sample, timesteps, encoder_hidden_states=self.vectors[labels][:, None, :])


def ddp_options(config: TrainConfig) -> dict:
    """DistributedDataParallel's arguments: gradients as views of the all-reduce buckets (no copy, less memory);
    a static graph (the same parameters used every step) only without accumulation, whose no_sync torch 2.11's
    static graph breaks (pytorch/pytorch#143580)."""
    return {"gradient_as_bucket_view": True, "static_graph": config.grad_accum == 1}


def _initial_vectors(parts: PipelineParts, genres: list[str], seed: int) -> torch.Tensor:
    """[genres + 1, dim]: the model's own vectors for the genres it knows, seeded random ones for new genres."""
    vectors = torch.randn(len(genres) + 1, parts.cross_attention_dim, generator=torch.Generator().manual_seed(seed))
    if parts.conditioning is not None:
        known = len(parts.conditioning.names)
        vectors[:known], vectors[-1] = parts.conditioning.vectors, parts.conditioning.null
    return vectors


def train_loop_per_worker(loop_config: dict) -> None:
    config = TrainConfig(**loop_config["config"])
    plan = RunPlan(**loop_config["plan"])
    # Ray Train logs every report of every worker at INFO ("Reporting training result ..."); our line suffices
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    torch.set_num_threads(plan.threads)
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    preflight = devices.check_gpu_visible(f"finetune worker {rank}")
    if preflight:
        log.info(preflight)
    devices.set_fp32_precision(config.precision)
    device = ray.train.torch.get_device()
    parts = load_model(config.model, conditional=config.condition is not None)
    unet = parts.unet.to(device).train()
    genre_model = (GenreConditioned(unet, _initial_vectors(parts, plan.model_genres, config.seed)).to(device)
                   if plan.model_genres else None)
    trained = genre_model or unet  # what the optimizer and DDP see
    noise_scheduler = sampling.make_scheduler(sampling.TRAINING_SAMPLER, parts.scheduler.config)
    ema_settings = dict(decay=config.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4, foreach=True)
    ema = EMAModel(unet.parameters(), model_cls=type(unet), model_config=unet.config, **ema_settings)
    ema_vectors = EMAModel([genre_model.vectors], **ema_settings) if genre_model else None
    # fused: one kernel for every parameter on CPU and CUDA (the tiny model's AdamW step 14 -> 5 ms on 2 CPU cores)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay, fused=True)
    lr_schedule = get_scheduler(LR_SCHEDULES[config.lr_schedule], optimizer, num_warmup_steps=plan.warmup_steps,
                                num_training_steps=plan.total_steps)
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            step, history, ema = load_training_state(folder, unet, optimizer, lr_schedule, device, genre_model,
                                                     ema_vectors)
    ema.to(device)
    model = ray.train.torch.prepare_model(trained, parallel_strategy_kwargs=ddp_options(config))
    if config.grad_compression == "bf16" and world > 1:
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    vqvae = parts.vqvae.to(device).eval() if parts.vqvae is not None else None
    reporter = Reporter(config, parts, unet, ema, ema_vectors, plan, device) if rank == 0 else None
    memory = InMemoryImages(plan.blocks, plan.where) if plan.in_memory else None
    stop = min(plan.total_steps, config.stop_at_step or plan.total_steps)
    loss_sum, images_seen, started = torch.zeros((), device=device), 0, time.perf_counter()
    run_started, first_step = started, step
    while step < stop:
        epoch, first = divmod(step, plan.steps_per_epoch)
        batches = (memory.batches(config, plan, rank, world, epoch, first) if plan.in_memory
                   else streamed_batches(config, plan, rank, epoch, first))
        for micro, batch in enumerate(batches):
            slot = (step * config.grad_accum + micro % config.grad_accum) * world + rank
            generator = micro_generator(config.seed, slot, device)
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
                dropped = torch.rand(labels.shape, generator=generator, device=device) < config.label_dropout
                conditions = (torch.where(dropped, len(plan.model_genres), labels),)
            accumulating = (micro + 1) % config.grad_accum != 0
            sync = model.no_sync() if accumulating and world > 1 else contextlib.nullcontext()
            with sync:
                with devices.autocast(device, config.precision):
                    prediction = model(noisy, timesteps, *conditions).sample
                loss = F.mse_loss(prediction.float(), noise)
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach()
            images_seen += clean.shape[0]
            if accumulating:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(unet.parameters())
            if ema_vectors:
                ema_vectors.step([genre_model.vectors])
            step += 1
            logging_step = step % config.log_every == 0 or step == stop
            sample_step = step % config.sample_every == 0 or step == stop
            checkpoint_step = step % config.checkpoint_every == 0 or step == stop
            if not (logging_step or sample_step or checkpoint_step):
                continue
            elapsed = time.perf_counter() - started
            metrics = {"step": step, "loss": loss_sum.item() / (images_seen / config.batch_size),  # the host sync
                       "lr": lr_schedule.get_last_lr()[0], "images_per_second": images_seen * world / elapsed}
            if sample_step and reporter:
                metrics.update(reporter.write_samples(step))
            history.append(metrics)
            new_best = reporter is not None and sample_step and best_sample(history) is metrics
            if sample_step and config.patience and rank0_decides(
                    reporter is not None and samples_since_best(history) >= config.patience, device, world):
                stop = step  # out of patience: the run ends here, checkpointed, as at --stop-at-step
            if reporter:
                reporter.log_step(metrics, plan.total_steps,
                                  (stop - step) * (time.perf_counter() - run_started) / (step - first_step))
            checkpoint_step = checkpoint_step or step == stop or new_best
            checkpoint = None
            if checkpoint_step and rank == 0:
                folder = tempfile.mkdtemp(prefix="audiodiff-checkpoint-")  # Ray Train deletes it once uploaded
                save_training_state(folder, unet, ema, optimizer, lr_schedule, step, history, config, genre_model,
                                    ema_vectors)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            # the ranks wait for rank 0 to write the checkpoint, not to upload it (a thread of Ray Train's does)
            figure = metrics.get("frechet_distance", math.inf)
            ray.train.report({**metrics, CHECKPOINT_SCORE: figure if math.isfinite(figure) else math.inf},
                             checkpoint=checkpoint,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
            loss_sum, images_seen, started = torch.zeros((), device=device), 0, time.perf_counter()
            if step >= stop:
                break
    if reporter:
        reporter.close()


def rank0_decides(decision: bool, device: torch.device, world: int) -> bool:
    """Rank 0's decision (it alone measures the quality figure) on every rank: all end at the same step, since each
    report is a barrier."""
    if world == 1:
        return decision
    flag = torch.tensor([int(decision)], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def _check_output_ours(config: TrainConfig) -> None:
    """The export replaces a pipeline's files: finetune writes into a new or empty folder, or one an earlier finetune
    wrote (ownership), as its checkpoints' state.json or its samples' pages say."""
    found = ownership.names_in(config.output)
    if not found:
        return
    run_folder, samples = storage.join(config.checkpoints, RUN_NAME), storage.join(config.output, "samples")
    states = [f for f in storage.list_files(run_folder) if f.endswith("state.json")] \
        if storage.is_dir(run_folder) else []
    pages = [f for f in storage.list_files(samples) if f.endswith(GALLERY)] if storage.is_dir(samples) else []
    marks = [(ownership.read_record(f) or {}).get(ownership.WRITTEN_BY) for f in states]
    if ownership.mark("finetune") not in marks and not any(map(ownership.is_our_gallery, pages)):
        raise ownership.refusal(config.output, "finetune", found)


def run_finetune(config: TrainConfig, callbacks: tuple = ()) -> dict:
    """Checks what needs the cluster, the output and the data (the config checked itself), then trains on the
    current Ray and exports the model. `callbacks`: Ray Train's (a sweep's trial passes Tune's)."""
    if config.gpu:
        require_gpus(config.num_workers, f"--gpu with {config.num_workers} workers")
    _check_output_ours(config)
    check_paths_reachable(config.shared_path, config.output, [config.data, config.model])
    # Ray Train workers run in a directory of their own: local paths must be absolute
    config = dataclasses.replace(config, output=storage.absolute(config.output),
                                 model=storage.absolute(config.model) if os.path.exists(config.model) else config.model)
    config = check_resume(config)
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
        # plain values: Ray Train's controller unpickles this, and a RunPlan would import diffusers there (3.5 s)
        train_loop_config={"config": dataclasses.asdict(config), "plan": vars(plan)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.gpu,
            resources_per_worker={"CPU": plan.cpus, **({"GPU": 1} if config.gpu else {})}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=checkpoints, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=CHECKPOINT_SCORE,
                                                         checkpoint_score_order="min"),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures), callbacks=list(callbacks)),
        datasets=datasets,
    )
    with worker_errors(ray.train.TrainingFailedError):  # a streamed image that is not a PNG of the model's size
        result = trainer.fit()
    # "best": the retained checkpoint of the lowest figure, which is the best step's (written there, and kept)
    chosen = result.get_best_checkpoint(CHECKPOINT_SCORE, "min") if config.export == "best" else result.checkpoint
    planned = min(plan.total_steps, config.stop_at_step or plan.total_steps)
    record = export(chosen, result.checkpoint, parts, config, plan.model_genres, planned)
    return {**record, "total_steps": plan.total_steps, "images": plan.rows, "output": config.output}


def summary_line(result: dict) -> str:
    stopped = "" if result["steps"] == result["total_steps"] else f" (stopped; --resume goes on to {result['total_steps']})"
    if result["stopped_early"]:
        stopped = (f" (stopped early: no better quality figure in {result['patience']} sample steps; --resume goes on "
                   f"to {result['total_steps']})")
    which = {result["best_step"]: "the best quality figure", result["steps"]: "the last step"}.get(
        result["exported_step"], "the best checkpoint kept")
    return (f"finetune: {result['steps']} steps{stopped} on {result['images']} images, loss {result['first_loss']:.4f} -> "
            f"{result['last_loss']:.4f}; exported the EMA weights of step {result['exported_step']} ({which}): quality "
            f"(Fréchet distance to held-out data) {result['frechet_distance']:.2f}, kernel distance "
            f"{result['kernel_distance']:.4f} -> {result['output']}")