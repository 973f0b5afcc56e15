import json
import os
import shutil

import pytest
import torch
from diffusers import AudioDiffusionPipeline, DDIMScheduler, DiffusionPipeline, Mel
from huggingface_hub import constants as hub_constants

from audiodiff import models
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelConfig


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_full_preset_is_teticios_256_architecture():
    parts = models.new_model("full")
    assert sum(p.numel() for p in parts.unet.parameters()) == pytest.approx(113.7e6, rel=1e-3)
    assert parts.unet.config.block_out_channels == (128, 128, 256, 256, 512, 512)
    assert parts.image_size == (256, 256) and parts.mel == MelConfig()


def test_presets_initialise_the_same_weights_everywhere():
    torch.manual_seed(123)
    before = torch.rand(1)
    assert_same_weights(models.load_model("tiny").unet, models.new_model("tiny").unet)
    torch.manual_seed(123)
    models.new_model("tiny", seed=1)
    assert torch.equal(torch.rand(1), before)  # the global random state is left alone
    a, b = models.new_model("tiny", seed=1).unet.state_dict(), models.new_model("tiny").unet.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_saved_folder_loads_in_diffusers_and_samples(tmp_path):
    parts = models.new_model("tiny")
    models.save_model(parts, str(tmp_path / "tiny"))
    assert not list(tmp_path.rglob("*.bin"))
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "tiny"))
    assert isinstance(pipe, AudioDiffusionPipeline) and isinstance(pipe.mel, Mel)
    assert_same_weights(pipe.unet, parts.unet)
    output = pipe(steps=2, generator=torch.Generator().manual_seed(0))
    assert output.images[0].size == (64, 64)
    assert output.audios.shape == (1, 1, 63 * 512)


def test_folder_saved_by_diffusers_loads_in_audiodiff(tmp_path):
    tiny = models.new_model("tiny")
    pipe = AudioDiffusionPipeline(vqvae=None, unet=tiny.unet, mel=Mel(x_res=64, y_res=64),
                                  scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.save_pretrained(str(tmp_path / "theirs"))
    parts = models.load_model(str(tmp_path / "theirs"))
    assert isinstance(parts.scheduler, DDIMScheduler)
    assert parts.mel == MelConfig(x_res=64, y_res=64)
    assert parts.vqvae is None
    assert_same_weights(parts.unet, tiny.unet)


def test_object_storage_round_trip(s3_bucket):
    parts = models.new_model("tiny")
    models.save_model(parts, f"{s3_bucket}/models/tiny")
    loaded = models.load_model(f"{s3_bucket}/models/tiny")
    assert_same_weights(loaded.unet, parts.unet)
    assert loaded.mel == parts.mel


def test_hub_id_loads_from_the_hub_cache(tmp_path, monkeypatch):
    # The hub is unreachable here; lay the repo out as huggingface_hub's cache does and go offline.
    repo = tmp_path / "hub" / "models--teticio--audiodiffusion-tiny-test"
    models.save_model(models.new_model("tiny"), str(repo / "snapshots" / "abc123"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    parts = models.load_model("teticio/audiodiffusion-tiny-test")
    assert parts.image_size == (64, 64)
    with pytest.raises(AudiodiffError, match="teticio/not-cached: cannot fetch from the Hugging Face Hub"):
        models.load_model("teticio/not-cached")


@pytest.fixture
def saved_tiny(tmp_path):
    folder = tmp_path / "model"
    models.save_model(models.new_model("tiny"), str(folder))
    return folder


@pytest.mark.parametrize("remove, message", [
    ("model_index.json", "not a model folder"),
    ("unet/config.json", "missing unet/config.json"),
    ("unet/diffusion_pytorch_model.safetensors", "never unpickles"),
    ("scheduler", "missing scheduler/scheduler_config.json"),
    ("mel", "missing mel/mel_config.json"),
])
def test_folder_missing_a_part_names_it(saved_tiny, remove, message):
    path = saved_tiny / remove
    shutil.rmtree(path) if path.is_dir() else os.remove(path)
    with pytest.raises(AudiodiffError, match=message):
        models.load_model(str(saved_tiny))


def test_mel_and_unet_size_mismatch_is_reported(saved_tiny):
    (saved_tiny / "mel" / "mel_config.json").write_text(MelConfig(x_res=128, y_res=64).to_json())
    with pytest.raises(AudiodiffError, match="UNet makes 64x64 images but mel_config.json says 64x128"):
        models.load_model(str(saved_tiny))


def test_unsupported_scheduler_and_unknown_names(saved_tiny):
    index = json.loads((saved_tiny / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (saved_tiny / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(AudiodiffError, match="PNDMScheduler is not supported"):
        models.load_model(str(saved_tiny))
    with pytest.raises(AudiodiffError, match="no such model folder, and not a hub id"):
        models.load_model("./no/such/folder")
    with pytest.raises(AudiodiffError, match="unknown preset"):
        models.new_model("huge")
