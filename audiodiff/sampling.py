"""The denoising loop, in one pure-torch module (no Ray, no I/O), for any batch size and width: the home of
every way of denoising, of the samplers the commands name and of their defaults.

`sample` runs a diffusers scheduler's reverse process over a batch in which every item has its own
`torch.Generator`: its starting noise and every noise draw of the sampler come from it, so an item is the
same alone or in any batch (up to the rounding of batched float kernels). Options, each an addition to the
plain noise-to-image loop:
- `start` and `strength` in [0, 1]: begin from an input image noised to the step that `strength` selects
  (teticio's `start_step`); 0 returns the input unchanged, 1 ignores it.
- `keep`: a mask of frames taken from the input at every step, re-noised to the current step (in- and
  outpainting); kept frames of the result equal the input's exactly.
- `encoding` (and `null_encoding`, `guidance`): a conditional UNet's cross-attention input
  [batch, 1, cross_attention_dim], with classifier-free guidance when a null encoding and `guidance` != 1.
- `vqvae`: a latent model's autoencoder; sampling runs on latents and the result is decoded.
- `noise`: the starting noise itself (a slerp of two inverted clips) instead of the generators' draw.
Beside it: `invert` (DDIM inversion, image -> noise), `slerp`, and `continue_images` (long images, window
after window, each outpainted from the end of the one before).
Images are uint8 [batch, height, width] in and out, as the mel codec makes and takes them.

No host-device synchronisation inside the loop: the UNet gets timesteps moved to the device once, the
re-noising of kept frames uses scales computed before the loop, and the noise comes from generators on the
model's device (`generators`), so a GPU runs step after step without waiting on the host. Known exception:
UniPC's corrector solves a 2x2 linear system on the device at each step (inside diffusers), whose error
check syncs.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       HeunDiscreteScheduler, UniPCMultistepScheduler)

from audiodiff.errors import AudiodiffError


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler the commands name: a diffusers scheduler class, its settings, and the steps it takes by default."""

    scheduler: type
    default_steps: int
    settings: tuple[tuple[str, object], ...] = ()  # overrides of the model's scheduler config
    karras: bool = False  # takes use_karras_sigmas


SAMPLERS = {
    "ddpm": Sampler(DDPMScheduler, 1000),
    "ddim": Sampler(DDIMScheduler, 50),
    "dpm-solver": Sampler(DPMSolverMultistepScheduler, 25, (("algorithm_type", "dpmsolver++"), ("solver_order", 2)),
                          karras=True),
    # DPM-Solver++ 2M SDE: stochastic like DPMSolverSDEScheduler but drawing its noise from our generators, and
    # without torchsde (whose Brownian tree is seeded per batch, not per clip)
    "dpm-solver-sde": Sampler(DPMSolverMultistepScheduler, 10,
                              (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)), karras=True),
    "unipc": Sampler(UniPCMultistepScheduler, 20, karras=True),
    "euler-ancestral": Sampler(EulerAncestralDiscreteScheduler, 50),
    "heun": Sampler(HeunDiscreteScheduler, 25, karras=True),  # two UNet evaluations per step but the last
}
# generate's default, and finetune's samples': nearer held-out real music than DDPM-1000 at 10 UNet evaluations a clip
# on both measured models (BENCHMARKS.md, "Sampler frontier and the DDIM question")
GENERATE_SAMPLER = "dpm-solver-sde"
INPUT_SAMPLER = "ddim"  # remix's and continue's default, from an input image
INVERTING_SAMPLER = "ddim"  # interpolate's: it inverts its inputs with DDIM and samples from their noise
TRAINING_SAMPLER = "ddpm"  # the forward (noising) process finetune trains the UNet on
PREVIEW_SAMPLER, PREVIEW_STEPS = GENERATE_SAMPLER, SAMPLERS[GENERATE_SAMPLER].default_steps  # finetune's samples
# The scheduler classes a pipeline folder may name (model_index.json): the two teticio's models come with.
PIPELINE_SCHEDULERS = {cls.__name__: cls for cls in (DDPMScheduler, DDIMScheduler)}


def check_scheduler(name: str, karras: bool = False) -> None:
    if name not in SAMPLERS:
        raise AudiodiffError(f"--scheduler must be one of {', '.join(SAMPLERS)}, got '{name}'")
    if karras and not SAMPLERS[name].karras:
        raise AudiodiffError(f"--karras: the {name} scheduler has no Karras sigmas; drop --karras or use one of "
                             f"{', '.join(n for n, s in SAMPLERS.items() if s.karras)}")


