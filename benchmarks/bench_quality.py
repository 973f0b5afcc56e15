"""The quality/speed frontier of the samplers on real music: quality of clips against held-out tracks by sampler
and steps, against the UNet evaluations each clip costs.

    python benchmarks/bench_quality.py --music DIR --work DIR [--samplers ddpm,ddim] [--steps 5,10,15,20,30,50,100]
                                       [--clips 8] [--epochs 10] [--train-tracks 10] [--held-out 3] [--seconds 45]

--music: a folder of recorded music, a genre per subfolder (`DIR/<genre>/*.ogg`), e.g. Debian's game
soundtracks: `apt-get download ufoai-music; dpkg -x ufoai-music_*.deb x` and the tracks of a few composers
linked into genre folders (BENCHMARKS.md says which). Never commit their audio: --work goes outside the repo.
Per genre, the sorted tracks' last --held-out are held out, the --train-tracks before them train; each is cut to
its first --seconds, mono 22050 Hz (`WORK/tracks/{train,held-out}/<genre>/`).

Then, each step skipped when its output is in --work already (a rerun resumes, an interrupted fine-tune from its last
checkpoint):
1. preprocess both sets with the --preset's mel config (genre from the folder);
2. the untrained preset's clips (DDIM 50) and their quality: the figure to beat;
3. fine-tune the preset with `--condition genre` (lr --lr constant, batch --batch-size, --epochs);
4. the floor: the training tracks against the held-out ones (and evaluate's floors: the held-out tracks' halves,
   the held-out tracks through the model's codec and Griffin-Lim, the best a clip of this codec can score);
5. for every sampler and step count, and DDPM-1000 (the notebook's sampler: the reference), --clips clips per
   genre (seeds 0..), scored against the held-out spectrograms (evaluate: clips' WAVs cut into the model's mel
   slices); UNet evaluations per clip: the scheduler's timesteps for that many steps (Heun's are doubled by
   diffusers), twice with guidance.
It prints the frontier, the cheapest point within --tolerance (5%) of DDPM-1000's figure, whether the fine-tuned
model beat the untrained one clearly (its best point below --beat x the untrained figure), writes
`frontier.png` (quality against evaluations, a line per sampler) to --plot, and, last, one JSON object.
"""

import argparse
import functools
import json
import os
import time

import numpy as np
import torch
from bench_sampler_settings import grey, reference_images

from audiodiff import storage
from audiodiff.audio import AUDIO_EXTENSIONS, load_audio
from audiodiff.encode import wav_bytes
from audiodiff.evaluate import EvaluateConfig, run_evaluate
from audiodiff.generate import GenerateConfig, run_generate
from audiodiff import sampling
from audiodiff.dataset import mel_config as dataset_mel_config
from audiodiff.metrics import distances, kernel_distance, mel_embedding
from audiodiff.models import load_model
from audiodiff.sampling import make_scheduler, unet_evaluations
from audiodiff.preprocess import PreprocessConfig, run_preprocess
from audiodiff.runtime import init_ray
from audiodiff.train import TrainConfig, run_finetune
from audiodiff.devices import cpu_name

RATE = 22050
REFERENCE = ("ddpm", 1000)


def cut_tracks(music: str, work: str, train: int, held_out: int, seconds: float) -> dict:
    """{"train"|"held-out": {genre: [track names]}}; each track's first `seconds`, mono, as WAV under work."""
    split = {"train": {}, "held-out": {}}
    for genre in sorted(os.listdir(music)):
        folder = os.path.join(music, genre)
        if not os.path.isdir(folder):
            continue
        tracks = sorted(f for f in os.listdir(folder) if f.lower().endswith(AUDIO_EXTENSIONS))
        if len(tracks) < held_out + 1:
            raise SystemExit(f"{folder}: {len(tracks)} tracks, at least {held_out + 1} needed (--held-out {held_out})")
        chosen = {"train": tracks[:-held_out][-train:], "held-out": tracks[-held_out:]}
        for part, names in chosen.items():
            split[part][genre] = names
            for name in names:
                target = os.path.join(work, "tracks", part, genre, os.path.splitext(name)[0] + ".wav")
                if not os.path.exists(target):
                    audio = load_audio(os.path.join(folder, name), RATE)[: int(seconds * RATE)]
                    storage.write_bytes(target, wav_bytes(audio, RATE))
    if not split["train"]:
        raise SystemExit(f"{music}: no genre folders with audio")
    return split


