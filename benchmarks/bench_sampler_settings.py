"""Why DDPM clips come out brighter than the data and deterministic DDIM turns a briefly trained model's output
into noise texture: the model's own bias, against each scheduler setting, on a fine-tuned model and held-out data.

    python benchmarks/bench_sampler_settings.py --model WORK/model --reference WORK/spectrograms-held-out [--clips 8]

1. The model: held-out slices noised to timestep t, the clean image the model predicts from them
   (x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)) against the true one: its mean grey level's bias (brightness),
   its error, and how much of it lies outside [-1, 1] (what `clip_sample` cuts).
2. The samplers: for each setting (DDPM and DDIM with the model's config, then one setting changed at a time:
   `clip_sample`, `timestep_spacing`, `set_alpha_to_one`, eta), --clips clips per genre from the same seeds; mean
   grey, share of bright pixels and the quality figures (Fréchet and kernel distance of the mel embedding) against
   the reference, with the reference's own grey levels beside them. In process, no Ray.
Prints a table per part and, last, one JSON object.
"""

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import torch

from audiodiff import sampling, storage
from audiodiff.dataset import decode_images, open_spectrograms
from audiodiff.devices import cpu_name
from audiodiff.metrics import distances, mel_embedding
from audiodiff.models import load_model

# diffusers' dynamic thresholding with its ceiling at 1: the predicted clean image clamped to [-1, 1] each step,
# what clip_sample does for DDPM and DDIM, for the multistep solvers (which have no clip_sample)
# (sampling.make_scheduler does so for a model that clips; UNCLIPPED undoes it)
CLIPPED, UNCLIPPED = {"thresholding": True, "sample_max_value": 1.0}, {"thresholding": False}
BRIGHT = 200  # grey level: the share of pixels above it is the bright-tail statistic of the issue


def reference_images(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, height, width] and each image's genre."""
    images, genres = [], []
    for file in open_spectrograms(uri).files:
        fs, path = storage.resolve(file)
        batch = pq.read_table(path, filesystem=fs).to_pydict()
        images.append(decode_images({k: np.array(v, dtype=object) for k, v in batch.items()})["image"])
        genres.extend(batch["genre"])
    return np.concatenate(images), np.array(genres)


def grey(images: np.ndarray) -> dict:
    return {"mean_grey": round(float(images.mean()), 1), "bright_share": round(float((images > BRIGHT).mean()), 3)}


