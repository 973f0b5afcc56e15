"""The fine-tune's checkpoint format and the rule for resuming from it.

A checkpoint holds `unet/` (live weights), `ema/` (diffusers' EMAModel.save_pretrained), `optimizer.pt` and
`lr_schedule.pt` (CPU tensors, loaded with weights_only onto the worker's device), a genre model's `genres.pt`
and `state.json` (step, the run's configuration, metrics). Rank 0 writes it and Ray Train uploads it on a thread
of its own while training goes on. `--resume` goes on only with the settings that change the result unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import TYPE_CHECKING

import torch
from diffusers.training_utils import EMAModel
from diffusers.utils import logging as diffusers_logging

from audiodiff import ownership, storage
from audiodiff.errors import AudiodiffError

if TYPE_CHECKING:
    from audiodiff.train import TrainConfig

RUN_NAME = "finetune"  # Ray Train's run folder under OUTPUT/checkpoints
GENRES_STATE = "genres.pt"  # a genre model's checkpointed vectors and their EMA
# Fields that do not change what a run computes; every other field must match on --resume.
RESUMABLE_CHANGES = {"output", "resume", "max_failures", "checkpoint_every", "log_every", "sample_every",
                     "num_samples", "sample_scheduler", "sample_steps", "stop_at_step", "cpus_per_worker",
                     "shared_path", "export", "patience"}
# These may change on --resume as long as the global batch (batch_size x num_workers x grad_accum) stays.
WORLD_CHANGES = {"num_workers", "grad_accum"}


def result_settings(config: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}


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


def save_training_state(folder, unet, ema, optimizer, lr_schedule, step, history, config: TrainConfig,
                        genre_model=None, ema_vectors=None) -> None:
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)  # safetensors: device-free
    if genre_model:
        torch.save(on_cpu({"vectors": genre_model.vectors, "ema": ema_vectors.state_dict()}),
                   os.path.join(folder, GENRES_STATE))
    ema.save_pretrained(os.path.join(folder, "ema"))
    torch.save(on_cpu(optimizer.state_dict()), os.path.join(folder, "optimizer.pt"))
    torch.save(lr_schedule.state_dict(), os.path.join(folder, "lr_schedule.pt"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({ownership.WRITTEN_BY: ownership.mark("finetune"), "step": step, "config": result_settings(config),
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


def check_resume(config: TrainConfig) -> TrainConfig:
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
                                                  "from the one before, or choose another --output")["config"]
        config = keep_global_batch(config, before)
        now = result_settings(config)
        same_world = config.num_workers == before["num_workers"]
        changed = sorted(k for k in now if before.get(k) != now[k] and (same_world or k not in WORLD_CHANGES))
        if changed:
            raise AudiodiffError(f"{config.output}: --resume with settings that change the result: "
                                 + ", ".join(f"{k} was {before.get(k)!r}, now {now[k]!r}" for k in changed)
                                 + "; resume with the run's settings or choose another --output")
    return config
