"""The fine-tune's report of progress, from rank 0: the step lines, samples from the EMA weights with their
gallery and quality figure, TensorBoard events; and, at the end, the export: the pipeline with the EMA weights
and the scheduler class the model came with, `metrics.jsonl` and the loss plot."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import TYPE_CHECKING

import numpy as np
import ray
import ray.train
import torch

from audiodiff import devices, ownership, progress, sampling, storage
from audiodiff.mel import MelCodec
from audiodiff.metrics import (embedding_statistics, frechet_distance, halves, kernel_distance, median_bandwidth,
                               mel_embedding)
from audiodiff.models import Conditioning, PipelineParts, save_model
from audiodiff.outputs import PEAK_DBFS, clip_row, encode_clip, write_clip, write_manifest_and_gallery
from audiodiff.train_checkpoint import GENRES_STATE, load_ema
from audiodiff.train_data import RunPlan

if TYPE_CHECKING:
    from audiodiff.train import TrainConfig

# The samples' eta, with --sample-scheduler ddim: a briefly trained model's deterministic (eta 0) DDIM samples are
# noise texture where eta 1 (or DDPM) shows the spectra it has learned (measured on the demo's tiny model).
SAMPLE_ETA = 1.0
log = logging.getLogger(__name__)


class Reporter:
    """Rank 0's report of progress: the step lines, clips from the EMA weights (--sample-scheduler, fixed seeds)
    under `OUTPUT/samples/step-<N>/` with a gallery, their quality figure against the held-out images, and
    TensorBoard events under `OUTPUT/logs/` (scalars, spectrograms, audio)."""

    def __init__(self, config: TrainConfig, parts: PipelineParts, unet, ema, ema_vectors, plan: RunPlan,
                 device: torch.device):
        from torch.utils.tensorboard import SummaryWriter

        self.config, self.unet, self.ema, self.ema_vectors, self.mel = config, unet, ema, ema_vectors, parts.mel
        self.model_genres = plan.model_genres
        self.vqvae, self.device = parts.vqvae, device
        self.scheduler = sampling.make_scheduler(config.sample_scheduler, parts.scheduler.config)
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

    def write_samples(self, step: int) -> dict:
        config, mel = self.config, self.mel
        seeds = list(range(config.num_samples))
        known = self.model_genres
        genres = [known[s % len(known)] for s in seeds] if known else [None] * len(seeds)
        conditions = {}
        if known:  # the samples go round the genres, each from the EMA of its vector
            vectors = self.ema_vectors.shadow_params[0]
            conditions["encoding"] = vectors[[s % len(known) for s in seeds]][:, None, :]
        self.ema.store(self.unet.parameters())
        self.ema.copy_to(self.unet.parameters())
        self.unet.eval()  # as the exported model runs (dropout off), in the run's precision
        try:
            with devices.autocast(self.device, config.precision):
                images = sampling.sample(self.unet, self.scheduler, sampling.generators(seeds, self.device),
                                         mel.y_res, mel.x_res, config.sample_steps, eta=SAMPLE_ETA, vqvae=self.vqvae,
                                         **conditions)
        finally:
            self.unet.train()
            self.ema.restore(self.unet.parameters())
        audio = self.codec.images_to_audio(images).cpu().numpy()
        images = images.cpu().numpy()
        folder = storage.join(config.output, "samples", f"step-{step}")
        rows = []
        for seed, genre, image, clip in zip(seeds, genres, images, audio):
            row = clip_row(f"sample-{seed:02d}", seed, "standard", mel.x_res, mel, config.sample_scheduler,
                           config.sample_steps, f"{config.output} (EMA, step {step})", genre=genre)
            write_clip(folder, row["wav"], row["png"], *encode_clip(image, clip, mel.sample_rate, PEAK_DBFS))
            rows.append(row)
        vectors = mel_embedding(images, mel)
        figures = {"frechet_distance": frechet_distance(*embedding_statistics(vectors), *self.reference),
                   "kernel_distance": kernel_distance(vectors, self.held, self.bandwidth,
                                                      _image_groups(len(vectors), len(images)), self.groups),
                   **self.floors}
        write_manifest_and_gallery(folder, rows, f"step {step}: {len(rows)} samples from the EMA weights "
                                                 f"({config.sample_scheduler} {config.sample_steps}); Fréchet distance "
                                                 f"{figures['frechet_distance']:.2f} (floor "
                                                 f"{figures.get('frechet_floor', float('nan')):.2f}), kernel "
                                                 f"distance {figures['kernel_distance']:.4f}")
        self.writer.add_images("samples/spectrograms", images[:, None], step, dataformats="NCHW")
        for seed, clip in zip(seeds[:4], audio):  # Griffin-Lim's output can pass 1.0: peak-normalise
            self.writer.add_audio(f"samples/{seed:02d}", clip[None] / max(1e-9, float(abs(clip).max())), step,
                                  sample_rate=mel.sample_rate)
        return figures

    def log_step(self, metrics: dict, total_steps: int, seconds_left: float | None) -> None:
        """The step's line in the log, and its scalars in TensorBoard."""
        left = f"  about {progress.duration(seconds_left)} left" if seconds_left else ""
        # Ray Train's workers log through the root logger; a print() there comes out twice (Ray 2.60).
        log.info(f"step {metrics['step']}/{total_steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                 f"{metrics['images_per_second']:.1f} images/s{left}"
                 + (f"  quality (Fréchet distance) {metrics['frechet_distance']:.2f} (floor "
                    f"{metrics.get('frechet_floor', float('nan')):.2f}), kernel distance "
                    f"{metrics['kernel_distance']:.4f}" if "frechet_distance" in metrics else ""))
        self.log_scalars(metrics)

    def log_scalars(self, metrics: dict) -> None:
        """Scalars at every log step; the event files reach the output at sample steps and at the end."""
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}", value, metrics["step"])
        if "frechet_distance" in metrics:
            self.writer.flush()
            storage.upload_dir(self.logs, storage.join(self.config.output, "logs"))

    def close(self) -> None:
        self.writer.close()
        storage.upload_dir(self.logs, storage.join(self.config.output, "logs"))


