import io

import pyarrow.parquet as pq

from audiodiff.cli import main


def test_demo_runs_all_three_stages_and_replaces_only_its_own_output(local_ray, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--epochs", "1"]) == 0
    assert f"open {out / 'generated' / 'index.html'}" in capsys.readouterr().out
    assert (out / "spectrograms" / "stats.json").exists() and (out / "model" / "model_index.json").exists()
    rows = pq.read_table(io.BytesIO((out / "generated" / "manifest.parquet").read_bytes())).to_pylist()
    assert sorted(r["kind"] for r in rows) == ["extended"] + ["standard"] * 4
    assert {r["frames"] for r in rows} == {64, 256}
    assert all((out / "generated" / r["wav"]).exists() for r in rows)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("keep me")
    assert main(["demo", "--output", str(tmp_path / "mine")]) == 1
    assert "was not written by a demo" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "keep me"