def make_scheduler(name: str, model_config, karras: bool = False):
    """The sampler `name` on a model's noise schedule (its scheduler's config: betas, prediction type ...)."""
    check_scheduler(name, karras)
    sampler = SAMPLERS[name]
    # diffusers' from_config leaves out the values a config lists as its class's defaults (a fresh preset's), which
    # would give another class its own betas and spacing: the model's values hold for every sampler
    model_config = {k: v for k, v in dict(model_config).items() if k != "_use_default_values"}
    return sampler.scheduler.from_config(model_config, **dict(sampler.settings), **_clipping(sampler, model_config),
                                         **({"use_karras_sigmas": True} if karras else {}))


def _clipping(sampler: Sampler, model_config: dict) -> dict:
    """A model whose schedule clips the predicted clean image to [-1, 1] (`clip_sample`, DDPM's default and
    teticio's models') is clipped by every sampler that can: the multistep solvers have no clip_sample, but
    their dynamic thresholding with its ceiling at 1 is that clamp. Unclipped, a briefly trained model's
    clean-image predictions at high noise land far outside [-1, 1] and its clips turn to noise (BENCHMARKS.md,
    'Sampler frontier and the DDIM question')."""
    clips = model_config.get("clip_sample") and model_config.get("clip_sample_range", 1.0) == 1.0
    parameters = inspect.signature(sampler.scheduler.__init__).parameters
    if not clips or "clip_sample" in parameters or "thresholding" not in parameters:
        return {}
    return {"thresholding": True, "sample_max_value": 1.0}


def scheduler_label(name: str, karras: bool) -> str:
    """The sampler as the manifest records it."""
    return f"{name}+karras" if karras else name


def unet_evaluations(scheduler, steps: int, strength: float = 1.0, guided: bool = False) -> int:
    """UNet evaluations per clip: one per entry of the schedule run (Heun has two per step but the last),
    twice with classifier-free guidance."""
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(steps)
    run = len(probe.timesteps) - skipped_steps(steps, strength) * probe.order
    return max(run, 0) * (2 if guided else 1)


def generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per clip, on the device that runs the model: its draws need no copy to that device."""
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 [batch, height, width] -> float [batch, 1, height, width] in [-1, 1]."""
    return images.unsqueeze(1).float() / 127.5 - 1.0


