import io
import json
import re

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DiffusionPipeline

from audiodiff import models
from audiodiff.cli import main
from audiodiff.synth import GENRES


@pytest.mark.slow
def test_demo_runs_all_three_stages_and_replaces_only_its_own_output(demo, tmp_path, capsys):
    out, printed = demo.folder, demo.printed
    assert f"open {out / 'index.html'}" in printed
    assert (out / "spectrograms" / "stats.json").exists() and (out / "model" / "model_index.json").exists()
    # fine-tuning brings the clips closer to the training audio than the untrained model's, by the quality figure
    scores = re.search(r"untrained ([\d.]+), fine-tuned ([\d.]+)", printed)
    assert scores and float(scores[2]) < 0.5 * float(scores[1]), printed
    page = (out / "index.html").read_text()
    exported = json.loads((out / "model" / "finetune.json").read_text())
    assert exported["exported_step"] == exported["best_step"]  # the page names the step whose weights it plays
    assert f"untrained model: Fréchet distance {scores[1]}" in page and (
        f"fine-tuned model (EMA weights of step {exported['exported_step']} of {exported['steps']}, its best sample "
        f"step): Fréchet distance {scores[2]}") in page
    assert 'src="generated-untrained/clips/standard-00000.wav"' in page and 'src="generated/clips/extended-00000-drone.png"' in page
    rows = pq.read_table(io.BytesIO((out / "generated" / "manifest.parquet").read_bytes())).to_pylist()
    assert sorted((r["genre"], r["kind"]) for r in rows) == sorted(
        (genre, kind) for genre in GENRES for kind in ["extended"] + ["standard"] * 6)
    assert {r["frames"] for r in rows} == {64, 256}
    assert all((out / "generated" / r["wav"]).exists() for r in rows)
    # one model for all genres: each genre's clips are nearer its own audio than any other genre's
    distances = {genre: dict(re.findall(r"(\w+) ([\d.]+)", line))
                 for genre, line in re.findall(r"^  (\w+) clips to reference (.*)$", printed, re.M)}
    assert sorted(distances) == sorted(GENRES), printed
    for genre, row in distances.items():
        assert min(row, key=lambda other: float(row[other])) == genre, printed
    # and it is still a diffusers pipeline: a genre's vector is the `encoding` of AudioDiffusionPipeline
    conditioning = models.load_model(str(out / "model")).conditioning
    pipe = DiffusionPipeline.from_pretrained(str(out / "model"))
    audio = pipe(steps=2, encoding=conditioning.encoding("drone"), generator=torch.Generator().manual_seed(0)).audios
    assert audio.shape == (1, 1, 63 * 512)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("keep me")
    assert main(["demo", "--output", str(tmp_path / "mine")]) == 1
    assert "was not written by a demo" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "keep me"
