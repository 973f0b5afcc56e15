"""The `audiodiff` command: one subcommand per stage. It only parses: flags become the stage's config
dataclass (a flag's destination is the field's name, and a flag not given leaves the field's default, so
each default lives in the dataclass alone, and the help says it from there: `StageParser`); every check is the
library's (the config's `__post_init__`). `jobs/<stage>.py` calls `main` with its stage name."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

from audiodiff import __version__
from audiodiff.errors import AudiodiffError



class StageParser(argparse.ArgumentParser):
    """A stage's parser. Its config dataclass ("module:Class" under audiodiff) is imported only when the stage's
    flags are parsed or its help shown, so that the command itself imports neither torch nor Ray; then each
    flag's help gets its field's default appended (where the help does not describe the default itself), and
    `{samplers}` / `{sampler_steps}` become audiodiff.sampling's names and default step counts."""

    def __init__(self, *args, config: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.config, self._described = config, not config

    def _describe(self) -> None:
        if self._described:
            return
        self._described = True
        module, name = self.config.split(":")
        fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(f"audiodiff.{module}"), name))}
        for action in self._actions:
            if action.help and "{sampler" in action.help:
                from audiodiff import sampling  # diffusers' schedulers: only for the stages that sample

                steps = ", ".join(f"{s.default_steps} for {n}" for n, s in sampling.SAMPLERS.items())
                action.help = action.help.replace("{samplers}", ", ".join(sampling.SAMPLERS))
                action.help = action.help.replace("{sampler_steps}", steps)
            field = fields.get(action.dest)
            unset = field is None or any(field.default is v for v in (None, False, dataclasses.MISSING))
            if unset or "default" in (action.help or ""):
                continue
            shown = f"{field.default:g}" if isinstance(field.default, float) else field.default
            action.help = f"{action.help} (default: {shown})" if action.help else f"default: {shown}"

    def parse_known_args(self, args=None, namespace=None):
        self._describe()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._describe()
        return super().format_help()


def _preprocess_parser(subparsers, common) -> None:
    p = subparsers.add_parser(
        "preprocess", parents=[common], config="preprocess:PreprocessConfig",
        help="audio collections -> spectrogram dataset (Ray Data, CPU)",
        epilog="example:\n  audiodiff preprocess lewtun/music_genres --genre Electronic --slices random "
               "--model teticio/audio-diffusion-instrumental-hiphop-256 --output out/spectrograms",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="audio folder or URI, parquet folder/URI, saved dataset, hf:// path or hub dataset id")
    p.add_argument("--output", required=True, help="where the spectrogram dataset goes (path, s3://, gs://)")
    p.add_argument("--genre", action="append", dest="only_genres", metavar="GENRE", help="keep this genre (repeatable)")
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
    p.add_argument("--max-seconds", type=float, help="longer tracks become rejects")
    p.add_argument("--shared-path", action="store_true", help="a local --output and inputs that every node mounts")


def _run_preprocess(args) -> None:
    from audiodiff.preprocess import PreprocessConfig, run_preprocess, summary_line

    config = _config(PreprocessConfig, args)
    _init_ray(args)
    print(summary_line(run_preprocess(config)))


