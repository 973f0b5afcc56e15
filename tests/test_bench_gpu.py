import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASUREMENTS = ["machine", "unet_forward", "ddim50", "griffin_lim", "ddpm_overhead", "train_step", "diffusers_pipeline",
                "done"]


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_writes_a_json_line_per_measurement_without_ray(tmp_path):
    out = tmp_path / "bench.jsonl"
    # the GPU machine has no Ray: the script must not need it (nor pyarrow, which would cost 45 MiB of wheels)
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    for module in ("ray", "pyarrow"):
        (blocker / f"{module}.py").write_text(f"raise ImportError('{module} is not on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), ROOT])}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [json.loads(line) for line in done.stdout.splitlines()]  # the file holds what was printed
    assert list(dict.fromkeys(line["what"] for line in lines)) == MEASUREMENTS
    assert not [line for line in lines if "skipped" in line]
    forward = [line for line in lines if line["what"] == "unet_forward"]
    assert {(line["width"], line["batch"]) for line in forward} == {(64, 1), (64, 2), (256, 1)}
    assert all(line["gflop_per_clip"] > 0 and line["ms"] > 0 and line["estimate_mib_per_clip"] > 0 for line in forward)
    wide = next(line for line in forward if line["width"] == 256)
    assert wide["gflop_per_clip"] > 3.9 * forward[0]["gflop_per_clip"]  # counted FLOPs grow with the width
    figures = {line["what"]: line for line in lines}
    assert figures["ddim50"]["clips_per_s"] > 0 and figures["ddim50"]["griffin_lim_included"]
    assert figures["train_step"]["images_per_s"] > 0 and figures["griffin_lim"]["ms_per_clip"] > 0
    assert figures["diffusers_pipeline"]["audiodiff_speedup"] > 0