def to_images(sample: torch.Tensor) -> torch.Tensor:
    """float [batch, 1, height, width] in [-1, 1] -> uint8 [batch, height, width]."""
    return ((sample[:, 0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One noise tensor of `shape` per generator, drawn where the generator lives."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)


def latent_shape(unet, vqvae, height: int, width: int) -> tuple[int, int, int]:
    """The shape the UNet denoises: the image's, or its latent's for a latent model."""
    if vqvae is None:
        return unet.config.in_channels, height, width
    factor = 2 ** (len(vqvae.config.block_out_channels) - 1)
    return unet.config.in_channels, height // factor, width // factor


def to_unet_space(vqvae, images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> what the UNet denoises (the images in [-1, 1], or their scaled latents)."""
    sample = to_model_space(images)
    if vqvae is None:
        return sample
    return vqvae.encode(sample.to(vqvae.dtype)).latent_dist.mode() * vqvae.config.scaling_factor


def from_unet_space(vqvae, sample: torch.Tensor) -> torch.Tensor:
    """What the UNet denoised -> images in [-1, 1] (a latent model's decoded by its VAE)."""
    if vqvae is None:
        return sample
    return vqvae.decode(sample.to(vqvae.dtype) / vqvae.config.scaling_factor).sample


def skipped_steps(steps: int, strength: float) -> int:
    """Steps of the schedule that a start image at `strength` skips."""
    if not 0.0 <= strength <= 1.0:
        raise AudiodiffError(f"strength must lie in [0, 1], got {strength}")
    return round(steps * (1.0 - strength))


def predict_noise(unet, sample: torch.Tensor, t: torch.Tensor, encoding: torch.Tensor | None = None,
                  null_encoding: torch.Tensor | None = None, guidance: float = 1.0) -> torch.Tensor:
    if encoding is None:
        return unet(sample, t).sample
    if null_encoding is None or guidance == 1.0:
        return unet(sample, t, encoder_hidden_states=encoding).sample
    both = unet(torch.cat([sample, sample]), t, encoder_hidden_states=torch.cat([null_encoding, encoding])).sample
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


@torch.no_grad()
def sample(unet, scheduler, generators: list[torch.Generator], height: int, width: int, steps: int, *,
           eta: float = 0.0, start: torch.Tensor | None = None, strength: float = 1.0,
           keep: torch.Tensor | None = None, encoding: torch.Tensor | None = None,
           null_encoding: torch.Tensor | None = None, guidance: float = 1.0, vqvae=None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise one batch (one item per generator) of `height` x `width` images; uint8 [batch, height, width].

    `scheduler`: any of SAMPLERS' (a template: each call runs a fresh copy, since multistep schedulers keep
    state); `generators`: on the model's device for a sync-free loop; `start`: uint8 [batch, height, width];
    `keep`: bool [width] or [batch, width] (frames kept from `start`); `encoding`/`null_encoding`:
    [batch or 1, 1, dim]; `noise`: [batch, *latent_shape]."""
    device = next(unet.parameters()).device
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(steps)
    skip = skipped_steps(steps, strength) * scheduler.order if start is not None else 0
    timesteps = scheduler.timesteps[skip:]
    shape = latent_shape(unet, vqvae, height, width)
    if noise is None:
        noise = initial_noise(generators, shape, device)
    elif tuple(noise.shape) != (len(generators), *shape):
        raise AudiodiffError(f"noise is {tuple(noise.shape)}; expected {(len(generators), *shape)}")
    noise = noise.to(device)
    if start is not None:
        if start.shape != (len(generators), height, width):
            raise AudiodiffError(f"start images are {tuple(start.shape)}; expected {(len(generators), height, width)}")
        start_latents = to_unet_space(vqvae, start.to(device))
        levels = noise_levels(scheduler, skip).to(device)
    elif keep is not None:
        raise AudiodiffError("frames can be kept only from a start image")
    if start is None or skip == 0:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = levels[0, 0] * start_latents + levels[0, 1] * noise
    keep_latent = _latent_keep(keep, latents.shape[-1], width).to(device) if keep is not None else None
    if encoding is not None:
        encoding = encoding.to(device, unet.dtype).expand(len(generators), -1, -1)
        if null_encoding is not None:
            null_encoding = null_encoding.to(device, unet.dtype).expand(len(generators), -1, -1)
    step_args = {"eta": eta} if "eta" in _step_parameters(scheduler) else {}
    if "generator" in _step_parameters(scheduler):
        step_args["generator"] = generators
    unet_timesteps = timesteps.to(device)  # else the UNet copies a host scalar to the device at every step
    if isinstance(scheduler, UniPCMultistepScheduler):  # it would copy its sigmas to the device at every step
        scheduler.sigmas = scheduler.sigmas.to(device)
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        noise_prediction = predict_noise(unet, model_input, unet_timesteps[i], encoding, null_encoding, guidance)
        latents = scheduler.step(noise_prediction, t, latents, **step_args).prev_sample
        if keep_latent is not None:  # kept frames re-noised to the level the step has just reached
            latents = torch.where(keep_latent, levels[i + 1, 0] * start_latents + levels[i + 1, 1] * noise, latents)
    images = to_images(from_unet_space(vqvae, latents))
    if keep is not None:  # a latent model's decoder only approximates the input: take kept frames from it
        images = torch.where(_pixel_keep(keep, images.shape, images.device), start.to(images.device), images)
    return images


def noise_levels(scheduler, skip: int) -> torch.Tensor:
    """[entries run + 1, 2]: (scale of the image, scale of the noise) of the latents before each entry of the
    schedule from `skip` on, and after the last (1, 0: clean), from the scheduler's own `add_noise` (linear in
    both), so that a re-noised input lies in each scheduler's space (sigma-scaled for Euler and Heun, variance
    preserving for the others). Sets the scheduler's begin index to `skip`, as image-to-image needs."""
    one, zero = torch.ones(1), torch.zeros(1)
    levels = []
    for k in range(skip, len(scheduler.timesteps)):
        if hasattr(scheduler, "set_begin_index"):  # sigma-based schedulers look their sigma up by this index
            scheduler.set_begin_index(k)
        t = scheduler.timesteps[k:k + 1]
        levels.append(torch.cat([scheduler.add_noise(one, zero, t), scheduler.add_noise(zero, one, t)]))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(skip)
    return torch.stack([*levels, torch.tensor([1.0, 0.0])]).float()


@torch.no_grad()
def invert(unet, scheduler, images: torch.Tensor, steps: int, *, encoding: torch.Tensor | None = None,
           vqvae=None) -> torch.Tensor:
    """DDIM inversion: the noise from which deterministic DDIM (eta 0) with `steps` steps on `scheduler`'s
    schedule denoises back to (about) `images` (uint8 [batch, height, width]). Each step runs the sampler's
    update backwards, with the noise predicted at the lower noise level standing in for the one at the
    higher (the inversion's only approximation)."""
    device = next(unet.parameters()).device
    scheduler.set_timesteps(steps)
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final_alpha = getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0))
    if encoding is not None:
        encoding = encoding.to(device, unet.dtype).expand(images.shape[0], -1, -1)
    sample = to_unet_space(vqvae, images.to(device))
    for t in scheduler.timesteps.flip(0):
        previous = int(t) - step
        alpha = scheduler.alphas_cumprod[t]
        alpha_before = scheduler.alphas_cumprod[previous] if previous >= 0 else final_alpha
        noise_prediction = predict_noise(unet, sample, t, encoding)
        clean = (sample - (1 - alpha_before) ** 0.5 * noise_prediction) / alpha_before ** 0.5
        sample = alpha ** 0.5 * clean + (1 - alpha) ** 0.5 * noise_prediction
    return sample


def slerp(a: torch.Tensor, b: torch.Tensor, position: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors of the same shape (position 0 gives `a`, 1 gives
    `b`): Gaussian noise keeps its norm along the way, which a straight line between them would lose."""
    cosine = torch.sum(a * b) / (a.norm() * b.norm())
    angle = torch.acos(cosine.clamp(-1.0, 1.0))
    if angle < 1e-4:  # (nearly) parallel: the straight line is the same and has no 0/0
        return (1 - position) * a + position * b
    return (torch.sin((1 - position) * angle) * a + torch.sin(position * angle) * b) / torch.sin(angle)


def continue_images(unet, scheduler, generators: list[torch.Generator], height: int, window: int, frames: int,
                    overlap: int, steps: int, *, edge: int = 0, first: torch.Tensor | None = None,
                    **options) -> torch.Tensor:
    """Images `frames` wide, made window after window (`window` frames each): the first is `first` (uint8
    [batch, height, window]) or sampled from noise; each next one is outpainted from `overlap` frames at the
    end of the one before, which it keeps exactly. The last `edge` frames of a window are left out of the
    result and of what the next window keeps: a spectrogram's end frames see its STFT's zero padding, so
    they differ from the middle ones, and joining at them would leave a seam. `options` go to `sample`
    (eta, encoding, guidance, vqvae)."""
    if not 0 < overlap < window - 2 * edge:
        raise AudiodiffError(f"the overlap must be at least one frame and shorter than the window ({window} "
                             f"frames, {edge} at each end unusable); got {overlap}")
    current = (first.to(next(unet.parameters()).device) if first is not None else
               sample(unet, scheduler, generators, height, window, steps, **options))
    end = window - edge
    fade = overlap // 2
    wide, made = current[..., :end], end
    keep = torch.arange(window) < overlap - fade
    ramp = torch.linspace(0, 1, fade + 2, device=current.device)[1:-1]
    while made < frames:
        start = torch.zeros_like(current)
        start[..., :overlap] = current[..., end - overlap:end]
        current = sample(unet, scheduler, generators, height, window, steps, start=start, keep=keep, **options)
        blended = (1 - ramp) * wide[..., -fade:].float() + ramp * current[..., overlap - fade:overlap].float()
        wide = torch.cat([wide[..., :-fade] if fade else wide, blended.round().to(torch.uint8),
                          current[..., overlap:end]], dim=-1)
        made += end - overlap
    return wide[..., :frames]


def _latent_keep(keep: torch.Tensor, latent_width: int, width: int) -> torch.Tensor:
    """A frame mask at the latent's resolution, broadcastable over [batch, channels, height, width]; a
    latent frame is kept only when all the image frames it covers are."""
    if keep.shape[-1] != width:
        raise AudiodiffError(f"the keep mask has {keep.shape[-1]} frames; the images have {width}")
    mask = keep.to(torch.bool).reshape(*keep.shape[:-1], latent_width, width // latent_width).all(dim=-1)
    return mask[:, None, None, :] if mask.ndim == 2 else mask


def _pixel_keep(keep: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A frame mask broadcast over uint8 images [batch, height, width]."""
    keep = keep.to(device=device, dtype=torch.bool)
    return (keep[:, None, :] if keep.ndim == 2 else keep).expand(shape)


def _step_parameters(scheduler) -> set[str]:
    return set(inspect.signature(scheduler.step).parameters)