def _image_groups(vectors: int, images: int) -> np.ndarray:
    """Each of `mel_embedding`'s vectors' image (it embeds image by image)."""
    return np.arange(vectors) // (vectors // images)


def best_sample(history: list[dict]) -> dict | None:
    """The sample step with the lowest quality figure (the first of equals); a figure that is not finite (a diverged
    run's) is never the best."""
    scored = [h for h in history if math.isfinite(h.get("frechet_distance", math.inf))]
    return min(scored, key=lambda h: h["frechet_distance"]) if scored else None


def samples_since_best(history: list[dict]) -> int:
    """How many sample steps came after the best one (all of them when none is best): --patience counts these."""
    best = best_sample(history)
    return sum(1 for h in history if "frechet_distance" in h and (best is None or h["step"] > best["step"]))


def loss_curve_png(history: list[dict], exported_step: int | None = None) -> bytes:
    """The loss by step (and the quality figure where measured), drawn with matplotlib; a line marks the step whose
    weights were exported."""
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
        axes[0][1].set(xlabel="optimizer step", ylabel="Fréchet distance to held-out data",
                       title="sample quality (lower is better)")
        axes[0][1].grid(alpha=0.3)
    if exported_step is not None:
        for panel in axes[0]:
            panel.axvline(exported_step, color="green", linestyle=":", label=f"exported: step {exported_step}")
            panel.legend()
    elif quality and "frechet_floor" in quality[-1]:
        axes[0][1].legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def read_history(checkpoint: ray.train.Checkpoint) -> tuple[int, list[dict]]:
    """A checkpoint's step and the run's history up to it."""
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
    return state["step"], state["history"]


def export(chosen: ray.train.Checkpoint, latest: ray.train.Checkpoint, parts: PipelineParts, config: TrainConfig,
           model_genres: list[str] | None, planned_steps: int) -> dict:
    """Write the EMA weights of the `chosen` checkpoint (and a genre model's EMA genre vectors) as a pipeline folder
    (with the model's own scheduler class), with metrics.jsonl and loss.png (the `latest` checkpoint's history) and
    finetune.json beside the components. Returns finetune.json's record with the losses and the exported figures."""
    with chosen.as_directory() as folder:
        load_ema(folder, type(parts.unet)).copy_to(parts.unet.parameters())
        if model_genres:
            vectors = torch.load(os.path.join(folder, GENRES_STATE), map_location="cpu",
                                 weights_only=True)["ema"]["shadow_params"][0]
            parts.conditioning = Conditioning(names=model_genres, vectors=vectors[:-1], null=vectors[-1])
    exported_step, _ = read_history(chosen)
    _, history = read_history(latest)
    save_model(parts, config.output)
    storage.write_bytes(storage.join(config.output, "metrics.jsonl"),
                        "".join(json.dumps(h) + "\n" for h in history).encode())
    storage.write_bytes(storage.join(config.output, "loss.png"), loss_curve_png(history, exported_step))
    best = best_sample(history) or {}
    exported = next(h for h in history if h["step"] == exported_step)
    record = {ownership.WRITTEN_BY: ownership.mark("finetune"), "export": config.export, "steps": history[-1]["step"],
              "best_step": best.get("step"), "best_frechet_distance": best.get("frechet_distance"),
              "best_kernel_distance": best.get("kernel_distance"), "exported_step": exported_step,
              "exported_frechet_distance": exported.get("frechet_distance"),
              "exported_kernel_distance": exported.get("kernel_distance"),
              "stopped_early": history[-1]["step"] < planned_steps}
    storage.write_bytes(storage.join(config.output, "finetune.json"), json.dumps(record, indent=1).encode())
    return {**record, "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "patience": config.patience,
            "frechet_distance": exported.get("frechet_distance"), "kernel_distance": exported.get("kernel_distance")}
