"""Hyperparameter sweeps on Ray Tune: each trial is a fine-tune (audiodiff.train's run_finetune, the same loop,
a Ray Train run of its own), reporting the quality figure (Fréchet distance to held-out images, lower is better)
at its sample steps; ASHA stops the trials whose figure lags theirs at the same step.

Ray Tune runs the trials (Ray Train V2 inside Tune: each trial's function starts its Train run, and
TuneReportCallback carries the run's sample-step reports to Tune). Under `--output`: `sweep.json` (the sweep's
settings, written first: what marks the folder as a sweep's), `tune/` (Tune's experiment state: an interrupted
sweep is restored from it), `trials/<trial id>/` (each trial's fine-tune output), `trials.parquet`, `sweep.png` and
`best/`, the pipeline of the trial with the best figure among those that ran to their end.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from audiodiff import ownership, storage
from audiodiff.errors import AudiodiffError
from audiodiff.models import load_model, save_model
from audiodiff.runtime import LIGHT_CPUS, cluster_capacity, init_ray
from audiodiff.train import TrainConfig, run_finetune

METRIC = "frechet_distance"
EXPERIMENT = "tune"
TRIAL_CPUS = LIGHT_CPUS  # a trial's function only waits on its Train run (whose workers ask for their own CPUs)
REDUCTION_FACTOR = 2  # ASHA keeps the better half of the trials at each rung
# TrainConfig fields a sweep sets itself, or that do not change what a trial computes: not in a search space
NOT_SEARCHED = {"data", "model", "output", "resume", "stop_at_step", "shared_path", "max_failures", "num_workers",
                "gpu", "cpus_per_worker", "log_every", "sample_every", "num_samples", "sample_scheduler",
                "sample_steps", "checkpoint_every"}
DISTRIBUTIONS = {"choice": ray.tune.choice, "grid": ray.tune.grid_search, "uniform": ray.tune.uniform,
                 "loguniform": ray.tune.loguniform, "randint": ray.tune.randint}
# the pipeline's own files beside its components, copied into best/ with them
RUN_RECORDS = ("metrics.jsonl", "loss.png", "finetune.json")


@dataclasses.dataclass
class SweepConfig:
    data: str
    model: str
    output: str
    trials: int = 8  # samples of the search space (a grid's points each this many times)
    max_steps: int | None = None  # each trial ends there at the latest (its schedule still spans --epochs)
    space: str | None = None  # a YAML/JSON search space; default: default_space()
    grace_steps: int | None = None  # ASHA's first rung; default: --sample-every (the first figure)
    concurrent: int | None = None  # trials at once; default: with --gpu the GPUs / workers, else 1
    fixed: dict = dataclasses.field(default_factory=dict)  # finetune settings held fixed in every trial

    def __post_init__(self):
        for name in ("trials", "max_steps", "grace_steps", "concurrent"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AudiodiffError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        unknown = sorted(set(self.fixed) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise AudiodiffError(f"sweep: not finetune settings: {', '.join(unknown)}")
        self.base  # a fixed setting that finetune refuses is refused before any trial starts

    @property
    def base(self) -> TrainConfig:
        """The finetune settings every trial starts from."""
        return TrainConfig(data=self.data, model=self.model, output=storage.join(self.output, "trials"),
                           **{**self.fixed, "stop_at_step": self.max_steps})

    @property
    def trials_folder(self) -> str:
        return storage.join(self.output, "trials")


def default_space(base: TrainConfig, max_steps: int | None) -> dict:
    """lr, batch size (half, as given, double), EMA decay, warm-up (none, 5% or 20% of the trial) and, for a genre
    model, the label dropout."""
    steps = max_steps or 1000
    space = {"lr": ray.tune.loguniform(1e-5, 3e-3),
             "batch_size": ray.tune.choice(sorted({max(1, base.batch_size // 2), base.batch_size, 2 * base.batch_size})),
             "ema_max_decay": ray.tune.choice([0.999, 0.9999]),
             "warmup_steps": ray.tune.choice(sorted({0, steps // 20, steps // 5}))}
    if base.condition == "genre":
        space["label_dropout"] = ray.tune.uniform(0.05, 0.3)
    return space


def read_space(uri: str) -> dict:
    """A search space from YAML or JSON: `setting: value` holds it, `setting: {choice|grid: [values]}`,
    `{uniform|loguniform: [low, high]}` or `{randint: [low, high]}` (high excluded) searches it."""
    try:
        found = yaml.safe_load(storage.read_text(uri))
    except yaml.YAMLError as e:
        raise AudiodiffError(f"{uri}: not YAML or JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(found, dict) or not found:
        raise AudiodiffError(f"{uri}: a search space is a mapping of finetune settings, e.g. lr: {{loguniform: "
                             "[1.0e-5, 1.0e-3]}")
    settings = {f.name for f in dataclasses.fields(TrainConfig)} - NOT_SEARCHED
    space = {}
    for name, value in found.items():
        if name not in settings:
            raise AudiodiffError(f"{uri}: '{name}' is not a setting a sweep searches; choose from "
                                 f"{', '.join(sorted(settings))}")
        if not isinstance(value, dict):
            space[name] = value
            continue
        if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
            raise AudiodiffError(f"{uri}: '{name}' must be a value or one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, "
                                 f"got {value}")
        kind, arguments = next(iter(value.items()))
        if not isinstance(arguments, list) or not arguments or (kind not in ("choice", "grid") and len(arguments) != 2):
            raise AudiodiffError(f"{uri}: '{name}: {kind}' takes a list of "
                                 + ("values" if kind in ("choice", "grid") else "two numbers, low and high"))
        if kind in ("uniform", "loguniform"):  # YAML reads 1e-5 (no dot) as a string
            try:
                arguments = [float(a) for a in arguments]
            except ValueError:
                raise AudiodiffError(f"{uri}: '{name}: {kind}' takes numbers, got {arguments}") from None
        space[name] = DISTRIBUTIONS[kind](arguments) if kind in ("choice", "grid") else DISTRIBUTIONS[kind](*arguments)
    return space


class QualityToTune(TuneReportCallback):
    """Carries the Train run's sample-step reports (those with the quality figure) to Tune; a figure that is not
    finite counts as the worst, since ASHA's comparisons would never find a NaN lagging."""

    def after_report(self, run_context, metrics, checkpoint):
        if METRIC in metrics[0]:
            figure = metrics[0][METRIC]
            metrics = [{**metrics[0], METRIC: figure if math.isfinite(figure) else math.inf}, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)