def _finetune_parser(subparsers, common) -> None:
    p = subparsers.add_parser(
        "finetune", parents=[common], config="train:TrainConfig", help="DDP fine-tuning of the UNet (Ray Train)",
        epilog="example:\n  audiodiff finetune --data out/spectrograms "
               "--model teticio/audio-diffusion-instrumental-hiphop-256 --output out/model --epochs 3 --lr 1e-4\n"
               "  audiodiff finetune --data out/spectrograms --model full --condition genre --output out/genres",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="spectrogram dataset (ours or teticio's), path or URI")
    p.add_argument("--model", required=True, help="hub id, folder or URI to start from, or preset tiny/full")
    p.add_argument("--output", required=True, help="where the pipeline folder (and checkpoints/) go")
    _training_flags(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under --output")
    p.add_argument("--stop-at-step", type=int, help="end this run at that step, checkpointed; --resume continues it")


def _training_flags(p) -> None:
    """The flags of a fine-tune's settings (TrainConfig fields), shared by finetune and sweep."""
    p.add_argument("--num-workers", type=int)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); CPU and gloo otherwise")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16", "tf32"),
                   help="autocast of the forward pass (auto: bf16 on GPUs and on CPUs with native bf16); "
                        "tf32: fp32 weights, TF32 matmuls and convolutions on GPUs (fp32 is IEEE fp32)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument("--cpus-per-worker", type=float,
                   help="default: 1 with --gpu, else the cluster's CPUs shared by the workers (0.5 when streaming)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--lr-schedule", choices=("cosine", "constant", "linear"), help="after the warm-up")
    p.add_argument("--warmup-steps", type=int, help="default: 10%% of the run, at most 500")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (on --resume with other --num-workers: "
                                                  "set to keep the run's global batch)")
    p.add_argument("--grad-compression", choices=("none", "bf16"),
                   help="bf16: DDP all-reduces gradients in bf16, half the bytes between nodes")
    p.add_argument("--checkpoint-every", type=int, help="optimizer steps (and at the end)")
    p.add_argument("--log-every", type=int, help="optimizer steps")
    p.add_argument("--sample-every", type=int,
                   help="optimizer steps between samples and quality figures (and at the end)")
    p.add_argument("--num-samples", type=int, help="clips per sample step")
    p.add_argument("--sample-scheduler", help="the samples' sampler, eta 1: {samplers}")
    p.add_argument("--sample-steps", type=int, help="denoising steps of the samples")
    p.add_argument("--genre", action="append", dest="only_genres", metavar="GENRE",
                   help="train on this genre (repeatable)")
    p.add_argument("--condition", choices=("genre",),
                   help="train one model for every genre of the data, steered at generation by --genre")
    p.add_argument("--label-dropout", type=float,
                   help="with --condition: share of images trained unconditioned, for --guidance")
    p.add_argument("--seed", type=int, help="data order, noise and timesteps")
    p.add_argument("--stream", action="store_true", help="stream the data even if it fits in the object store")
    p.add_argument("--max-failures", type=int, help="worker failures to survive (FailureConfig)")
    p.add_argument("--export", choices=("best", "last"),
                   help="the pipeline's EMA weights: of the sample step with the best quality figure, or of the last "
                        "step")
    p.add_argument("--patience", type=int,
                   help="end the run after N sample steps without a better quality figure (checkpointed: --resume "
                        "goes on)")
    p.add_argument("--shared-path", action="store_true", help="a local --output and inputs that every node mounts")


def _run_finetune(args) -> None:
    from audiodiff.train import TrainConfig, run_finetune, summary_line

    config = _config(TrainConfig, args)
    _init_ray(args)
    print(summary_line(run_finetune(config)))