@torch.no_grad()
def model_bias(parts, images: np.ndarray, genres: np.ndarray, timesteps: list[int]) -> list[dict]:
    """Per timestep: the predicted clean image's mean bias and RMS error in grey levels, and its share outside
    [-1, 1]."""
    scheduler = parts.scheduler
    x0 = sampling.to_model_space(torch.from_numpy(images))
    generator = torch.Generator().manual_seed(0)
    encoding = (torch.cat([parts.conditioning.encoding(g) for g in genres]) if parts.conditioning else None)
    rows = []
    for t in timesteps:
        noise = torch.randn(x0.shape, generator=generator)
        steps = torch.full((len(x0),), t, dtype=torch.long)
        noisy = scheduler.add_noise(x0, noise, steps)
        eps = sampling.predict_noise(parts.unet, noisy, steps, encoding)
        alpha = scheduler.alphas_cumprod[t]
        predicted = (noisy - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        to_grey = 127.5
        rows.append({"t": t, "bias_grey": round(float((predicted - x0).mean()) * to_grey, 1),
                     "rms_error_grey": round(float((predicted - x0).pow(2).mean().sqrt()) * to_grey, 1),
                     "outside_unit": round(float((predicted.abs() > 1).float().mean()), 3),
                     "eps_std": round(float(eps.std()), 3)})
    return rows


def settings(parts) -> list[tuple[str, str, int, dict, float]]:
    """(label, sampler, steps, config changes, eta): the model's own config first, then one change at a time."""
    config = parts.scheduler.config
    own = f"clip_sample={config.clip_sample}, spacing={config.timestep_spacing}"
    return [
        (f"ddpm 100 ({own})", "ddpm", 100, {}, 0.0),
        ("ddpm 100 clip_sample=False", "ddpm", 100, {"clip_sample": False}, 0.0),
        (f"ddim 50 eta 0 ({own}, set_alpha_to_one={config.get('set_alpha_to_one', True)})", "ddim", 50, {}, 0.0),
        ("ddim 50 eta 0 clip_sample=False", "ddim", 50, {"clip_sample": False}, 0.0),
        ("ddim 50 eta 0 trailing", "ddim", 50, {"timestep_spacing": "trailing"}, 0.0),
        ("ddim 50 eta 0 trailing clip_sample=False", "ddim", 50, {"timestep_spacing": "trailing",
                                                                   "clip_sample": False}, 0.0),
        ("ddim 50 eta 0 set_alpha_to_one=False", "ddim", 50, {"set_alpha_to_one": False}, 0.0),
        ("ddim 50 eta 1 (own)", "ddim", 50, {}, 1.0),
        ("ddim 50 eta 1 clip_sample=False", "ddim", 50, {"clip_sample": False}, 1.0),
        ("dpm-solver 20 unclipped", "dpm-solver", 20, UNCLIPPED, 0.0),
        ("dpm-solver 20 unclipped trailing", "dpm-solver", 20, {**UNCLIPPED, "timestep_spacing": "trailing"}, 0.0),
        ("dpm-solver 20 x0 clipped (thresholding at 1)", "dpm-solver", 20, CLIPPED, 0.0),
        ("unipc 20 unclipped", "unipc", 20, UNCLIPPED, 0.0),
        ("unipc 20 x0 clipped (thresholding at 1)", "unipc", 20, CLIPPED, 0.0),
        ("dpm-solver-sde 20 unclipped", "dpm-solver-sde", 20, UNCLIPPED, 0.0),
        ("dpm-solver-sde 20 x0 clipped (thresholding at 1)", "dpm-solver-sde", 20, CLIPPED, 0.0),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--reference", required=True, help="held-out spectrogram dataset (with a genre column)")
    parser.add_argument("--clips", type=int, default=4, help="per genre and setting")
    parser.add_argument("--bias-images", type=int, default=96, help="held-out slices for part 1")
    args = parser.parse_args()
    torch.manual_seed(0)
    parts = load_model(args.model)
    parts.unet.eval()
    mel = parts.mel
    reference, reference_genres = reference_images(args.reference)
    ref_vectors = mel_embedding(reference, mel)
    print(f"reference: {len(reference)} slices, {grey(reference)}")

    chosen = np.random.default_rng(0).permutation(len(reference))[: args.bias_images]
    bias = model_bias(parts, reference[chosen], reference_genres[chosen], [10, 50, 100, 200, 400, 600, 800, 950, 999])
    print(f"\n{'t':>5} {'x0 bias (grey)':>15} {'x0 RMS error':>13} {'x0 outside [-1,1]':>18} {'eps std':>8}")
    for row in bias:
        print(f"{row['t']:>5} {row['bias_grey']:>15} {row['rms_error_grey']:>13} {row['outside_unit']:>18} "
              f"{row['eps_std']:>8}")

    genres = parts.conditioning.names if parts.conditioning else [None]
    labels = [g for g in genres for _ in range(args.clips)]
    encoding = torch.cat([parts.conditioning.encoding(g) for g in labels]) if parts.conditioning else None
    seeds = list(range(len(labels)))
    results = []
    print(f"\n{'setting':<58} {'mean grey':>9} {'>200':>6} {'Fréchet':>9} {'kernel':>8}")
    for label, name, steps, changes, eta in settings(parts):
        template = sampling.make_scheduler(name, parts.scheduler.config)
        scheduler = type(template).from_config(template.config, **changes)
        images = sampling.sample(parts.unet, scheduler, sampling.generators(seeds), mel.y_res, mel.x_res, steps,
                                 eta=eta, encoding=encoding).numpy()
        figures = distances(mel_embedding(images, mel), ref_vectors)
        row = {"setting": label, **grey(images), **{k: round(float(v), 4) for k, v in figures.items()}}
        results.append(row)
        print(f"{label:<58} {row['mean_grey']:>9} {row['bright_share']:>6} {row['frechet_distance']:>9.1f} "
              f"{row['kernel_distance']:>8.4f}")
    print(json.dumps({"cpu": cpu_name(), "model": args.model, "reference": {"slices": len(reference),
                      **grey(reference)}, "model_bias": bias, "settings": results}))


if __name__ == "__main__":
    main()