def trial(settings: dict, base: dict) -> None:
    """One trial: a fine-tune with the sampled settings into trials/<trial id>/; a restored trial goes on from its
    Train run's last checkpoint (--resume)."""
    init_ray()  # joins the sweep's Ray; in this worker too, Ray Data's progress bars only on terminals
    trial_id = ray.tune.get_context().get_trial_id()
    config = TrainConfig(**{**base, **settings, "output": storage.join(base["output"], trial_id), "resume": True})
    run_finetune(config, callbacks=[QualityToTune()])


def trial_folder(trial) -> str:
    """Tune's folder of a trial: its id, as the trial's fine-tune output under trials/ is named."""
    return trial.trial_id


def _check_output(config: SweepConfig, settings: dict) -> bool:
    """A sweep writes into a new or empty folder, or one that holds a sweep with the same settings (its sweep.json);
    returns whether there is one to restore."""
    found = ownership.names_in(config.output)
    if not found:
        return False
    record = ownership.read_record(storage.join(config.output, "sweep.json")) or {}
    if record.get(ownership.WRITTEN_BY) != ownership.mark("sweep"):
        raise ownership.refusal(config.output, "sweep", found)
    changed = sorted(k for k in settings if record.get("settings", {}).get(k) != settings[k])
    if changed:
        raise AudiodiffError(f"{config.output}: holds a sweep made with other settings ("
                             + ", ".join(f"{k} was {record['settings'].get(k)!r}, now {settings[k]!r}" for k in changed)
                             + "); run it with those to resume it, or choose another --output")
    return True


def _settings(config: SweepConfig) -> dict:
    """What the sweep.json records and a resumed sweep must match: the sweep's flags and the space file's text."""
    recorded = {**dataclasses.asdict(config), "output": None}
    recorded["space"] = storage.read_text(config.space) if config.space else None
    return json_ready(recorded)


def json_ready(value):
    return yaml.safe_load(yaml.safe_dump(value))  # tuples to lists, as JSON reads them back


