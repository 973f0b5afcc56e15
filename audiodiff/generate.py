"""Mass generation: a plan of clips -> batched denoising on Ray Data actors (a GPU each, or CPU) ->
batched Griffin-Lim -> per clip a WAV and a PNG; then `manifest.parquet` and `index.html`.

A clip depends only on (model, its seed, kind, scheduler, steps, eta): its starting noise and every noise
draw of the sampler come from its own generator. Batched float kernels round differently at different batch
sizes, so across batch sizes a clip agrees up to that rounding (at most one grey level on a small fraction
of pixels), not bit for bit. Files are written whole; a re-run skips clips whose WAV and PNG both exist.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from audiodiff import storage
from audiodiff.encode import png_bytes, wav_bytes
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelCodec
from audiodiff.models import PipelineParts, load_model
from audiodiff.runtime import require_gpus

KINDS = ("standard", "extended")
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50}
MANIFEST_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("seed", pa.int64()), ("kind", pa.string()), ("frames", pa.int32()),
    ("seconds", pa.float64()), ("scheduler", pa.string()), ("steps", pa.int32()), ("model", pa.string()),
    ("wav", pa.string()), ("png", pa.string()),
])


@dataclasses.dataclass
class GenerateConfig:
    model: str
    output: str
    num_clips: int = 4
    num_extended: int = 0
    extend_factor: float = 4.0
    scheduler: str = "ddpm"
    steps: int | None = None
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 4
    concurrency: int = 1
    gpu: bool = False
    target_dbfs: float = -1.0

    @property
    def num_steps(self) -> int:
        return self.steps or DEFAULT_STEPS[self.scheduler]

    def settings(self) -> dict:
        """What a clip depends on; clips under one output must share it."""
        return {"model": self.model, "scheduler": self.scheduler, "steps": self.num_steps, "eta": self.eta,
                "seed": self.seed, "extend_factor": self.extend_factor, "target_dbfs": self.target_dbfs}


def clip_seed(seed: int, kind: str, index: int) -> int:
    return int(np.random.SeedSequence([seed, KINDS.index(kind), index]).generate_state(1, np.uint64)[0] >> 1)


def extended_frames(parts: PipelineParts, factor: float) -> int:
    """Width of an extended clip, checked against the UNet's downsampling."""
    downsampling = 2 ** (len(parts.unet.config.block_out_channels) - 1)
    frames = parts.mel.x_res * factor
    if not float(frames).is_integer() or int(frames) % downsampling:
        raise AudiodiffError(f"--extend-factor {factor} gives {frames:g} frames; the UNet halves the width "
                             f"{len(parts.unet.config.block_out_channels) - 1} times, so the width must be a "
                             f"whole multiple of {downsampling}")
    return int(frames)


def plan_clips(config: GenerateConfig, parts: PipelineParts) -> list[dict]:
    mel = parts.mel
    rows = []
    for kind, count, frames in (("standard", config.num_clips, mel.x_res),
                                ("extended", config.num_extended, extended_frames(parts, config.extend_factor))):
        for index in range(count):
            clip_id = f"{kind}-{index:05d}"
            rows.append({"clip_id": clip_id, "seed": clip_seed(config.seed, kind, index), "kind": kind,
                         "frames": frames, "seconds": mel.samples_for_width(frames) / mel.sample_rate,
                         "scheduler": config.scheduler, "steps": config.num_steps, "model": config.model,
                         "wav": f"clips/{clip_id}.wav", "png": f"clips/{clip_id}.png"})
    return rows


