"""Fine-tuning: DDPM noise-prediction training of the UNet with Ray Train (DDP; NCCL on GPUs, gloo on CPU).

`train_loop_per_worker` is the notebook's loop with DDP, bf16 autocast, gradient accumulation and clipping,
warm-up + cosine learning rate, EMA and checkpoints added in plain sight. A checkpoint holds the live UNet
(`unet/`, safetensors), the EMA weights (`ema.safetensors`), optimizer and lr-schedule state dicts (`*.pt`,
loaded with weights_only) and `state.json` (step, EMA counters, metrics so far). The exported model carries
the EMA weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import tempfile
import time

import numpy as np
import ray
import ray.train
import ray.train.torch
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from PIL import Image, ImageDraw

from audiodiff import storage
from audiodiff.errors import AudiodiffError
from audiodiff.models import PipelineParts, load_model, save_model
from audiodiff.dataset import decode_images, first_image_size, read_spectrograms
from audiodiff.runtime import LIGHT_CPUS, require_gpus

RUN_NAME = "finetune"
log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig:
    data: str
    model: str
    output: str
    num_workers: int = 1
    gpu: bool = False
    epochs: int = 3
    batch_size: int = 4  # per worker
    lr: float = 1e-4
    adam_beta1: float = 0.95  # teticio's defaults
    adam_beta2: float = 0.999
    weight_decay: float = 1e-6
    warmup_steps: int = 500
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    ema_max_decay: float = 0.9999
    checkpoint_every: int = 500  # optimizer steps
    log_every: int = 10
    seed: int = 0
    genres: list[str] = dataclasses.field(default_factory=list)
    resume: bool = False
    max_failures: int = 0
    total_steps: int = 0  # set by run_finetune from the dataset size

    @property
    def checkpoints(self) -> str:
        return storage.join(self.output, "checkpoints")


# data


def _to_model_space(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"image": decode_images(batch)["image"][:, None].astype(np.float32) / 127.5 - 1.0}


def load_spectrograms(config: TrainConfig, image_size: tuple[int, int]) -> tuple[ray.data.Dataset, int]:
    """The training images as a Ray dataset, and their number; checks size and emptiness up front."""
    height, width = first_image_size(config.data)
    if (height, width) != image_size:
        raise AudiodiffError(f"{config.data}: images are {height}x{width} but the model makes "
                             f"{image_size[0]}x{image_size[1]} (height x width); preprocess with --model {config.model}")
    # decoding runs beside the training workers: a light step's share of CPU (RAY_NOTES.md: leave CPU for Data)
    dataset = read_spectrograms(config.data, config.genres)
    rows = dataset.count()
    if rows == 0:
        raise AudiodiffError(f"{config.data}: no images of genre {', '.join(config.genres)}" if config.genres
                             else f"{config.data}: the dataset is empty")
    return dataset.select_columns(["image"]).map_batches(_to_model_space, num_cpus=LIGHT_CPUS), rows


# the loop


def train_loop_per_worker(config: dict) -> None:
    c = TrainConfig(**config)
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(c.seed + rank)
    parts = load_model(c.model)
    unet = parts.unet.to(device)
    noise_scheduler = DDPMScheduler.from_config(parts.scheduler.config)
    ema = EMAModel(unet.parameters(), decay=c.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=c.lr, betas=(c.adam_beta1, c.adam_beta2),
                                  weight_decay=c.weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, c.warmup_steps, c.total_steps)
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            step, history = load_training_state(folder, unet, ema, optimizer, lr_schedule)
    model = ray.train.torch.prepare_model(unet)
    ema.to(device)
    shard = ray.train.get_dataset_shard("train")
    bf16 = device.type == "cuda"
    losses, images_seen, started, micro = [], 0, time.perf_counter(), 0
    while step < c.total_steps:
        for batch in shard.iter_torch_batches(batch_size=c.batch_size, device=device, drop_last=True):
            images = batch["image"]
            noise = torch.randn_like(images)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (images.shape[0],),
                                      device=device)
            noisy = noise_scheduler.add_noise(images, noise, timesteps)
            micro += 1
            accumulating = micro % c.grad_accum != 0
            sync = model.no_sync() if accumulating and world > 1 else contextlib.nullcontext()
            with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.mse_loss(model(noisy, timesteps).sample.float(), noise)
                (loss / c.grad_accum).backward()
            losses.append(loss.item())
            images_seen += images.shape[0]
            if accumulating:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(unet.parameters())
            step += 1
            if step % c.log_every and step % c.checkpoint_every and step != c.total_steps:
                continue
            elapsed = time.perf_counter() - started
            metrics = {"step": step, "loss": float(np.mean(losses)), "lr": lr_schedule.get_last_lr()[0],
                       "images_per_second": images_seen * world / elapsed}
            history.append(metrics)
            losses, images_seen, started = [], 0, time.perf_counter()
            if rank == 0:
                # Ray Train's workers log through the root logger; a print() there comes out twice (Ray 2.60).
                log.info(
                    f"step {step}/{c.total_steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                    f"{metrics['images_per_second']:.1f} images/s")
            if step % c.checkpoint_every == 0 or step == c.total_steps:
                with tempfile.TemporaryDirectory() as folder:
                    if rank == 0:
                        save_training_state(folder, unet, ema, optimizer, lr_schedule, step, history)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder)
                                     if rank == 0 else None)
            else:
                ray.train.report(metrics)
            if step >= c.total_steps:
                break


def save_training_state(folder, unet, ema, optimizer, lr_schedule, step, history) -> None:
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    ema_state = ema.state_dict()
    shadow = ema_state.pop("shadow_params")
    safetensors.torch.save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(shadow)},
                                os.path.join(folder, "ema.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
    torch.save(lr_schedule.state_dict(), os.path.join(folder, "lr_schedule.pt"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"step": step, "ema": ema_state, "history": history}, f)


def load_training_state(folder, unet, ema, optimizer, lr_schedule) -> tuple[int, list]:
    unet.load_state_dict(UNet2DModel.from_pretrained(os.path.join(folder, "unet")).state_dict())
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    ema.load_state_dict({**state["ema"], "shadow_params": _ema_weights(folder)})
    optimizer.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True))
    lr_schedule.load_state_dict(torch.load(os.path.join(folder, "lr_schedule.pt"), weights_only=True))
    return state["step"], state["history"]


def _ema_weights(folder: str) -> list[torch.Tensor]:
    tensors = safetensors.torch.load_file(os.path.join(folder, "ema.safetensors"))
    return [tensors[str(i)] for i in range(len(tensors))]


# driver


def loss_curve_png(history: list[dict], size: tuple[int, int] = (640, 360)) -> bytes:
    """A plain loss-by-step plot, drawn with PIL (no plotting library needed)."""
    width, height, margin = *size, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin // 2, width - margin // 2, height - margin], outline="black")
    if history:
        steps = [h["step"] for h in history]
        losses = [h["loss"] for h in history]
        low, high = min(losses), max(losses)
        span_x, span_y = max(steps[-1] - steps[0], 1), max(high - low, 1e-12)
        points = [(margin + (s - steps[0]) / span_x * (width - 1.5 * margin),
                   height - margin - (v - low) / span_y * (height - 1.5 * margin)) for s, v in zip(steps, losses)]
        draw.line(points, fill="navy", width=2) if len(points) > 1 else draw.point(points, fill="navy")
        draw.text((margin, height - margin + 8), f"step {steps[0]} .. {steps[-1]}", fill="black")
        draw.text((margin + 4, margin // 2 + 4), f"loss {high:.4f} (top) .. {low:.4f} (bottom)", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def export(checkpoint: ray.train.Checkpoint, parts: PipelineParts, output: str) -> list[dict]:
    """Write the EMA weights as a pipeline folder, with metrics.jsonl and loss.png beside the components."""
    with checkpoint.as_directory() as folder:
        unet = UNet2DModel.from_pretrained(os.path.join(folder, "unet"))
        for parameter, averaged in zip(unet.parameters(), _ema_weights(folder)):
            parameter.data.copy_(averaged)
        with open(os.path.join(folder, "state.json")) as f:
            history = json.load(f)["history"]
    save_model(PipelineParts(unet=unet, scheduler=DDPMScheduler.from_config(parts.scheduler.config),
                             mel=parts.mel), output)
    storage.write_bytes(storage.join(output, "metrics.jsonl"),
                        "".join(json.dumps(h) + "\n" for h in history).encode())
    storage.write_bytes(storage.join(output, "loss.png"), loss_curve_png(history))
    return history


def run_finetune(config: TrainConfig) -> dict:
    """Checks everything a user can get wrong, then trains on the current Ray and exports the model."""
    if config.num_workers < 1 or config.batch_size < 1 or config.epochs < 1 or config.grad_accum < 1:
        raise AudiodiffError("--num-workers, --batch-size, --epochs and --grad-accum must be at least 1")
    if config.gpu:
        require_gpus(config.num_workers, f"--gpu with {config.num_workers} workers")
    parts = load_model(config.model)
    if parts.vqvae is not None:
        raise AudiodiffError(f"{config.model}: latent (VQ-VAE) models are not supported by finetune")
    dataset, rows = load_spectrograms(config, parts.image_size)
    steps_per_epoch = rows // (config.batch_size * config.num_workers * config.grad_accum)
    if steps_per_epoch == 0:
        raise AudiodiffError(f"{config.data}: {rows} images are fewer than one step needs "
                             f"({config.batch_size} x {config.num_workers} workers x {config.grad_accum} accumulation)")
    config = dataclasses.replace(config, total_steps=steps_per_epoch * config.epochs)
    run_folder = storage.join(config.checkpoints, RUN_NAME)
    if storage.exists(run_folder) and not config.resume:
        raise AudiodiffError(f"{config.output}: a run's checkpoints are already there; pass --resume to continue "
                             "it, or choose another --output")
    fs, checkpoints = storage.resolve(config.checkpoints)
    print(f"finetune: {rows} images, {config.num_workers} worker(s), {steps_per_epoch} steps per epoch, "
          f"{config.total_steps} steps", flush=True)
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(config),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.gpu,
            resources_per_worker={"CPU": 1, "GPU": 1} if config.gpu else {"CPU": 0.5}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=checkpoints, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures)),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    history = export(result.checkpoint, parts, config.output)
    return {"steps": config.total_steps, "images": rows, "first_loss": history[0]["loss"],
            "last_loss": history[-1]["loss"], "output": config.output}
