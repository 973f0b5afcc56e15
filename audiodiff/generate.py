"""Mass generation: a plan of clips -> batched denoising on Ray Data actors (a GPU each, or CPU) ->
batched Griffin-Lim -> per clip a WAV and a PNG, written by CPU tasks of their own; then `manifest.parquet`
and `index.html` (audiodiff.outputs).

A clip depends only on (model, its seed, kind, scheduler, steps, eta): its starting noise and every noise
draw of the sampler come from its own generator (audiodiff.sampling). Batched float kernels round
differently at different batch sizes, so across batch sizes a clip agrees up to that rounding (at most one
grey level on a small fraction of pixels), not bit for bit. A re-run skips clips whose WAV and PNG both exist.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import ray
import torch

from audiodiff import sampling, storage
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelCodec
from audiodiff.models import PipelineParts, check_scheduler, load_model, make_scheduler
from audiodiff.outputs import PEAK_DBFS, ClipSink, clip_row, encode_clip, finished_clips, write_manifest_and_gallery
from audiodiff.runtime import LIGHT_CPUS, require_gpus

KINDS = ("standard", "extended")
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 50}


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
    target_dbfs: float = PEAK_DBFS

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
            rows.append(clip_row(f"{kind}-{index:05d}", clip_seed(config.seed, kind, index), kind, frames, mel,
                                 config.scheduler, config.num_steps, config.model))
    return rows


class ClipGenerator:
    """Per actor: the model, scheduler and codec on its device; per batch: clips of equal width denoised
    together and turned into audio together. Returns each clip's encoded files for the writer to store."""

    def __init__(self, config: GenerateConfig):
        self.config = config
        self.device = torch.device("cuda" if config.gpu else "cpu")
        parts = load_model(config.model)
        self.unet = parts.unet.to(self.device).eval()
        self.scheduler = make_scheduler(config.scheduler, parts)
        self.codec = MelCodec(parts.mel, device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"wav": batch["wav"], "png": batch["png"], "wav_bytes": np.empty(len(batch["wav"]), object),
               "png_bytes": np.empty(len(batch["wav"]), object)}
        for frames in np.unique(batch["frames"]):
            chosen = np.flatnonzero(batch["frames"] == frames)
            generators = [torch.Generator().manual_seed(int(batch["seed"][i])) for i in chosen]
            images = sampling.sample(self.unet, self.scheduler, generators, self.codec.config.y_res, int(frames),
                                     self.config.num_steps, eta=self.config.eta)
            audio = self.codec.images_to_audio(images).cpu().numpy()
            for i, image, clip in zip(chosen, images.cpu().numpy(), audio):
                out["wav_bytes"][i], out["png_bytes"][i] = encode_clip(
                    image, clip, self.codec.config.sample_rate, self.config.target_dbfs)
        return out


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


def run_generate(config: GenerateConfig) -> dict:
    """Run the whole stage on the current Ray; returns counts for the summary line."""
    check_scheduler(config.scheduler)
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
    output = storage.absolute(config.output)
    done = finished_clips(config.output)
    todo = [row for row in plan if row["clip_id"] not in done]
    if todo:
        clips = ray.data.from_items(sorted(todo, key=lambda r: r["frames"]))  # batches of one width
        clips.map_batches(
            ClipGenerator, fn_constructor_args=(config,), batch_size=config.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            num_gpus=1 if config.gpu else 0, num_cpus=1,
        ).write_datasink(ClipSink(output), ray_remote_args={"num_cpus": LIGHT_CPUS})
    missing = [row["clip_id"] for row in plan if row["clip_id"] not in finished_clips(config.output)]
    if missing:
        raise AudiodiffError(f"{config.output}: {len(missing)} clips were not written ({', '.join(missing[:5])}...)")
    title = f"audiodiff: {len(plan)} clips from {config.model} ({config.scheduler}, {config.num_steps} steps)"
    index = write_manifest_and_gallery(config.output, plan, title)
    return {"planned": len(plan), "written": len(todo), "skipped": len(plan) - len(todo), "index": index}


def summary_line(result: dict) -> str:
    return (f"generate: {result['written']} clips written, {result['skipped']} already there, "
            f"{result['planned']} in the manifest -> {result['index']}")
