"""The anchors' other models in the clip commands and the fine-tune: latent (VAE) pipelines saved by diffusers,
conditional UNets fed encodings from a file. (A genre model is trained, steered and scored in test_demo.)"""

import io
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from audiodiff import model_files, models
from audiodiff.cli import main
from audiodiff.synth import synthesize

SR = 22050
FAST = ["--scheduler", "ddim", "--steps", "3"]


def manifest(folder) -> list[dict]:
    return pq.read_table(io.BytesIO((folder / "manifest.parquet").read_bytes())).to_pylist()


@pytest.mark.slow
def test_latent_pipeline_saved_by_diffusers_generates_remixes_and_fine_tunes(local_ray, tiny_latent_pipeline_folder,
                                                                             tmp_path, capsys):
    model = str(tiny_latent_pipeline_folder)
    mel = model_files.load_mel_config(model)
    assert main(["generate", "--model", model, "--output", str(tmp_path / "gen"), "--num-clips", "2",
                 "--num-extended", "1", "--extend-factor", "2", *FAST]) == 0
    rows = manifest(tmp_path / "gen")
    assert sorted((r["kind"], r["frames"]) for r in rows) == [("extended", 2 * mel.x_res)] + [("standard", mel.x_res)] * 2
    for row in rows:
        assert Image.open(tmp_path / "gen" / row["png"]).size == (row["frames"], mel.y_res)

    audio = tmp_path / "audio" / "drone"
    audio.mkdir(parents=True)
    for seed in range(3):
        soundfile.write(audio / f"drone-{seed}.wav", synthesize("drone", 3.2, SR, seed=seed), SR)
    assert main(["remix", str(audio / "drone-0.wav"), "--model", model, "--output", str(tmp_path / "remix"),
                 "--strength", "0.5", *FAST]) == 0
    remixed = [r for r in manifest(tmp_path / "remix") if r["kind"] == "remix"]
    assert remixed and all((tmp_path / "remix" / r["wav"]).stat().st_size > 44 for r in remixed)

    data, tuned = tmp_path / "spectrograms", tmp_path / "tuned"
    assert main(["preprocess", str(tmp_path / "audio"), "--output", str(data), "--model", model]) == 0
    assert main(["finetune", "--data", str(data), "--model", model, "--output", str(tuned), "--epochs", "1",
                 "--batch-size", "2", "--num-samples", "2", "--sample-steps", "2"]) == 0
    assert "finetune: 2 steps on 5 images" in capsys.readouterr().out
    before, after = models.load_model(model), models.load_model(str(tuned))
    assert torch.equal(before.vqvae.encoder.conv_in.weight, after.vqvae.encoder.conv_in.weight)  # the VAE is frozen
    assert any(not torch.equal(a, b) for a, b in zip(before.unet.parameters(), after.unet.parameters()))
    pipe = DiffusionPipeline.from_pretrained(str(tuned))  # what audiodiff saves loads and samples in diffusers
    output = pipe(steps=2, generator=torch.Generator().manual_seed(0))
    assert output.images[0].size == (mel.x_res, mel.y_res)


@pytest.mark.slow
def test_conditional_model_makes_a_clip_per_encoding_and_refuses_encodings_of_the_wrong_size(
        local_ray, tiny_conditional_pipeline_folder, tmp_path, capsys):
    model = str(tiny_conditional_pipeline_folder)
    dim = models.load_model(model).cross_attention_dim
    rng = np.random.default_rng(0)
    encodings = tmp_path / "encodings.parquet"
    pq.write_table(pa.table({"name": ["calm", "busy"], "encoding": [rng.normal(size=dim).tolist() for _ in range(2)]}),
                   encodings)
    out = tmp_path / "clips"
    assert main(["generate", "--model", model, "--output", str(out), "--num-clips", "1", "--encodings",
                 str(encodings), *FAST]) == 0
    rows = manifest(out)
    assert sorted((r["clip_id"], r["encoding"]) for r in rows) == [("standard-00000-busy", "busy"),
                                                                   ("standard-00000-calm", "calm")]
    calm, busy = (np.asarray(Image.open(out / r["png"])) for r in sorted(rows, key=lambda r: r["encoding"] != "calm"))
    assert not np.array_equal(calm, busy)  # same seed, other encoding

    wrong = tmp_path / "wrong.safetensors"
    save_file({"calm": torch.zeros(dim + 3)}, str(wrong))
    capsys.readouterr()
    assert main(["generate", "--model", model, "--output", str(tmp_path / "x"), "--encodings", str(wrong)]) == 1
    error = capsys.readouterr().err
    assert f"has {dim + 3} values" in error and f"cross_attention_dim {dim}" in error and "wrong.safetensors" in error
    assert main(["generate", "--model", model, "--output", str(tmp_path / "x"), "--genre", "drone"]) == 1
    assert "unknown genre 'drone'; this model knows jazz, rock" in capsys.readouterr().err
    without_genres = tmp_path / "no-genres"
    shutil.copytree(model, without_genres, ignore=shutil.ignore_patterns("conditioning"))
    assert main(["generate", "--model", str(without_genres), "--output", str(tmp_path / "x")]) == 1
    assert "give --encodings" in capsys.readouterr().err
    assert main(["generate", "--model", str(without_genres), "--output", str(tmp_path / "x"), "--genre", "jazz"]) == 1
    assert "no genres" in capsys.readouterr().err
    (tmp_path / "pickled.pkl").write_bytes(b"\x80\x04K\x01.")
    assert main(["generate", "--model", model, "--output", str(tmp_path / "x"), "--encodings",
                 str(tmp_path / "pickled.pkl")]) == 1
    assert "never a pickle" in capsys.readouterr().err