def preprocess(work: str, part: str, preset: str) -> str:
    output = os.path.join(work, f"spectrograms-{part}")
    if not os.path.exists(os.path.join(output, "stats.json")):
        run_preprocess(PreprocessConfig(sources=[os.path.join(work, "tracks", part)], output=output, model=preset,
                                        genre_from_folder=True, overwrite=True))
    return output


def evaluations(model: str, scheduler: str, steps: int, guidance: float) -> int:
    """UNet evaluations per clip of one sampler and step count (twice with guidance)."""
    return unet_evaluations(make_scheduler(scheduler, load_model(model).scheduler.config), steps,
                            guided=guidance != 1)


def clips_and_score(work: str, model: str, name: str, scheduler: str, steps: int, args, genres: list[str] | None,
                    reference: str) -> dict:
    """`--clips` clips per genre (of an unconditional model, as many in all) of one sampler and step count, and
    their figures against `reference`; cached in the clips' folder."""
    output = os.path.join(work, "clips", f"{name}-{scheduler}-{steps}")
    scored = os.path.join(output, "quality.json")
    if os.path.exists(scored):
        with open(scored) as f:
            return json.load(f)
    started = time.perf_counter()
    num_clips = args.clips if genres else args.clips * len(os.listdir(os.path.join(work, "tracks", "train")))
    run_generate(GenerateConfig(model=model, output=output, num_clips=num_clips, scheduler=scheduler, steps=steps,
                                eta=args.eta if scheduler == "ddim" else 0.0, batch_size=args.batch_size,
                                genres=genres or [], guidance=args.guidance if genres else 1.0))
    seconds = time.perf_counter() - started
    result = run_evaluate(EvaluateConfig(clips=output, reference=reference, no_floors=True, by_genre=bool(genres)))
    point = {"sampler": scheduler, "steps": steps,
             "evaluations": evaluations(model, scheduler, steps, args.guidance if genres else 1.0),
             "frechet_distance": result["frechet_distance"], "kernel_distance": result["kernel_distance"],
             "clips": result["clips"]["items"], "generate_seconds": round(seconds, 1)}
    if genres:  # the clips of each genre nearest the held-out tracks of which genre
        point["nearest_genre"] = {g: min(row, key=row.get) for g, row in result["by_genre"].items()}
    storage.write_bytes(scored, (json.dumps(point, indent=2) + "\n").encode())
    return point


def images_and_score(work: str, model: str, name: str, scheduler: str, steps: int, args, genres: list[str] | None,
                     reference: str) -> dict:
    """`clips_and_score` without Ray, Griffin-Lim or files (--in-process): the sampler's images themselves, from
    the same seeds, scored against the held-out slices in the model's mel space; cached in WORK/images."""
    scored = os.path.join(work, "images", f"{name}-{scheduler}-{steps}.json")
    if os.path.exists(scored):
        with open(scored) as f:
            return json.load(f)
    parts, (reference_vectors, _) = _loaded(model), _reference(reference)
    labels = [g for g in genres for _ in range(args.clips)] if genres else [None] * args.clips * 3
    guidance = args.guidance if genres else 1.0
    encoding = torch.cat([parts.conditioning.encoding(g) for g in labels]) if parts.conditioning else None
    null = parts.conditioning.encoding(None) if parts.conditioning and guidance != 1 else None
    started = time.perf_counter()
    images = sampling.sample(parts.unet, make_scheduler(scheduler, parts.scheduler.config), sampling.generators(
        list(range(len(labels)))), parts.mel.y_res, parts.mel.x_res, steps, eta=args.eta if scheduler == "ddim" else 0.0,
        encoding=encoding, null_encoding=null, guidance=guidance).numpy()
    seconds = time.perf_counter() - started
    point = {"sampler": scheduler, "steps": steps, "evaluations": evaluations(model, scheduler, steps, guidance),
             **distances(mel_embedding(images, parts.mel), reference_vectors), "clips": len(images),
             "generate_seconds": round(seconds, 1), **grey(images)}
    if genres:  # the clips of each genre nearest the held-out slices of which genre (kernel distance)
        point["nearest_genre"] = {}
        vectors_of = _reference(reference)[1]
        for genre in genres:
            mine = mel_embedding(images[np.array(labels) == genre], parts.mel)
            row = {g: kernel_distance(mine, v) for g, v in vectors_of.items()}
            point["nearest_genre"][genre] = min(row, key=row.get)
    storage.write_bytes(scored, (json.dumps(point, indent=2) + "\n").encode())
    return point


