"""The UNets of the presets (audiodiff.models.PRESET_UNETS) and the memory a clip takes in them, in a module of its
own that needs only torch and diffusers: benchmarks/bench_gpu.py builds them and checks the estimate on
machines without Ray or pyarrow."""

from __future__ import annotations

from diffusers import UNet2DConditionModel, UNet2DModel

from audiodiff import sampling

# Live activations of a UNet's forward at its peak, in full-resolution copies of its first block's channels:
# the down path's skip connections of that level (layers_per_block + 1), the up path's concatenated input, its
# group norm and activation (norms run in fp32 under autocast) and the convolution's output. An estimate from
# the architecture; benchmarks/bench_gpu.py measures memory per clip, and a batch that does not fit is halved.
ACTIVATION_COPIES = 16


def _unet(cross_attention_dim: int | None, heads: int | None = None, **config) -> UNet2DModel | UNet2DConditionModel:
    """A UNet2DModel; or, given `cross_attention_dim`, a UNet2DConditionModel of the same shape whose attention
    blocks also attend to an encoding (with `heads` heads: this class reads attention_head_dim as a count)."""
    if cross_attention_dim is None:
        return UNet2DModel(**config)
    crossed = {"AttnDownBlock2D": "CrossAttnDownBlock2D", "AttnUpBlock2D": "CrossAttnUpBlock2D"}
    config.pop("attention_head_dim", None)
    for blocks in ("down_block_types", "up_block_types"):
        config[blocks] = tuple(crossed.get(block, block) for block in config[blocks])
    return UNet2DConditionModel(cross_attention_dim=cross_attention_dim, **({"attention_head_dim": heads} if heads else {}),
                                **config)


def full_unet(cross_attention_dim: int | None = None) -> UNet2DModel | UNet2DConditionModel:
    """teticio's audio-diffusion-256 architecture (113.7 M parameters)."""
    return _unet(
        cross_attention_dim, sample_size=256, in_channels=1, out_channels=1, layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    )


def tiny_unet(cross_attention_dim: int | None = None) -> UNet2DModel | UNet2DConditionModel:
    """1.2 M parameters on 64x64 images; 32-channel attention heads (diffusers' default 8-channel heads
    make CPU attention 3x slower). A batch-4 training step takes about 0.2 s on 2 CPU cores."""
    return _unet(
        cross_attention_dim, heads=2, sample_size=64, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=8, attention_head_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def clip_bytes(unet, vqvae, height: int, width: int, precision: str) -> int:
    """Accelerator memory one clip `height` x `width` takes while it is denoised (ACTIVATION_COPIES), and while
    a latent model's decoder turns it into pixels."""
    element = 4 if precision == "fp32" else 2
    _, latent_height, latent_width = sampling.latent_shape(unet, vqvae, height, width)
    copies = [unet.config.block_out_channels[0] * latent_height * latent_width]
    if vqvae is not None:
        copies.append(vqvae.config.block_out_channels[0] * height * width)
    return ACTIVATION_COPIES * max(copies) * element
