import json
import math

import pytest
import torch
from diffusers import UNet2DModel

from audiodiff.cli import main
from audiodiff.errors import AudiodiffError
from audiodiff.train import TrainConfig
from audiodiff.train_report import best_sample, samples_since_best


def sampled(*figures):
    return [{"step": 10 * (i + 1), "loss": 1.0, **({} if f is None else {"frechet_distance": f})}
            for i, f in enumerate(figures)]


def test_the_best_sample_step_is_the_lowest_finite_figure_and_patience_counts_the_sample_steps_since():
    history = sampled(5.0, None, 3.0, math.nan, 4.0, None, 3.0)
    assert best_sample(history)["step"] == 30  # the first of equal figures; NaN (a diverged run) is never best
    assert samples_since_best(history) == 3  # steps 40, 50 and 70 measured, none better
    assert best_sample(sampled(None, math.inf)) is None and samples_since_best(sampled(None, 2.0)) == 0
    assert samples_since_best(sampled(math.nan, math.nan)) == 2


def test_export_and_patience_are_checked_before_any_work():
    with pytest.raises(AudiodiffError, match="--export must be one of best, last"):
        TrainConfig(data="d", model="tiny", output="o", export="first")
    with pytest.raises(AudiodiffError, match="--patience must be at least 1"):
        TrainConfig(data="d", model="tiny", output="o", patience=0)


@pytest.mark.slow
def test_a_run_whose_figure_worsens_exports_its_best_step_and_stops_with_patience(spectrograms, tmp_path, capsys):
    out = tmp_path / "model"
    # the warm-up's first step has lr 0 (step 1 is the initial model); from step 2 on lr 100 wrecks the weights
    run = ["finetune", "--data", spectrograms, "--model", "tiny", "--output", str(out), "--num-workers", "1",
           "--batch-size", "2", "--epochs", "2", "--lr", "100", "--lr-schedule", "constant", "--warmup-steps", "1",
           "--sample-every", "1", "--log-every", "1", "--num-samples", "2", "--sample-steps", "2", "--patience", "2"]
    assert main(run) == 0
    record = json.loads((out / "finetune.json").read_text())
    figures = {h["step"]: h["frechet_distance"] for h in map(json.loads, open(out / "metrics.jsonl"))}
    assert list(figures) == [1, 2, 3] and min(figures, key=figures.get) == 1, figures  # no better figure after 1
    assert record | {"best_frechet_distance": None, "exported_frechet_distance": None} == {
        "written_by": "audiodiff finetune", "export": "best", "steps": 3, "best_step": 1, "exported_step": 1,
        "stopped_early": True, "best_frechet_distance": None, "exported_frechet_distance": None,
        "best_kernel_distance": record["best_kernel_distance"],
        "exported_kernel_distance": record["exported_kernel_distance"]}
    assert record["best_frechet_distance"] == record["exported_frechet_distance"] == figures[1]
    printed = capsys.readouterr().out
    assert "3 steps (stopped early: no better quality figure in 2 sample steps" in printed
    assert "exported the EMA weights of step 1 (the best quality figure)" in printed
    # the exported weights are step 1's EMA, which is the initial model (lr 0): not the last step's
    initial = UNet2DModel.from_pretrained(str(out), subfolder="unet")
    from audiodiff.models import new_model

    assert all(torch.equal(a, b) for a, b in zip(initial.parameters(), new_model("tiny").unet.parameters()))
    # the run was checkpointed where it stopped: --resume goes on (and stops again, out of patience)
    assert main([*run, "--resume"]) == 0
    assert json.loads((out / "finetune.json").read_text())["steps"] == 4
