"""--precision: bf16 clips stay within a stated tolerance of fp32 ones, `auto` resolves as audiodiff.devices
documents, and what cannot run well is refused before any work."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from audiodiff import devices, models, sampling, train_checkpoint
from audiodiff.cli import build_parser
from audiodiff.clips import WORK_SCHEMA, ClipMaker
from audiodiff.errors import AudiodiffError
from audiodiff.generate import GenerateConfig, plan_clips
from audiodiff.mel import MelCodec
from audiodiff.synth import GENRES, synthesize
from audiodiff.train import TrainConfig

# Tolerance of a bf16 clip against the fp32 one of the same seed: the mean absolute difference over its pixels, in
# grey levels of the 0..255 spectrogram. The vocoder's own round trip (image -> Griffin-Lim audio -> image) moves
# an image by 2.6 grey levels on average (BENCHMARKS.md, tests/test_mel.py), and two clips of different seeds
# differ by 25 to 40: a change under 1 is under half of what rendering the clip loses anyway. Measured on a
# Zen 4 EPYC (AVX512-BF16): 0.33 to 0.35 per clip on the model below, 0.43 to 0.91 on the demo's fine-tuned tiny model
# (DDIM 4 to 50 steps, 8 clips).
MEAN_GREY_LEVELS = 1.0
# and few pixels move far: at most 1% of them by more than 8 grey levels (measured: none by more than 4 here, 7
# on the demo's model)
FAR, FAR_SHARE = 8, 0.01


@pytest.fixture(scope="module")
def fitted_model(tmp_path_factory):
    """The tiny model after 6 AdamW steps on spectrograms of synthetic audio. Not an untrained one: its random
    weights make deterministic DDIM chaotic, so a bf16 rounding grows to tens of grey levels over 10 steps
    (measured: 8.9 mean), which says nothing about a model that has learned anything; 6 steps end that."""
    parts = models.new_model("tiny")
    codec = MelCodec(parts.mel)
    data = sampling.to_model_space(torch.cat([codec.audio_to_images(synthesize(genre, 3.0, seed=seed))
                                              for genre in GENRES for seed in range(2)]))
    scheduler = sampling.make_scheduler("ddpm", parts.scheduler.config)
    optimizer = torch.optim.AdamW(parts.unet.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        clean = data[torch.randint(0, len(data), (4,), generator=generator)]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (4,), generator=generator)
        F.mse_loss(parts.unet(scheduler.add_noise(clean, noise, timesteps), timesteps).sample, noise).backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("model") / "fitted"
    models.save_model(parts, str(folder))
    return str(folder)


def clips(model: str, precision: str, batch_size: int = 4, count: int = 4, threads: int | None = None) -> list[np.ndarray]:
    """Standard clips (DDIM 10 steps) made by the actors' own code, in this process (on `threads` CPU threads:
    an actor's share of its node, clips.cpu_threads)."""
    config = GenerateConfig(model=model, output="unused", num_clips=count, scheduler="ddim", steps=10,
                            batch_size=batch_size, precision=precision)
    plan = [{**row, "starts": []} for row in plan_clips(config, models.load_model(model))]
    before = torch.get_num_threads()
    try:
        maker = ClipMaker(config, threads=threads)
        return [image.astype(int) for i in range(0, len(plan), batch_size)
                for image in maker(pa.Table.from_pylist(plan[i:i + batch_size], schema=WORK_SCHEMA))["image"]]
    finally:
        torch.set_num_threads(before)


def test_bf16_clips_stay_within_a_grey_level_of_fp32_and_across_batch_sizes_and_threads(fitted_model):
    fp32, bf16, bf16_alone = (clips(fitted_model, "fp32", threads=2), clips(fitted_model, "bf16", threads=2),
                              clips(fitted_model, "bf16", batch_size=1, count=2, threads=2))
    bf16_one_thread = clips(fitted_model, "bf16", count=2, threads=1)  # a lone actor on a node has them all
    # bf16 rounds differently at other batch sizes and thread counts (oneDNN splits its sums by thread)
    for reference, other in ((fp32, bf16), (bf16, bf16_alone), (bf16, bf16_one_thread)):
        for a, b in zip(reference, other):
            difference = np.abs(a - b)
            assert difference.mean() <= MEAN_GREY_LEVELS and (difference > FAR).mean() <= FAR_SHARE
    assert np.abs(fp32[0] - fp32[1]).mean() > 10 * MEAN_GREY_LEVELS  # clips of other seeds differ far more


def test_auto_is_bf16_on_gpus_and_on_cpus_with_native_bf16_else_fp32(monkeypatch):
    for native, on_cpu in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(devices, "native_bf16_cpu", lambda: native)
        assert GenerateConfig(model="tiny", output="x").precision == on_cpu
        assert GenerateConfig(model="tiny", output="x", gpu=True).precision == "bf16"
        assert GenerateConfig(model="tiny", output="x", precision="fp32", gpu=True).precision == "fp32"
        assert TrainConfig(data="d", model="tiny", output="o").precision == on_cpu
        assert TrainConfig(data="d", model="tiny", output="o", gpu=True).precision == "bf16"
        # generation.json records what the clips were made with, never "auto"
        assert GenerateConfig(model="tiny", output="x").settings()["precision"] == on_cpu
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    monkeypatch.undo()
    assert devices.native_bf16_cpu() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_fp16_on_cpu_fp16_training_and_unknown_precisions_are_refused():
    with pytest.raises(AudiodiffError, match="fp16 runs on GPUs only"):
        GenerateConfig(model="tiny", output="x", precision="fp16")
    GenerateConfig(model="tiny", output="x", precision="fp16", gpu=True, concurrency=1)  # allowed with --gpu
    with pytest.raises(AudiodiffError, match="loss scaling"):
        TrainConfig(data="d", model="tiny", output="o", precision="fp16", gpu=True)
    with pytest.raises(AudiodiffError, match="must be one of auto, fp32, bf16, fp16"):
        GenerateConfig(model="tiny", output="x", precision="half")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "tiny", "--output", "x", "--precision", "half"])
    assert build_parser().parse_args(["finetune", "--data", "d", "--model", "tiny", "--output", "o",
                                      "--precision", "bf16"]).precision == "bf16"


@pytest.mark.parametrize("gpu, made_with", [(False, "fp32"), (True, "bf16")])
def test_resume_keeps_the_precision_the_run_was_made_with(tmp_path, gpu, made_with):
    """A resume in the checkpoint's precision goes on; one in another is refused, naming both."""
    def config(precision):
        return TrainConfig(data="d", model="tiny", output=str(tmp_path), gpu=gpu, precision=precision, resume=True)

    recorded = train_checkpoint.result_settings(config(made_with))
    folder = tmp_path / "checkpoints" / train_checkpoint.RUN_NAME / "checkpoint_0"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": 5, "config": recorded, "history": []}))
    train_checkpoint.check_resume(config(made_with))
    other = "fp32" if made_with == "bf16" else "bf16"
    with pytest.raises(AudiodiffError, match=f"precision was '{made_with}', now '{other}'"):
        train_checkpoint.check_resume(config(other))