class ClipGenerator:
    """Per actor: the model, scheduler and codec on its device; per batch: clips of equal width denoised
    together, turned into audio together, written one file at a time."""

    def __init__(self, config: GenerateConfig):
        self.config = config
        self.device = torch.device("cuda" if config.gpu else "cpu")
        parts = load_model(config.model)
        self.unet = parts.unet.to(self.device).eval()
        self.scheduler = SCHEDULERS[config.scheduler].from_config(parts.scheduler.config)
        self.scheduler.set_timesteps(config.num_steps)
        self.codec = MelCodec(parts.mel, device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for frames in np.unique(batch["frames"]):
            chosen = np.flatnonzero(batch["frames"] == frames)
            images = self.denoise([int(batch["seed"][i]) for i in chosen], int(frames))
            audio = self.codec.images_to_audio(images).cpu().numpy()
            for i, image, clip in zip(chosen, images.cpu().numpy(), audio):
                self.write(batch["wav"][i], batch["png"][i], image, clip)
        return {"clip_id": batch["clip_id"]}

    @torch.no_grad()
    def denoise(self, seeds: list[int], frames: int) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        height = self.codec.config.y_res
        sample = torch.stack([torch.randn(1, height, frames, generator=g) for g in generators]).to(self.device)
        step_args = {"eta": self.config.eta} if self.config.scheduler == "ddim" else {}
        for t in self.scheduler.timesteps:
            noise = self.unet(sample, t).sample
            sample = self.scheduler.step(noise, t, sample, generator=generators, **step_args).prev_sample
        return ((sample[:, 0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)

    def write(self, wav: str, png: str, image: np.ndarray, audio: np.ndarray) -> None:
        peak = float(np.abs(audio).max())
        if peak > 0:  # teticio's users found saved clips very quiet: peak-normalise to the target level
            audio = audio * (10 ** (self.config.target_dbfs / 20) / peak)
        # the WAV first: a clip counts as done once its PNG exists
        storage.write_bytes(storage.join(self.config.output, wav), wav_bytes(audio, self.codec.config.sample_rate))
        storage.write_bytes(storage.join(self.config.output, png), png_bytes(image))


def finished_clips(output: str) -> set[str]:
    clips = storage.join(output, "clips")
    if not storage.exists(clips):
        return set()
    names = {uri.rsplit("/", 1)[-1] for uri in storage.list_files(clips)}
    return {name[:-4] for name in names if name.endswith(".png") and f"{name[:-4]}.wav" in names}


def _check_settings(config: GenerateConfig) -> None:
    """Clips already under the output must come from the same settings; the first write also proves the
    output is writable before any work starts."""
    path = storage.join(config.output, "generation.json")
    settings = config.settings()
    if storage.exists(path):
        previous = json.loads(storage.read_bytes(path))
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise AudiodiffError(f"{config.output}: holds clips made with other settings ({', '.join(changed)} "
                                 "differ); choose another --output")
    else:
        storage.write_bytes(path, (json.dumps(settings, indent=2) + "\n").encode())


def _write_if_changed(uri: str, data: bytes) -> None:
    if not (storage.exists(uri) and storage.read_bytes(uri) == data):
        storage.write_bytes(uri, data)


def _index_html(rows: list[dict], title: str) -> str:
    figures = "\n".join(
        f'<figure><figcaption>{html.escape(r["clip_id"])} · {r["kind"]} · {r["seconds"]:.2f} s · seed {r["seed"]}'
        f'</figcaption><img src="{html.escape(r["png"])}" alt="spectrogram of {html.escape(r["clip_id"])}">'
        f'<audio controls preload="none" src="{html.escape(r["wav"])}"></audio></figure>' for r in rows)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n"
            "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em;"
            "vertical-align:top}img{display:block;image-rendering:pixelated;height:256px;max-width:90vw}"
            "audio{display:block;width:100%}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{figures}\n</body></html>\n")


def run_generate(config: GenerateConfig) -> dict:
    """Run the whole stage on the current Ray; returns counts for the summary line."""
    if config.scheduler not in SCHEDULERS:
        raise AudiodiffError(f"--scheduler must be one of {sorted(SCHEDULERS)}, got '{config.scheduler}'")
    if config.num_clips < 0 or config.num_extended < 0 or config.num_clips + config.num_extended == 0:
        raise AudiodiffError("nothing to generate: give --num-clips and/or --num-extended of at least 1")
    if config.batch_size < 1 or config.concurrency < 1:
        raise AudiodiffError("--batch-size and --concurrency must be at least 1")
    if config.gpu:
        require_gpus(config.concurrency, f"--gpu with --concurrency {config.concurrency}")
    parts = load_model(config.model)  # a model that cannot be loaded stops here, before any worker starts
    if parts.vqvae is not None:
        raise AudiodiffError(f"{config.model}: latent (VQ-VAE) models are not supported by generate")
    plan = plan_clips(config, parts)
    _check_settings(config)
    done = finished_clips(config.output)
    todo = [row for row in plan if row["clip_id"] not in done]
    if todo:
        clips = ray.data.from_items(sorted(todo, key=lambda r: r["frames"]))  # batches of one width
        clips.map_batches(
            ClipGenerator, fn_constructor_args=(config,), batch_size=config.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            num_gpus=1 if config.gpu else 0, num_cpus=1,
        ).materialize()
    missing = [row["clip_id"] for row in plan if row["clip_id"] not in finished_clips(config.output)]
    if missing:
        raise AudiodiffError(f"{config.output}: {len(missing)} clips were not written ({', '.join(missing[:5])}...)")
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(plan, schema=MANIFEST_SCHEMA), buffer)
    _write_if_changed(storage.join(config.output, "manifest.parquet"), buffer.getvalue())
    title = f"audiodiff: {len(plan)} clips from {config.model} ({config.scheduler}, {config.num_steps} steps)"
    _write_if_changed(storage.join(config.output, "index.html"), _index_html(plan, title).encode())
    return {"planned": len(plan), "written": len(todo), "skipped": len(plan) - len(todo),
            "index": storage.join(config.output, "index.html")}
