import json

import pyarrow.parquet as pq
import pytest
import ray.tune

from audiodiff.cli import main
from audiodiff.errors import AudiodiffError
from audiodiff.sweep import SweepConfig, default_space, read_space, run_sweep


def test_a_search_space_file_becomes_tune_distributions_and_its_mistakes_are_named(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [1e-5, 1.0e-3]}\nbatch_size: {choice: [2, 4]}\nwarmup_steps: {randint: [0, 50]}"
                     "\nema_max_decay: 0.999\nlabel_dropout: {grid: [0.1, 0.2]}\n")
    found = read_space(str(space))
    assert isinstance(found["lr"], ray.tune.search.sample.Float) and found["lr"].lower == 1e-5
    assert found["batch_size"].categories == [2, 4]
    assert found["ema_max_decay"] == 0.999 and found["label_dropout"] == {"grid_search": [0.1, 0.2]}
    (tmp_path / "space.json").write_text(json.dumps({"lr": {"uniform": [0.0001, 0.001]}}))
    assert read_space(str(tmp_path / "space.json"))["lr"].upper == 0.001
    for text, message in [("output: x", "'output' is not a setting a sweep searches"),
                          ("lr: {normal: [0, 1]}", "'lr' must be a value or one of"),
                          ("lr: {uniform: [1]}", "takes a list of two numbers"),
                          ("lr: {uniform: [a, b]}", "takes numbers"), ("[1, 2]", "a mapping of finetune settings"),
                          ("lr: [", "not YAML or JSON")]:
        space.write_text(text)
        with pytest.raises(AudiodiffError, match=message.replace("[", r"\[")):
            read_space(str(space))


def test_the_default_space_searches_label_dropout_only_for_genre_models():
    plain = SweepConfig(data="d", model="tiny", output="o", max_steps=200).base
    assert sorted(default_space(plain, 200)) == ["batch_size", "ema_max_decay", "lr", "warmup_steps"]
    assert default_space(plain, 200)["warmup_steps"].categories == [0, 10, 40]
    genres = SweepConfig(data="d", model="tiny", output="o", fixed={"condition": "genre"}).base
    assert "label_dropout" in default_space(genres, None)


def test_a_sweep_refuses_a_folder_it_did_not_write_and_bad_settings_before_any_trial(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(AudiodiffError, match=r"holds what `audiodiff sweep` did not write \(mine.txt\)"):
        run_sweep(SweepConfig(data=str(tmp_path), model="tiny", output=str(tmp_path)))
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(AudiodiffError, match="--batch-size must be at least 1"):
        SweepConfig(data="d", model="tiny", output="o", fixed={"batch_size": 0})
    with pytest.raises(AudiodiffError, match="--trials must be at least 1"):
        SweepConfig(data="d", model="tiny", output="o", trials=0)


@pytest.mark.slow
def test_a_small_sweep_stops_a_lagging_trial_exports_the_best_for_generate_and_resumes(spectrograms, tmp_path,
                                                                                      capsys):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {grid: [1.0e-3, 10.0]}\n")  # the second trial's learning rate is absurd
    out = tmp_path / "sweep"
    sweep = ["sweep", "--data", spectrograms, "--model", "tiny", "--output", str(out), "--trials", "1",
             "--space", str(space), "--max-steps", "4", "--grace-steps", "2", "--sample-every", "2", "--epochs", "1",
             "--batch-size", "2", "--num-workers", "1", "--num-samples", "2", "--sample-steps", "2", "--log-every", "2"]
    assert main(sweep) == 0
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert [(t["lr"], t["state"], t["steps"]) for t in trials] == [(1e-3, "finished", 4), (10.0, "stopped", 2)]
    assert trials[1]["best_frechet_distance"] > trials[0]["best_frechet_distance"]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert f"best {trials[0]['trial']}: lr 0.001" in capsys.readouterr().out
    assert (out / "best" / "model_index.json").exists() and not (out / "best" / "checkpoints").exists()
    assert main(["generate", "--model", str(out / "best"), "--output", str(tmp_path / "clips"), "--num-clips", "1",
                 "--scheduler", "ddim", "--steps", "2"]) == 0
    assert (tmp_path / "clips" / "clips" / "standard-00000.wav").exists()
    # run again: Tune restores the finished sweep and nothing trains again
    assert main(sweep) == 0
    assert "resuming the sweep" in capsys.readouterr().out
    assert pq.read_table(out / "trials.parquet").to_pylist() == trials
    assert main([*sweep[:-2], "--log-every", "1"]) == 1
    assert "holds a sweep made with other settings (fixed was" in capsys.readouterr().err
