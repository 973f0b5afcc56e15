"""The `audiodiff` command: one subcommand per stage. It only parses: flags become the stage's config
dataclass (a flag's destination is the field's name, and a flag not given leaves the field's default, so
each default lives in the dataclass alone); every check is the library's. `jobs/<stage>.py` calls `main`
with its stage name."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from audiodiff import __version__
from audiodiff.errors import AudiodiffError


def _preprocess_parser(subparsers, common) -> None:
    p = subparsers.add_parser("preprocess", parents=[common],
                              help="audio collections -> spectrogram dataset (Ray Data, CPU)")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="audio folder or URI, parquet folder/URI, saved dataset, hf:// path or hub dataset id")
    p.add_argument("--output", required=True, help="where the spectrogram dataset goes (path, s3://, gs://)")
    p.add_argument("--genre", action="append", dest="genres", help="keep this genre (repeatable)")
    p.add_argument("--limit", type=int, help="at most N tracks")
    p.add_argument("--slices", choices=("all", "random"),
                   help="every full slice of each track, or one random slice per track (the notebook's choice)")
    p.add_argument("--genre-from-folder", action="store_true", help="audio folders: genre = parent folder's name")
    p.add_argument("--split", help="dataset split to read")
    mel = p.add_mutually_exclusive_group()
    mel.add_argument("--model", help="take the mel config from this model (hub id, folder, URI or preset)")
    mel.add_argument("--mel-config", help="a mel_config.json (path or URI)")
    p.add_argument("--num-cpus", type=int, dest="num_workers",
                   help="CPU workers (default: up to the CPUs the cluster has or can scale to)")
    p.add_argument("--seed", type=int, help="seed for --slices random")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --output")


def _run_preprocess(args) -> None:
    from audiodiff.preprocess import PreprocessConfig, run_preprocess, summary_line

    config = _config(PreprocessConfig, args)
    _init_ray(args)
    print(summary_line(run_preprocess(config), config.output))


def _finetune_parser(subparsers, common) -> None:
    p = subparsers.add_parser("finetune", parents=[common], help="DDP fine-tuning of the UNet (Ray Train)")
    p.add_argument("--data", required=True, help="spectrogram dataset (ours or teticio's), path or URI")
    p.add_argument("--model", required=True, help="hub id, folder or URI to start from, or preset tiny/full")
    p.add_argument("--output", required=True, help="where the pipeline folder (and checkpoints/) go")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); CPU and gloo otherwise")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument("--cpus-per-worker", type=float,
                   help="default: 1 with --gpu, else the cluster's CPUs shared by the workers (0.5 when streaming)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant", "linear"), help="after the warm-up (default: cosine)")
    p.add_argument("--warmup-steps", type=int, help="default: 10%% of the run, at most 500")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--checkpoint-every", type=int, help="optimizer steps (default: 500, and at the end)")
    p.add_argument("--log-every", type=int, help="optimizer steps (default: 10)")
    p.add_argument("--sample-every", type=int,
                   help="optimizer steps between samples and quality figures (default: 500, and at the end)")
    p.add_argument("--num-samples", type=int, help="clips per sample step (default: 8)")
    p.add_argument("--sample-steps", type=int, help="DDIM steps of the samples (default: 20)")
    p.add_argument("--genre", action="append", dest="genres", help="train on this genre (repeatable)")
    p.add_argument("--seed", type=int, help="data order, noise and timesteps (default: 0)")
    p.add_argument("--stream", action="store_true", help="stream the data even if it fits in the object store")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under --output")
    p.add_argument("--stop-at-step", type=int, help="end this run at that step, checkpointed; --resume continues it")
    p.add_argument("--max-failures", type=int, help="worker failures to survive (FailureConfig)")


def _run_finetune(args) -> None:
    from audiodiff.train import TrainConfig, run_finetune, summary_line

    config = _config(TrainConfig, args)
    _init_ray(args)
    print(summary_line(run_finetune(config)))


def _generate_parser(subparsers, common) -> None:
    p = subparsers.add_parser("generate", parents=[common],
                              help="mass-generate standard and extended clips (Ray Data batch inference)")
    p.add_argument("--model", required=True, help="hub id, model folder or URI (or a preset, untrained)")
    p.add_argument("--output", required=True, help="where clips/, manifest.parquet and index.html go")
    p.add_argument("--num-clips", type=int, help="standard clips (x_res frames)")
    p.add_argument("--num-extended", type=int, help="extended clips (--extend-factor x x_res frames)")
    p.add_argument("--extend-factor", type=float)
    p.add_argument("--scheduler", help="ddpm or ddim")
    p.add_argument("--steps", type=int, help="denoising steps (default: 1000 for ddpm, 50 for ddim)")
    p.add_argument("--eta", type=float, help="DDIM eta (0: deterministic sampling)")
    p.add_argument("--seed", type=int, help="clip seeds derive from this and the clip's index")
    p.add_argument("--batch-size", type=int, help="clips denoised together")
    p.add_argument("--concurrency", type=int, help="actors (one GPU each with --gpu)")
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--target-dbfs", type=float, help="peak level of each saved clip")


def _run_generate(args) -> None:
    from audiodiff.generate import GenerateConfig, run_generate, summary_line

    config = _config(GenerateConfig, args)
    _init_ray(args)
    print(summary_line(run_generate(config)))


def _demo_parser(subparsers, common) -> None:
    p = subparsers.add_parser("demo", parents=[common],
                              help="all three stages on synthesised audio with the tiny model, on a local Ray")
    p.add_argument("--output", help="local folder (default: out/demo)")
    p.add_argument("--epochs", type=int, help="of the tiny model's fine-tune (default: 20)")
    p.add_argument("--lr", type=float, help="its learning rate (default: 1e-3)")


def _run_demo(args) -> None:
    from audiodiff.demo import DemoConfig, run_demo

    config = _config(DemoConfig, args)
    _init_ray(args)
    result = run_demo(config)
    print(f"demo: done; open {result['index']} in a browser to see and hear the clips")


def _evaluate_parser(subparsers, common) -> None:
    p = subparsers.add_parser("evaluate", parents=[common],
                              help="Fréchet distance of generated clips against reference audio (Ray Data)")
    p.add_argument("--clips", required=True, help="generate output, or a folder or URI of audio files")
    p.add_argument("--reference", required=True,
                   help="folder or URI of audio files, a generate output, or a spectrogram dataset from preprocess")
    p.add_argument("--embedding",
                   help="mel (built in, the default) or a TorchScript module (path or URI) mapping audio to vectors")
    p.add_argument("--output", help="also write the result here as JSON (path or URI)")


def _run_evaluate(args) -> None:
    from audiodiff.evaluate import EvaluateConfig, run_evaluate, summary_line

    config = _config(EvaluateConfig, args)
    _init_ray(args)
    print(summary_line(run_evaluate(config), config))


def _config(config_class, args):
    """A stage's config dataclass from the flags given; the fields of flags not given keep their defaults."""
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
                           if getattr(args, f.name, None) is not None and getattr(args, f.name) is not False})


def _init_ray(args) -> None:
    from audiodiff.runtime import init_ray

    init_ray(args.address)


STAGES = {"preprocess": (_preprocess_parser, _run_preprocess), "finetune": (_finetune_parser, _run_finetune),
          "generate": (_generate_parser, _run_generate), "evaluate": (_evaluate_parser, _run_evaluate),
          "demo": (_demo_parser, _run_demo)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiodiff", description="Fine-tune and mass-generate mel-spectrogram audio diffusion models on Ray.")
    parser.add_argument("--version", action="version", version=f"audiodiff {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local Ray)")
    subparsers = parser.add_subparsers(dest="stage", required=True)
    for add_parser, _ in STAGES.values():
        add_parser(subparsers, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Under `ray job submit` stdout is a file: line by line, so that `ray job logs` follows the run as it goes.
    sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    try:
        STAGES[args.stage][1](args)
    except AudiodiffError as e:
        print(f"audiodiff {args.stage}: error: {e}", file=sys.stderr)
        return 1
    return 0
