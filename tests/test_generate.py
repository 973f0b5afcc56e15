import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
from PIL import Image

from audiodiff import models, storage
from audiodiff.cli import main

FAST = ["--scheduler", "ddim", "--steps", "4"]
STANDARD_SECONDS = 63 * 512 / 22050  # the tiny model: 64 frames
EXTENDED_SECONDS = 255 * 512 / 22050  # 4 x 64 frames, as 256-frame standard clips of the full model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    models.save_model(models.new_model("tiny"), str(folder))
    return str(folder)


def generate(model, output, *args):
    assert main(["generate", "--model", model, "--output", str(output), *FAST, *map(str, args)]) == 0


def manifest(output):
    return pq.read_table(io.BytesIO(storage.read_bytes(f"{output}/manifest.parquet"))).to_pylist()


def image(output, clip_id) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{output}/clips/{clip_id}.png"))))


def test_right_number_of_clips_of_the_right_lengths(local_ray, tiny_model, tmp_path):
    out = tmp_path / "out"
    generate(tiny_model, out, "--num-clips", 3, "--num-extended", 1)
    rows = manifest(out)
    assert [r["clip_id"] for r in rows] == ["standard-00000", "standard-00001", "standard-00002", "extended-00000"]
    assert sorted(os.listdir(out / "clips")) == sorted(f"{r['clip_id']}.{ext}" for r in rows for ext in ("wav", "png"))
    for row in rows:
        audio, rate = soundfile.read(out / row["wav"])
        info = soundfile.info(out / row["wav"])
        assert rate == 22050 and info.subtype == "PCM_16" and audio.ndim == 1
        expected = STANDARD_SECONDS if row["kind"] == "standard" else EXTENDED_SECONDS
        assert len(audio) / rate == pytest.approx(expected) == pytest.approx(row["seconds"])
        assert image(out, row["clip_id"]).shape == (64, row["frames"])
        assert np.abs(audio).max() == pytest.approx(10 ** (-1 / 20), abs=1e-3)  # peak at -1 dBFS
        assert (row["scheduler"], row["steps"], row["model"]) == ("ddim", 4, tiny_model)
    assert len({r["seed"] for r in rows}) == 4
    page = (out / "index.html").read_text()
    assert all(f'src="{r["wav"]}"' in page and f'src="{r["png"]}"' in page for r in rows)


def test_same_clip_at_any_batch_size_and_number_of_actors(local_ray, tiny_model, tmp_path):
    generate(tiny_model, tmp_path / "one", "--num-clips", 4, "--batch-size", 1, "--concurrency", 1)
    generate(tiny_model, tmp_path / "four", "--num-clips", 4, "--batch-size", 4, "--concurrency", 2)
    generate(tiny_model, tmp_path / "two actors", "--num-clips", 4, "--batch-size", 2, "--concurrency", 2)
    for clip in (f"standard-{i:05d}" for i in range(4)):
        reference = image(tmp_path / "one", clip).astype(int)
        for other in ("four", "two actors"):
            difference = np.abs(image(tmp_path / other, clip).astype(int) - reference)
            # same noise and sampler draws; batched kernels only round differently (module docstring)
            assert difference.max() <= 1 and (difference > 0).mean() < 0.005, (clip, other)
    assert image(tmp_path / "one", "standard-00000").tolist() != image(tmp_path / "one", "standard-00001").tolist()


def test_rerun_writes_nothing_and_interrupted_run_is_completed(local_ray, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    generate(tiny_model, out, "--num-clips", 3, "--num-extended", 1)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    generate(tiny_model, out, "--num-clips", 3, "--num-extended", 1)
    assert "0 clips written, 4 already there" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # an interrupted run: one clip never finished (WAV written, no PNG), another not started
    (out / "clips" / "standard-00001.png").unlink()
    (out / "clips" / "extended-00000.wav").unlink()
    (out / "clips" / "extended-00000.png").unlink()
    generate(tiny_model, out, "--num-clips", 3, "--num-extended", 1)
    assert "2 clips written, 2 already there" in capsys.readouterr().out
    rows = manifest(out)
    assert len(rows) == 4 and all((out / r["wav"]).exists() and (out / r["png"]).exists() for r in rows)


def test_s3_output(local_ray, tiny_model, s3_bucket):
    generate(tiny_model, f"{s3_bucket}/gen", "--num-clips", 2)
    rows = manifest(f"{s3_bucket}/gen")
    assert len(rows) == 2
    files = storage.list_files(f"{s3_bucket}/gen")
    for row in rows:
        assert f"{s3_bucket}/gen/{row['wav']}" in files and f"{s3_bucket}/gen/{row['png']}" in files
    assert f"{s3_bucket}/gen/index.html" in files


@pytest.mark.parametrize("args, message", [
    (["--num-clips", "0"], "nothing to generate"),
    (["--num-extended", "1", "--extend-factor", "1.0625"], "68 frames; the UNet halves the width 3 times"),
    (["--scheduler", "pndm"], "--scheduler must be one of"),
    (["--gpu", "--concurrency", "2"], "--gpu with --concurrency 2 needs 2 GPUs; the Ray cluster has 0, autoscaling"),
])
def test_bad_arguments_stop_before_work(local_ray, tiny_model, tmp_path, capsys, args, message):
    assert main(["generate", "--model", tiny_model, "--output", str(tmp_path / "out"), *args]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "clips").exists()


def test_bad_model_unwritable_output_and_changed_settings(local_ray, tiny_model, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "no model"), "--output", str(tmp_path / "o")]) == 1
    assert "no model: no such model folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["generate", "--model", tiny_model, "--output", str(tmp_path / "file" / "o"), *FAST]) == 1
    assert "cannot write" in capsys.readouterr().err
    generate(tiny_model, tmp_path / "out", "--num-clips", 1)
    assert main(["generate", "--model", tiny_model, "--output", str(tmp_path / "out"), "--scheduler", "ddim",
                 "--steps", "5"]) == 1
    assert "holds clips made with other settings (steps differ)" in capsys.readouterr().err