def _sweep_parser(subparsers, common) -> None:
    p = subparsers.add_parser(
        "sweep", parents=[common], config="sweep:SweepConfig",
        help="hyperparameter sweep of fine-tunes on Ray Tune (ASHA stops lagging trials)",
        epilog="space.yaml, for example:\n  lr: {loguniform: [1.0e-5, 1.0e-3]}\n  batch_size: {choice: [2, 4]}\n\n"
               "example:\n  audiodiff sweep --data out/spectrograms --model tiny --output out/sweep --trials 8 "
               "--max-steps 2000 --sample-every 250\n  audiodiff sweep --data out/spectrograms --model tiny "
               "--output out/sweep --space space.yaml --epochs 5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="spectrogram dataset, path or URI")
    p.add_argument("--model", required=True, help="hub id, folder or URI to start from, or preset tiny/full")
    p.add_argument("--output", required=True,
                   help="where trials.parquet, sweep.png, best/ and each trial's fine-tune (trials/) go")
    p.add_argument("--trials", type=int, help="samples of the search space (a grid's points each this many times)")
    p.add_argument("--max-steps", type=int, help="each trial ends there at the latest")
    p.add_argument("--space", help="a YAML or JSON search space (default: lr, batch size, EMA decay, warm-up, and "
                                   "label dropout for --condition genre)")
    p.add_argument("--grace-steps", type=int, help="steps before ASHA may stop a trial (default: --sample-every)")
    p.add_argument("--concurrent", type=int, help="trials at once (default: with --gpu the GPUs / --num-workers, else 1)")
    _training_flags(p.add_argument_group("finetune settings held fixed in every trial"))


def _run_sweep(args) -> None:
    from audiodiff.sweep import SweepConfig, run_sweep, summary_line
    from audiodiff.train import TrainConfig

    own = {f.name for f in dataclasses.fields(SweepConfig)}
    fixed = {name: value for name, value in _given(TrainConfig, args).items() if name not in own}
    config = dataclasses.replace(_config(SweepConfig, args), fixed=fixed)
    _init_ray(args)
    print(summary_line(run_sweep(config)))


def _clip_command(subparsers, common, name: str, help: str, examples: list[str], config: str):
    """The parser of a command that makes clips: --model, --output, and the sampler's and workers' flags in a
    group of their own; the command adds its own."""
    p = subparsers.add_parser(name, parents=[common], config=config, help=help,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="example:\n" + "\n".join(f"  audiodiff {name} {e}" for e in examples))
    p.add_argument("--model", required=True, help="hub id, model folder or URI (a preset: an untrained model)")
    p.add_argument("--output", required=True, help="where clips/, manifest.parquet and index.html go")
    p.add_argument("--shared-path", action="store_true", help="a local --output and inputs that every node mounts")
    p.add_argument("--training", help="the model's training data (spectrogram dataset): after writing, mark the clips "
                                      "that are near-copies of a training slice (manifest copy_of, gallery)")
    sampler = p.add_argument_group("sampler and workers")
    sampler.add_argument("--scheduler", help="{samplers}")
    sampler.add_argument("--karras", action="store_true",
                         help="Karras sigmas (dpm-solver, dpm-solver-sde, unipc, heun)")
    sampler.add_argument("--steps", type=int, help="denoising steps (default: {sampler_steps}; heun's steps "
                                                   "evaluate the UNet twice)")
    sampler.add_argument("--eta", type=float, help="DDIM eta (0: deterministic sampling)")
    sampler.add_argument("--seed", type=int, help="clip seeds derive from this and what tells the clips apart")
    sampler.add_argument("--batch-size", type=int,
                         help="clips (or slices) denoised together (default: by clip width, 4 standard clips on "
                              "CPU, on a GPU as many as its free memory holds, up to 64)")
    sampler.add_argument("--concurrency", type=int,
                         help="actors (default: with --gpu, every GPU the cluster has or can add, else 1)")
    sampler.add_argument("--gpu", action="store_true", help="actors on GPUs (--gpus-per-actor each)")
    sampler.add_argument("--gpus-per-actor", type=float, help="with --gpu: 1, a share such as 0.5, or more")
    sampler.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                         help="of the denoising (auto: bf16 on GPUs and on CPUs with native bf16, else fp32)")
    sampler.add_argument("--target-dbfs", type=float, help="peak level of each saved clip")
    conditions = p.add_argument_group("conditional models (each clip is made once per genre or encoding)")
    conditions.add_argument("--genre", action="append", dest="genres",
                            help="a genre of a model fine-tuned with --condition genre (repeatable)")
    conditions.add_argument("--guidance", type=float, help="classifier-free guidance scale (1: none)")
    conditions.add_argument("--encodings", help="a .parquet (name, encoding) or .safetensors file of named encodings")
    return p


