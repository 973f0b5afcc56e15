"""The denoising loop, in one pure-torch module (no Ray, no I/O), for any batch size and width: the home of
every way of denoising.

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
"""

from __future__ import annotations

import inspect

import torch

from audiodiff.errors import AudiodiffError


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 [batch, height, width] -> float [batch, 1, height, width] in [-1, 1]."""
    return images.unsqueeze(1).float() / 127.5 - 1.0


def to_images(sample: torch.Tensor) -> torch.Tensor:
    """float [batch, 1, height, width] in [-1, 1] -> uint8 [batch, height, width]."""
    return ((sample[:, 0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One noise tensor of `shape` per generator, drawn on the CPU, so a clip's noise is the same on any device."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def latent_shape(unet, vqvae, height: int, width: int) -> tuple[int, int, int]:
    """The shape the UNet denoises: the image's, or its latent's for a latent model."""
    if vqvae is None:
        return unet.config.in_channels, height, width
    factor = 2 ** (len(vqvae.config.block_out_channels) - 1)
    return unet.config.in_channels, height // factor, width // factor


def encode_images(vqvae, images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> what the UNet denoises (the images in [-1, 1], or their scaled latents)."""
    sample = to_model_space(images)
    if vqvae is None:
        return sample
    return vqvae.encode(sample.to(vqvae.dtype)).latent_dist.mode() * vqvae.config.scaling_factor


def decode_latents(vqvae, sample: torch.Tensor) -> torch.Tensor:
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

    `start`: uint8 [batch, height, width]; `keep`: bool [width] or [batch, width] (frames kept from `start`);
    `encoding`/`null_encoding`: [batch or 1, 1, dim]; `noise`: [batch, *latent_shape]. The scheduler is set to
    `steps` here."""
    device = next(unet.parameters()).device
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[skipped_steps(steps, strength) if start is not None else 0:]
    shape = latent_shape(unet, vqvae, height, width)
    if noise is None:
        noise = initial_noise(generators, shape, device)
    elif tuple(noise.shape) != (len(generators), *shape):
        raise AudiodiffError(f"noise is {tuple(noise.shape)}; expected {(len(generators), *shape)}")
    noise = noise.to(device)
    if start is not None:
        if start.shape != (len(generators), height, width):
            raise AudiodiffError(f"start images are {tuple(start.shape)}; expected {(len(generators), height, width)}")
        start_latents = encode_images(vqvae, start.to(device))
    elif keep is not None:
        raise AudiodiffError("frames can be kept only from a start image")
    if start is None or len(timesteps) == scheduler.timesteps.numel():
        latents = noise * scheduler.init_noise_sigma
    elif len(timesteps):
        latents = scheduler.add_noise(start_latents, noise, timesteps[:1])
    else:
        latents = start_latents
    keep_latent = _latent_keep(keep, latents.shape[-1], width).to(device) if keep is not None else None
    if encoding is not None:
        encoding = encoding.to(device, unet.dtype).expand(len(generators), -1, -1)
        if null_encoding is not None:
            null_encoding = null_encoding.to(device, unet.dtype).expand(len(generators), -1, -1)
    step_args = {"eta": eta} if "eta" in _step_parameters(scheduler) else {}
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        noise_prediction = predict_noise(unet, model_input, t, encoding, null_encoding, guidance)
        latents = scheduler.step(noise_prediction, t, latents, generator=generators, **step_args).prev_sample
        if keep_latent is not None:
            following = timesteps[i + 1:i + 2]
            kept = scheduler.add_noise(start_latents, noise, following) if len(following) else start_latents
            latents = torch.where(keep_latent, kept, latents)
    images = to_images(decode_latents(vqvae, latents))
    if keep is not None:  # a latent model's decoder only approximates the input: take kept frames from it
        images = torch.where(_pixel_keep(keep, images.shape, images.device), start.to(images.device), images)
    return images


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
    sample = encode_images(vqvae, images.to(device))
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
