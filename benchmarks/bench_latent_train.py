"""Latent fine-tuning: audiodiff's cached latents against encoding every batch (teticio's `train_unet.py
--vae`), same tiny latent model, same steps, in one process.

    python benchmarks/bench_latent_train.py [--steps 40] [--batch-size 8] [--images 256] [--epochs 10]

Both loops run the notebook's step on latents (random timesteps, add_noise, MSE, AdamW). The reference encodes
each batch with the VAE first; audiodiff encodes each image once (`train_data.LatentDistributions`, the Ray Data stage's
callable, here called in-process) and each step draws the batch's latents from the cached distributions, as
the fine-tune loop does. The model: 64x64 spectrograms, an AutoencoderKL of factor 4 (1 latent channel, as
teticio's latent models), a UNet on the 16x16 latents. Figures: steady-state images/s of each step, the one-off
encoding cost, and audiodiff's rate over `--epochs` epochs with that cost included. Last line: one JSON object.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AudioDiffusionPipeline, AutoencoderKL, DDPMScheduler, Mel, UNet2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from audiodiff import sampling
from audiodiff.train_data import LatentDistributions
from audiodiff.devices import cpu_name


def tiny_latent_pipeline(folder: str) -> None:
    torch.manual_seed(0)
    vqvae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=1, block_out_channels=(32, 64, 64),
                          down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                          layers_per_block=1, norm_num_groups=8, sample_size=64)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=32,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    AudioDiffusionPipeline(vqvae=vqvae, unet=unet, mel=Mel(x_res=64, y_res=64),
                           scheduler=DDPMScheduler()).save_pretrained(folder)


def train_rate(folder: str, images: np.ndarray, moments: np.ndarray | None, batch_size: int, steps: int) -> float:
    """Images/s of the step after 2 warm-up steps; from cached `moments` when given, else encoding each batch."""
    pipe = AudioDiffusionPipeline.from_pretrained(folder)
    unet, vqvae, scheduler = pipe.unet.train(), pipe.vqvae.eval(), DDPMScheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    start = None
    for step in range(steps + 2):
        if step == 2:
            start = time.perf_counter()
        chosen = torch.randint(0, len(images), (batch_size,), generator=generator)
        if moments is None:
            with torch.no_grad():
                batch = sampling.to_model_space(torch.from_numpy(images[chosen.numpy()]))
                latents = vqvae.encode(batch).latent_dist.sample(generator) * vqvae.config.scaling_factor
        else:
            latents = (DiagonalGaussianDistribution(torch.from_numpy(moments[chosen.numpy()])).sample(generator)
                       * vqvae.config.scaling_factor)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(latents, noise, t), t).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=256, help="the dataset's size, for the one-off encoding")
    parser.add_argument("--epochs", type=int, default=10, help="run length over which the encoding is counted")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    cpu = cpu_name()
    images = np.random.default_rng(0).integers(0, 256, (args.images, 64, 64), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        tiny_latent_pipeline(folder)
        encoder = LatentDistributions(folder, gpu=False)
        started = time.perf_counter()
        moments = np.concatenate([encoder({"image": images[i:i + 32]})["latent"] for i in range(0, len(images), 32)])
        encode_s = time.perf_counter() - started
        reference = train_rate(folder, images, None, args.batch_size, args.steps)
        cached = train_rate(folder, images, moments, args.batch_size, args.steps)
    run_images = args.epochs * args.images
    with_encoding = run_images / (run_images / cached + encode_s)
    figures = {"cpu": cpu, "cores": os.cpu_count(), "batch_size": args.batch_size, "images": args.images,
               "encode_every_batch_images_per_s": reference, "cached_latents_images_per_s": cached,
               "one_off_encoding_s": encode_s, f"cached_with_encoding_over_{args.epochs}_epochs_images_per_s": with_encoding,
               "cached_over_encode_every_batch": cached / reference,
               "cached_with_encoding_over_encode_every_batch": with_encoding / reference}
    print(f"CPU: {cpu} ({os.cpu_count()} cores); tiny latent model (64x64 -> 1x16x16), batch {args.batch_size}")
    print(f"encoding every batch (teticio's --vae): {reference:7.1f} images/s")
    print(f"cached latents (audiodiff):             {cached:7.1f} images/s ({cached / reference:.2f}x)")
    print(f"one-off encoding of {args.images} images: {encode_s:.2f} s; over {args.epochs} epochs with it: "
          f"{with_encoding:.1f} images/s ({with_encoding / reference:.2f}x)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