@functools.cache
def _loaded(model: str):
    parts = load_model(model)
    parts.unet.eval()
    return parts


@functools.cache
def _reference(uri: str) -> tuple[np.ndarray, dict]:
    """The held-out slices' embedding vectors, all and by genre."""
    images, genres = reference_images(uri)
    mel = dataset_mel_config(uri)
    return mel_embedding(images, mel), {g: mel_embedding(images[genres == g], mel) for g in sorted(set(genres))}


def finetune(data: str, model: str, args) -> dict:
    """The fine-tune's result (with its `seconds`), run once; an interrupted one continues from its checkpoint."""
    done = os.path.join(args.work, "finetune.json")
    if os.path.exists(done):
        with open(done) as f:
            trained = json.load(f)
        if trained["epochs"] != args.epochs:
            raise SystemExit(f"{done}: the model was fine-tuned for {trained['epochs']} epochs, not --epochs "
                             f"{args.epochs}; give another --work (its tracks and datasets can be copied over)")
        return trained
    started = time.perf_counter()
    trained = run_finetune(TrainConfig(data=data, model=args.preset, output=model, epochs=args.epochs, lr=args.lr,
                                       lr_schedule="constant", batch_size=args.batch_size, condition="genre",
                                       resume=os.path.exists(os.path.join(model, "checkpoints"))))
    trained.update(epochs=args.epochs, seconds=round(time.perf_counter() - started))
    storage.write_bytes(done, json.dumps(trained).encode())
    return trained


def cheapest_within(points: list[dict], reference: dict, figure: str, tolerance: float) -> dict | None:
    """The point of fewest evaluations whose figure is at most (1 + tolerance) x the reference's."""
    good = [p for p in points if p[figure] <= reference[figure] * (1 + tolerance)]
    return min(good, key=lambda p: (p["evaluations"], p[figure])) if good else None


