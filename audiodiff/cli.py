"""The `audiodiff` command: one subcommand per stage. Flags become the stage's config dataclass here, and
nowhere else; `jobs/<stage>.py` calls `main` with its stage name."""

from __future__ import annotations

import argparse
import sys

from audiodiff import __version__
from audiodiff.errors import AudiodiffError


def _preprocess_parser(subparsers, common) -> None:
    p = subparsers.add_parser("preprocess", parents=[common],
                              help="audio collections -> spectrogram dataset (Ray Data, CPU)")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="audio folder or URI, parquet folder/URI, saved dataset, hf:// path or hub dataset id")
    p.add_argument("--output", required=True, help="where the spectrogram dataset goes (path, s3://, gs://)")
    p.add_argument("--genre", action="append", default=[], dest="genres", help="keep this genre (repeatable)")
    p.add_argument("--limit", type=int, help="at most N tracks")
    p.add_argument("--slices", choices=("all", "random"), default="all",
                   help="every full slice of each track, or one random slice per track (the notebook's choice)")
    p.add_argument("--genre-from-folder", action="store_true", help="audio folders: genre = parent folder's name")
    p.add_argument("--split", default="train", help="dataset split to read (default: train)")
    mel = p.add_mutually_exclusive_group()
    mel.add_argument("--model", help="take the mel config from this model (hub id, folder, URI or preset)")
    mel.add_argument("--mel-config", help="a mel_config.json (path or URI)")
    p.add_argument("--num-cpus", type=int, help="CPU workers (default: all CPUs of the cluster)")
    p.add_argument("--seed", type=int, default=0, help="seed for --slices random")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --output")


def _run_preprocess(args) -> None:
    from audiodiff import models, storage
    from audiodiff.mel import MelConfig
    from audiodiff.preprocess import PreprocessConfig, run_preprocess

    if args.limit is not None and args.limit < 1:
        raise AudiodiffError(f"--limit must be at least 1, got {args.limit}")
    if args.model:
        mel = models.load_mel_config(args.model)
    elif args.mel_config:
        mel = MelConfig.from_json(storage.read_bytes(args.mel_config).decode(), args.mel_config)
    else:
        mel = MelConfig()
    config = PreprocessConfig(
        sources=args.sources, output=args.output, mel=mel, genres=args.genres, limit=args.limit,
        slices=args.slices, genre_from_folder=args.genre_from_folder, split=args.split,
        num_workers=args.num_cpus, seed=args.seed, overwrite=args.overwrite,
    )
    _init_ray(args)
    stats = run_preprocess(config)
    print(f"preprocess: {stats['tracks_read']} tracks read, {stats['tracks_written']} written, "
          f"{stats['tracks_rejected']} rejected; {stats['slices_written']} slices "
          f"({stats['seconds_of_audio']:.0f} s of audio) in {stats['elapsed_seconds']:.1f} s -> {config.output}")


def _init_ray(args) -> None:
    from audiodiff.runtime import init_ray

    init_ray(args.address)


STAGES = {"preprocess": (_preprocess_parser, _run_preprocess)}


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
    args = build_parser().parse_args(argv)
    try:
        STAGES[args.stage][1](args)
    except AudiodiffError as e:
        print(f"audiodiff {args.stage}: error: {e}", file=sys.stderr)
        return 1
    return 0