def run_sweep(config: SweepConfig) -> dict:
    # a trial runs in its own folder (Tune's working directory): local paths must be absolute
    local = {name: storage.absolute(getattr(config, name)) for name in ("data", "model")
             if os.path.exists(getattr(config, name))}
    config = dataclasses.replace(config, output=storage.absolute(config.output), **local)
    base = config.base
    space = read_space(config.space) if config.space else {
        name: value for name, value in default_space(base, config.max_steps).items() if name not in config.fixed}
    both = sorted(set(space) & set(config.fixed))
    if both:
        raise AudiodiffError(f"{config.space}: searches {', '.join(both)}, which a flag also holds fixed; drop one")
    settings = _settings(config)
    restoring = _check_output(config, settings)
    storage.write_bytes(storage.join(config.output, "sweep.json"), json.dumps(
        {ownership.WRITTEN_BY: ownership.mark("sweep"), "settings": settings}, indent=1).encode())
    fs, root = storage.resolve(config.output)
    experiment = storage.join(config.output, EXPERIMENT)
    concurrent = config.concurrent or (max(1, int(cluster_capacity("GPU")) // base.num_workers) if base.gpu else 1)
    if not (base.gpu or base.cpus_per_worker):  # a plain finetune's workers would take every CPU, the trials' too
        base = dataclasses.replace(base, cpus_per_worker=max(LIGHT_CPUS, (
            cluster_capacity("CPU") - concurrent * (TRIAL_CPUS + LIGHT_CPUS)) / (concurrent * base.num_workers)))
    trainable = ray.tune.with_resources(ray.tune.with_parameters(trial, base=dataclasses.asdict(base)),
                                        {"CPU": TRIAL_CPUS})
    if restoring and ray.tune.Tuner.can_restore(experiment):
        print(f"sweep: resuming the sweep in {config.output}", flush=True)
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = ASHAScheduler(time_attr="step", max_t=config.max_steps or 10**9,
                                  grace_period=config.grace_steps or base.sample_every,
                                  reduction_factor=REDUCTION_FACTOR, stop_last_trials=False)
        tuner = ray.tune.Tuner(
            trainable, param_space=space,
            tune_config=ray.tune.TuneConfig(metric=METRIC, mode="min", num_samples=config.trials, scheduler=scheduler,
                                            max_concurrent_trials=concurrent, trial_dirname_creator=trial_folder),
            run_config=ray.tune.RunConfig(name=EXPERIMENT, storage_path=root, storage_filesystem=fs, verbose=1))
    results = tuner.fit()
    rows = sorted((_trial_row(r, config) for r in results), key=lambda row: row["trial"])  # a restore reorders them
    if not rows:
        raise AudiodiffError(f"{config.output}: the sweep ran no trials")
    storage.write_bytes(storage.join(config.output, "trials.parquet"), _parquet(rows))
    storage.write_bytes(storage.join(config.output, "sweep.png"), sweep_png(results, rows))
    finished = [r for r in rows if r["state"] == "finished" and r["best_frechet_distance"] is not None]
    if not finished:
        raise AudiodiffError(f"{config.output}: no trial ran to its end ({_states(rows)}; see trials.parquet and "
                             f"{experiment}); nothing to export")
    best = min(finished, key=lambda r: r["best_frechet_distance"])
    _copy_pipeline(storage.join(config.trials_folder, best["trial"]), storage.join(config.output, "best"),
                   base.condition is not None)
    return {"rows": rows, "best": best, "searched": sorted(space), "output": config.output}


def _trial_row(result, config: SweepConfig) -> dict:
    """A trial's settings, steps, best figure (and its step) and state: finished, stopped (by ASHA) or error."""
    trial_id = result.path.rstrip("/").rsplit("/", 1)[-1]  # trial_folder's name
    frame = result.metrics_dataframe
    if frame is not None and METRIC in frame:
        frame = frame.dropna(subset=[METRIC])
    reported = frame is not None and len(frame) > 0 and METRIC in frame
    folder = storage.join(config.trials_folder, trial_id)
    if result.error is not None:
        state = "error"
    elif storage.exists(storage.join(folder, "model_index.json")):
        state = "finished"
    else:
        state = "stopped"
    best = frame.loc[frame[METRIC].idxmin()] if reported else None
    return {"trial": trial_id, **result.config,
            "steps": int(frame["step"].max()) if reported else 0,
            "best_step": int(best["step"]) if best is not None else None,
            "best_frechet_distance": float(best[METRIC]) if best is not None else None, "state": state,
            "error": str(result.error).splitlines()[0] if result.error is not None else None}


def _parquet(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows).replace_schema_metadata(ownership.SCHEMA_MARK)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def sweep_png(results, rows: list[dict]) -> bytes:
    """The figure by step, one line per trial (labelled by its searched settings), a cross where ASHA stopped one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for result, row in zip(results, rows):
        frame = result.metrics_dataframe
        if frame is None or METRIC not in frame:
            continue
        frame = frame.dropna(subset=[METRIC])
        label = f"{row['trial']}: " + ", ".join(f"{k}={_short(v)}" for k, v in result.config.items())
        line, = axes.plot(frame["step"], frame[METRIC], marker="o", label=label)
        if row["state"] == "stopped":
            axes.plot(frame["step"].iloc[-1], frame[METRIC].iloc[-1], marker="x", markersize=12, color=line.get_color())
    axes.set(xlabel="optimizer step", ylabel="Fréchet distance to held-out data",
             title="sweep: sample quality by step (lower is better; x: stopped by ASHA)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _states(rows: list[dict]) -> str:
    counts = {s: sum(r["state"] == s for r in rows) for s in ("finished", "stopped", "error")}
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _copy_pipeline(trial_output: str, best: str, conditional: bool) -> None:
    """The trial's pipeline (its components, metrics.jsonl, loss.png, finetune.json) into best/; never its
    checkpoints, samples or logs."""
    save_model(load_model(trial_output, conditional=conditional), best)
    for name in RUN_RECORDS:
        if storage.exists(storage.join(trial_output, name)):
            storage.write_bytes(storage.join(best, name), storage.read_bytes(storage.join(trial_output, name)))


def summary_line(result: dict) -> str:
    best = result["best"]
    settings = ", ".join(f"{k} {_short(best[k])}" for k in result["searched"])
    return (f"sweep: {len(result['rows'])} trials ({_states(result['rows'])} by ASHA); best {best['trial']}: "
            f"{settings}, Fréchet distance {best['best_frechet_distance']:.2f} at step {best['best_step']} -> "
            f"{storage.join(result['output'], 'best')}")
