"""Mass generation: a plan of clips from noise -> batched denoising on Ray Data actors (a GPU each, or CPU)
-> batched Griffin-Lim -> per clip a WAV and a PNG, written by CPU tasks of their own; then
`manifest.parquet` and `index.html` (audiodiff.clips, audiodiff.outputs). Standard clips are one window
wide, extended ones `extend_factor` windows; with `seconds`, the standard clips are long ones instead, made
window after window, each outpainted from the last `overlap` seconds of the one before.

A clip depends only on (model, its seed, kind, scheduler, steps, eta, what it is conditioned on): its starting noise and every noise
draw of the sampler come from its own generator (audiodiff.sampling). Batched float kernels round
differently at different batch sizes and CPU thread counts (a lone CPU actor uses all its node's cores, several
share them: clips.cpu_threads), so across them a clip agrees up to that rounding (in fp32 at most one grey level
on a small fraction of pixels; bf16's tolerance in audiodiff/devices.py), not bit for bit. A re-run skips clips whose WAV and PNG both exist.
"""

from __future__ import annotations

import dataclasses

from audiodiff import checks
from audiodiff.clips import ClipSettings, check_output, clip_seed, make_clips, work_dataset
from audiodiff.clips import summary_line as clips_summary
from audiodiff.conditioning import check_conditioning, condition_names, conditioned
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelConfig
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
    overlap: float | None = None  # seconds each window of a long clip keeps from the one before (default_overlap)

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


def default_overlap(mel: MelConfig) -> float:
    """Half of what a window can keep (its width less its end frames), at most 2 s: 2 s for 256-frame models,
    about 0.68 s for the tiny preset's 64 frames (a 1.46 s window)."""
    return min(2.0, mel.samples_for_width(mel.x_res - 2 * mel.edge_frames) / mel.sample_rate / 2)
# The vocoder works in bounded windows, but a clip's own audio (4 bytes a sample, 318 MB an hour at 22050 Hz), its
# WAV and its PNG are held whole by the actor that makes it, times the batch: one hour bounds that.
MAX_CLIP_SECONDS = 3600


def check_long_form(mel: MelConfig, seconds: float, overlap: float) -> None:
    """A long clip must be longer than one window, and each window must add something to the one before."""
    window = mel.samples_for_width(mel.x_res) / mel.sample_rate
    if seconds <= window:
        raise AudiodiffError(f"--seconds {seconds:g} is not longer than one window ({window:.2f} s); "
                             "ask for more, or make standard clips")
    if seconds > MAX_CLIP_SECONDS:
        raise AudiodiffError(f"--seconds {seconds:g} is over {MAX_CLIP_SECONDS} (one hour): a clip is held whole "
                             "(its audio, WAV and PNG) by the actor that makes it; make several shorter ones")
    usable = mel.samples_for_width(mel.x_res - 2 * mel.edge_frames) / mel.sample_rate
    if not 0 < mel.frames_in(overlap) < mel.x_res - 2 * mel.edge_frames:
        raise AudiodiffError(f"--overlap {overlap:g} s must be shorter than one window less its end frames "
                             f"({usable:.2f} s) and at least one frame ({mel.hop_length / mel.sample_rate:.3f} s)")


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


def summary_line(result: dict) -> str:
    return clips_summary("generate", result)