_OVERLAP_HELP = ("seconds each window keeps from the one before (default: half of a window less its end frames, at "
                 "most 2 s: 2 for 256-frame models, 0.68 for tiny)")


def _generate_parser(subparsers, common) -> None:
    p = _clip_command(subparsers, common, "generate",
                      "mass-generate standard, extended and long clips (Ray Data batch inference)",
                      ["--model out/model --output out/clips --num-clips 8 --num-extended 2",
                       "--model out/model --output out/long --num-clips 2 --seconds 300"], "generate:GenerateConfig")
    p.add_argument("--num-clips", type=int, help="standard clips (x_res frames), or long ones with --seconds")
    p.add_argument("--num-extended", type=int, help="extended clips (--extend-factor x x_res frames)")
    p.add_argument("--extend-factor", type=float)
    p.add_argument("--seconds", type=float, help="make the --num-clips clips this long, window after window")
    p.add_argument("--overlap", type=float, help=_OVERLAP_HELP)


def _run_generate(args) -> None:
    from audiodiff.clips import summary_line
    from audiodiff.generate import GenerateConfig, run_generate

    config = _config(GenerateConfig, args)
    _init_ray(args)
    print(summary_line(run_generate(config)))


_AUDIO_SOURCES = "audio folder or URI, parquet folder/URI, saved dataset, hf:// path or hub dataset id"


def _remix_parser(subparsers, common) -> None:
    p = _clip_command(subparsers, common, "remix", "variations of every slice of input tracks, or of whole tracks",
                      ["song.wav --model out/model --output out/remix --variations 3",
                       "tracks/ --model out/model --output out/remix --whole-track --strength 0.3",
                       "song.wav --model out/model --output out/infill --keep-start 2 --keep-end 2"],
                      "remix:RemixConfig")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=_AUDIO_SOURCES)
    p.add_argument("--strength", type=float, help="0: the input as it is ... 1: ignore it")
    p.add_argument("--variations", type=int, help="remixes of each slice")
    p.add_argument("--keep-start", type=float, help="seconds at each slice's start kept as they are (outpainting)")
    p.add_argument("--keep-end", type=float, help="seconds at each slice's end kept as they are (with --keep-start: "
                                                  "inpainting the middle)")
    p.add_argument("--whole-track", action="store_true", help="join each track's remixed slices into one clip")


def _continue_parser(subparsers, common) -> None:
    p = _clip_command(subparsers, common, "continue", "continue each input track into a long one, window after window",
                      ["song.wav --model out/model --output out/long --seconds 300"], "remix:ContinueConfig")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=_AUDIO_SOURCES)
    p.add_argument("--seconds", type=float, required=True, help="length of each continued track")
    p.add_argument("--overlap", type=float, help=_OVERLAP_HELP)


def _interpolate_parser(subparsers, common) -> None:
    p = _clip_command(subparsers, common, "interpolate", "clips between two inputs, through their DDIM-inverted noise",
                      ["a.wav b.wav --model out/model --output out/between --points 7"], "remix:InterpolateConfig")
    p.add_argument("sources", nargs=2, metavar="CLIP", help="audio file (its first audible slice is used)")
    p.add_argument("--points", type=int, help="clips from A to B, both included")


def _run_audio_to_audio(args) -> None:
    from audiodiff import remix
    from audiodiff.clips import summary_line

    config_class, run = {"remix": (remix.RemixConfig, remix.run_remix),
                         "continue": (remix.ContinueConfig, remix.run_continue),
                         "interpolate": (remix.InterpolateConfig, remix.run_interpolate)}[args.stage]
    config = _config(config_class, args)
    _init_ray(args)
    print(summary_line(run(config)))