def plot(points: list[dict], reference: dict, floor: dict, figure: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(7, 4.5))
    for sampler in sorted({p["sampler"] for p in points}):
        line = sorted((p for p in points if p["sampler"] == sampler), key=lambda p: p["evaluations"])
        axes.plot([p["evaluations"] for p in line], [p[figure] for p in line], marker="o", label=sampler)
    axes.scatter([reference["evaluations"]], [reference[figure]], marker="*", s=160, color="black", zorder=3,
                 label="DDPM-1000 (reference)")
    axes.axhline(reference[figure] * 1.05, color="black", linestyle=":", linewidth=1, label="DDPM-1000 + 5%")
    axes.axhline(floor[figure], color="grey", linestyle="--", label="floor: training vs held-out tracks")
    axes.set(xscale="log", xlabel="UNet evaluations per clip (log)",
             ylabel=f"{figure.replace('_', ' ')} to held-out tracks (lower is better)",
             title="quality against cost, per sampler")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--music", required=True, help="folder of recorded music, a genre per subfolder")
    parser.add_argument("--work", required=True, help="where tracks, datasets, the model and clips go (resumable)")
    parser.add_argument("--samplers", default="ddpm,ddim", help="comma-separated --scheduler names")
    parser.add_argument("--steps", default="5,10,15,20,30,50,100", help="comma-separated step counts")
    parser.add_argument("--clips", type=int, default=8, help="clips per genre and point")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--train-tracks", type=int, default=10, help="per genre")
    parser.add_argument("--held-out", type=int, default=3, help="tracks per genre")
    parser.add_argument("--seconds", type=float, default=45.0, help="of each track, from its start")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8, help="of the fine-tune and of generation")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance of the clips")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM's eta")
    parser.add_argument("--figure", choices=("frechet_distance", "kernel_distance"), default="frechet_distance",
                        help="the figure the frontier and the 5%% rule use")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--beat", type=float, default=0.5,
                        help="trained enough: best point below this share of the untrained model's figure")
    parser.add_argument("--plot", default="frontier.png")
    parser.add_argument("--in-process", action="store_true",
                        help="score the sampler's images in process (no Ray, Griffin-Lim or files): the sampler alone")
    args = parser.parse_args()
    samplers, step_counts = args.samplers.split(","), [int(s) for s in args.steps.split(",")]

    init_ray()
    split = cut_tracks(args.music, args.work, args.train_tracks, args.held_out, args.seconds)
    genres = sorted(split["train"])
    print(f"tracks: {json.dumps(split)}")
    train_data, held_out = preprocess(args.work, "train", args.preset), preprocess(args.work, "held-out", args.preset)

    score = images_and_score if args.in_process else clips_and_score
    untrained = score(args.work, args.preset, "untrained", "ddim", 50, args, None, held_out)
    print(f"untrained {args.preset} (DDIM 50, eta {args.eta}): Fréchet {untrained['frechet_distance']:.1f}, "
          f"kernel {untrained['kernel_distance']:.4f}")

    model = os.path.join(args.work, "model")
    trained = finetune(train_data, model, args)
    print(f"fine-tuned: {trained['steps']} steps on {trained['images']} images, loss {trained['first_loss']:.4f} -> "
          f"{trained['last_loss']:.4f} ({trained['seconds']} s)")

    floor_file = os.path.join(args.work, "floor.json")
    if not os.path.exists(floor_file):
        floor = run_evaluate(EvaluateConfig(clips=train_data, reference=held_out, clips_model=model, by_genre=True))
        storage.write_bytes(floor_file, json.dumps(floor, indent=2).encode())
    with open(floor_file) as f:
        floor = json.load(f)
    print(f"floor (training tracks vs held-out): Fréchet {floor['frechet_distance']:.1f}, kernel "
          f"{floor['kernel_distance']:.4f}; held-out halves {floor['floors']['reference_halves']}; "
          f"held-out through the codec {floor['floors']['rendered_reference']}")

    reference = score(args.work, model, "trained", *REFERENCE, args, genres, held_out)
    points = [score(args.work, model, "trained", s, n, args, genres, held_out)
              for s in samplers for n in step_counts if (s, n) != REFERENCE]
    figure = args.figure
    print(f"\n{'sampler':>16} {'steps':>6} {'evals/clip':>10} {'Fréchet':>10} {'kernel':>8} {'x DDPM-1000':>11}")
    for p in [*sorted(points, key=lambda p: (p["sampler"], p["steps"])), reference]:
        print(f"{p['sampler']:>16} {p['steps']:>6} {p['evaluations']:>10} {p['frechet_distance']:>10.1f} "
              f"{p['kernel_distance']:>8.4f} {p[figure] / reference[figure]:>11.2f}")
    best = cheapest_within(points, reference, figure, args.tolerance)
    print(f"cheapest within {args.tolerance:.0%} of DDPM-1000 ({figure}): "
          + (f"{best['sampler']} {best['steps']} steps, {best['evaluations']} evaluations per clip "
             f"({reference['evaluations'] / best['evaluations']:.0f}x fewer)" if best else "none"))
    best_point = min([*points, reference], key=lambda p: p[figure])
    trained_enough = best_point[figure] < args.beat * untrained[figure]
    print(f"trained enough: {trained_enough} (best {best_point[figure]:.4g} against the untrained "
          f"{untrained[figure]:.4g}; --beat {args.beat})")
    plot(points, reference, floor, figure, args.plot)
    print(f"plot: {args.plot}")
    print(json.dumps({"cpu": cpu_name(), "preset": args.preset, "genres": genres, "tracks": split,
                      "seconds_per_track": args.seconds, "epochs": args.epochs, "steps_trained": trained["steps"],
                      "train_seconds": trained["seconds"], "untrained": untrained, "trained_enough": trained_enough,
                      "floor": {"frechet_distance": floor["frechet_distance"],
                                "kernel_distance": floor["kernel_distance"], **floor["floors"]},
                      "reference": reference, "points": points, "cheapest_within_tolerance": best,
                      "figure": figure, "tolerance": args.tolerance}))


if __name__ == "__main__":
    main()
