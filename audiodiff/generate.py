"""Mass generation: a plan of clips from noise -> batched denoising on Ray Data actors (a GPU each, or CPU)
-> batched Griffin-Lim -> per clip a WAV and a PNG, written by CPU tasks of their own; then
`manifest.parquet` and `index.html` (audiodiff.clips, audiodiff.outputs). Standard clips are one window
wide, extended ones `extend_factor` windows; with `seconds`, the standard clips are long ones instead, made
window after window, each outpainted from the last `overlap` seconds of the one before.

A clip depends only on (model, its seed, kind, scheduler, steps, eta, what it is conditioned on): its starting noise and every noise
draw of the sampler come from its own generator (audiodiff.sampling). Batched float kernels round
differently at different batch sizes and CPU thread counts (a lone CPU actor uses all its node's cores, several
share them: clips.cpu_threads), so across them a clip agrees up to that rounding (in fp32 at most one grey level
on a small fraction of pixels; bf16's tolerance in BENCHMARKS.md, "Precision"), not bit for bit. A re-run skips clips whose WAV and PNG both exist.
"""

from __future__ import annotations

import dataclasses

from audiodiff import checks
from audiodiff.clips import (ClipSettings, check_long_form, check_output, clip_seed, default_overlap, make_clips,
                             work_dataset)
from audiodiff.conditioning import check_conditioning, condition_names, conditioned
from audiodiff.errors import AudiodiffError
from audiodiff.models import PipelineParts, load_model
from audiodiff.outputs import clip_row

KINDS = ("standard", "extended", "long")


@dataclasses.dataclass
class GenerateConfig(ClipSettings):
    command = "generate"
    num_clips: int = 4
    num_extended: int = 0
    extend_factor: float = 4.0
    seconds: float | None = None  # the standard clips become long ones of this many seconds
    overlap: float | None = None  # seconds each window of a long clip keeps from the one before (clips.default_overlap)

    def __post_init__(self):
        super().__post_init__()
        checks.at_least(self, 0, "num_clips", "num_extended")
        if self.num_clips + self.num_extended == 0:
            raise AudiodiffError("nothing to generate: give --num-clips and/or --num-extended of at least 1")
        checks.positive(self, "extend_factor", "seconds", "overlap")

    def settings(self) -> dict:
        long_form = {"seconds": self.seconds, "overlap": self.overlap} if self.seconds is not None else {}
        return {**super().settings(), "extend_factor": self.extend_factor, **long_form}


def extended_frames(parts: PipelineParts, factor: float) -> int:
    """Width of an extended clip, checked against the UNet's downsampling."""
    halvings = len(parts.unet.config.block_out_channels) - 1
    if parts.vqvae is not None:
        halvings += len(parts.vqvae.config.block_out_channels) - 1
    frames = parts.mel.x_res * factor
    if not float(frames).is_integer() or int(frames) % 2 ** halvings:
        raise AudiodiffError(f"--extend-factor {factor} gives {frames:g} frames; the model halves the width "
                             f"{halvings} times, so the width must be a whole multiple of {2 ** halvings}")
    return int(frames)


def plan_clips(config: GenerateConfig, parts: PipelineParts) -> list[dict]:
    mel = parts.mel
    standard = ("standard", mel.x_res, {})
    if config.seconds is not None:
        check_long_form(mel, config.seconds, config.overlap)
        standard = ("long", mel.width_for_seconds(config.seconds), {"seconds": config.seconds})
    rows = []
    for (kind, frames, columns), count in ((standard, config.num_clips),
                                            (("extended", extended_frames(parts, config.extend_factor), {}),
                                             config.num_extended)):
        for index in range(count):
            rows.append(clip_row(f"{kind}-{index:05d}", clip_seed(config.seed, KINDS.index(kind), index), kind,
                                 frames, mel, config.scheduler_label, config.num_steps, config.model, **columns))
    return conditioned(rows, *condition_names(config.genres, config.encodings))


def run_generate(config: GenerateConfig) -> dict:
    """Run the whole stage on the current Ray; returns counts for the summary line."""
    config.place()
    parts = load_model(config.model)  # a model that cannot be loaded stops here, before any worker starts
    if config.seconds is not None and config.overlap is None:
        config = dataclasses.replace(config, overlap=default_overlap(parts.mel))
    check_conditioning(parts, config.model, config.genres, config.encodings, config.guidance)
    plan = plan_clips(config, parts)
    check_output(config, "generate")
    title = f"audiodiff: {len(plan)} clips from {config.model} ({config.scheduler_label}, {config.num_steps} steps)"
    return make_clips(config, plan, work_dataset(plan, config), title, overlap=config.overlap)