def _demo_parser(subparsers, common) -> None:
    p = subparsers.add_parser(
        "demo", parents=[common], config="demo:DemoConfig",
        help="all three stages on synthesised audio with the tiny model, on a local Ray",
        epilog="example:\n  audiodiff demo --output out/demo", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", help="local folder")
    p.add_argument("--epochs", type=int, help="of the tiny model's fine-tune")
    p.add_argument("--lr", type=float, help="its learning rate")


def _run_demo(args) -> None:
    from audiodiff.demo import DemoConfig, run_demo

    config = _config(DemoConfig, args)
    _init_ray(args)
    result = run_demo(config)
    print(f"demo: done; open {result['index']} in a browser to see and hear the clips")


def _evaluate_parser(subparsers, common) -> None:
    p = subparsers.add_parser(
        "evaluate", parents=[common], config="evaluate:EvaluateConfig",
        help="Fréchet and kernel distance of generated clips against reference audio, with floors (Ray Data)",
        epilog="example:\n  audiodiff evaluate --clips out/clips --reference out/spectrograms --output out/quality.json"
               "\n  audiodiff evaluate --clips out/clips --training out/spectrograms",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", required=True, help="generate output, or a folder or URI of audio files")
    p.add_argument("--reference",
                   help="folder or URI of audio files, a generate output, or a spectrogram dataset from preprocess")
    p.add_argument("--training", help="the training data (a spectrogram dataset): flag clips that are near-copies of "
                                      "a training slice (memorisation check); --reference may then be left out")
    p.add_argument("--embedding",
                   help="mel (built in) or a TorchScript module (path or URI) mapping audio to vectors; "
                        "TorchScript is code (torch.jit.load runs it): use only files you trust")
    p.add_argument("--output", help="also write the result here as JSON (path or URI)")
    p.add_argument("--shared-path", action="store_true",
                   help="local --clips and --reference that every node of the cluster mounts")
    p.add_argument("--by-genre", action="store_true",
                   help="also each genre's clips against each genre's reference (genres from the manifest, the "
                        "dataset, or the audio files' folders)")
    p.add_argument("--max-seconds", type=float,
                   help="longer audio files are rejected, not cut, and listed in `rejected`")
    p.add_argument("--clips-model", help="the model that made plain audio --clips (its codec sets a floor)")
    p.add_argument("--no-floors", action="store_true",
                   help="skip the floors (the reference's halves; the reference through the clips' codec)")


def _run_evaluate(args) -> None:
    from audiodiff.evaluate import EvaluateConfig, run_evaluate, summary_line

    config = _config(EvaluateConfig, args)
    _init_ray(args)
    print(summary_line(run_evaluate(config)))


def _config(config_class, args):
    """A stage's config dataclass from the flags given; the fields of flags not given keep their defaults."""
    return config_class(**_given(config_class, args))


def _given(config_class, args) -> dict:
    """The fields of `config_class` whose flags were given, with their values."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
            if getattr(args, f.name, None) is not None and getattr(args, f.name) is not False}


def _init_ray(args) -> None:
    from audiodiff.runtime import connect

    connect(args.address)


STAGES = {"preprocess": (_preprocess_parser, _run_preprocess), "finetune": (_finetune_parser, _run_finetune),
          "generate": (_generate_parser, _run_generate), "remix": (_remix_parser, _run_audio_to_audio),
          "continue": (_continue_parser, _run_audio_to_audio),
          "interpolate": (_interpolate_parser, _run_audio_to_audio), "evaluate": (_evaluate_parser, _run_evaluate),
          "sweep": (_sweep_parser, _run_sweep), "demo": (_demo_parser, _run_demo)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiodiff", description="Fine-tune and mass-generate mel-spectrogram audio diffusion models on Ray.")
    parser.add_argument("--version", action="version", version=f"audiodiff {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local Ray)")
    subparsers = parser.add_subparsers(dest="stage", required=True, parser_class=StageParser)
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
    except KeyboardInterrupt:
        print(f"audiodiff {args.stage}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    return 0
