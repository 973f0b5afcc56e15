import asyncio
import json
import os
import shutil

import pytest
import ray
import torch
from diffusers import AudioDiffusionPipeline, DDIMScheduler, DiffusionPipeline, Mel, UNet2DConditionModel
from huggingface_hub import constants as hub_constants

from audiodiff import models, sampling, storage
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


def test_hub_id_loads_from_the_hub_cache(tmp_path, monkeypatch, tiny_conditional_pipeline_folder):
    # The hub is unreachable here; lay the repos out as huggingface_hub's cache does and go offline.
    for name, lay_out in [("audiodiffusion-tiny-test", lambda f: models.save_model(models.new_model("tiny"), f)),
                          ("pickled-test", lambda f: shutil.copytree(tiny_conditional_pipeline_folder, f))]:
        repo, commit = tmp_path / "hub" / f"models--teticio--{name}", "5e1c0f3" * 5 + "12345"
        lay_out(str(repo / "snapshots" / commit))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    parts = models.load_model("teticio/audiodiffusion-tiny-test")
    assert parts.image_size == (64, 64)
    assert models.model_identity("teticio/audiodiffusion-tiny-test") == models.model_identity("tiny")
    assert models.load_model("teticio/pickled-test").conditioning.names == ["jazz", "rock"]
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
    ("unet/diffusion_pytorch_model.safetensors", r"missing unet/diffusion_pytorch_model.safetensors \(or a pickled"),
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
    index["unet"] = ["diffusers", "UNet3DConditionModel"]
    (saved_tiny / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(AudiodiffError, match=r"unet UNet3DConditionModel is not supported; use one of \['UNet2DCond"):
        models.load_model(str(saved_tiny))
    with pytest.raises(AudiodiffError, match="no such model folder, and not a hub id"):
        models.load_model("./no/such/folder")
    with pytest.raises(AudiodiffError, match="unknown preset"):
        models.new_model("huge")


class _WritesAFile:
    """Pickled, it asks the unpickler to call open(path, "w"): a pickle that runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_bin_that_would_run_code_is_never_run(saved_tiny, tmp_path):
    marker = tmp_path / "the-pickle-ran"
    pickled = saved_tiny / "unet" / "diffusion_pytorch_model.bin"
    torch.save({"conv_in.weight": _WritesAFile(str(marker))}, pickled)
    torch.load(pickled, weights_only=False)  # a full unpickle does run it
    assert marker.exists()
    marker.unlink()
    assert models.load_model(str(saved_tiny)).unet is not None  # the safetensors beside it are preferred
    os.remove(saved_tiny / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(AudiodiffError, match=r"model: refused unet/diffusion_pytorch_model.bin: torch's weights-only "
                                             r"loader does not take it \(Unsupported global: .*open"):
        models.load_model(str(saved_tiny))
    assert not marker.exists()
    torch.save({"conv_in.weight": torch.ones(1000)}, pickled)
    pickled.write_bytes(pickled.read_bytes()[:2000])
    with pytest.raises(AudiodiffError, match="cannot read unet/diffusion_pytorch_model.bin .* it is damaged"):
        models.load_model(str(saved_tiny))


def test_conditional_bin_pipeline_saved_by_diffusers_loads_and_samples(tiny_conditional_pipeline_folder):
    parts = models.load_model(tiny_conditional_pipeline_folder)
    assert isinstance(parts.unet, UNet2DConditionModel) and parts.cross_attention_dim == 8
    saved = torch.load(os.path.join(tiny_conditional_pipeline_folder, "unet", "diffusion_pytorch_model.bin"),
                       weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in parts.unet.state_dict().items())
    conditioning = parts.conditioning
    assert conditioning.names == ["jazz", "rock"] and conditioning.encoding("rock").shape == (1, 1, 8)
    assert torch.equal(conditioning.encoding(None)[0, 0], conditioning.null)
    with pytest.raises(AudiodiffError, match="unknown genre 'polka'; this model knows jazz, rock"):
        conditioning.encoding("polka")
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    images = sampling.sample(parts.unet, parts.scheduler, generators, 64, 64, 2, encoding=conditioning.encoding("jazz"),
                             null_encoding=conditioning.encoding(None), guidance=3.0)
    assert images.dtype == torch.uint8 and images.shape == (2, 64, 64)
    assert models.new_model("tiny").cross_attention_dim is None


def test_conditional_model_saves_conditioning_beside_what_diffusers_loads(tiny_conditional_pipeline_folder, tmp_path):
    parts = models.load_model(tiny_conditional_pipeline_folder)
    models.save_model(parts, str(tmp_path / "ours"))
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and "conditioning" not in index
    assert json.loads((tmp_path / "ours" / "conditioning" / "genres.json").read_text()) == ["jazz", "rock"]
    assert not list(tmp_path.rglob("*.bin"))
    again = models.load_model(str(tmp_path / "ours"))
    assert torch.equal(again.conditioning.vectors, parts.conditioning.vectors)
    assert torch.equal(again.conditioning.null, parts.conditioning.null)
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "ours"))
    assert isinstance(pipe, AudioDiffusionPipeline) and isinstance(pipe.unet, UNet2DConditionModel)
    assert_same_weights(pipe.unet, parts.unet)
    shutil.rmtree(tmp_path / "ours" / "unet")
    models.new_model("tiny").unet.save_pretrained(str(tmp_path / "ours" / "unet"))
    index["unet"] = ["diffusers", "UNet2DModel"]
    (tmp_path / "ours" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(AudiodiffError, match="conditioning/ needs a UNet2DConditionModel"):
        models.load_model(str(tmp_path / "ours"))


def test_latent_pipeline_saved_by_diffusers_loads_and_samples(tiny_latent_pipeline_folder, tmp_path):
    parts = models.load_model(tiny_latent_pipeline_folder)
    assert parts.vqvae is not None and parts.conditioning is None and parts.image_size == (64, 64)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    images = sampling.sample(parts.unet, parts.scheduler, generators, 64, 64, 2, vqvae=parts.vqvae)
    assert images.dtype == torch.uint8 and images.shape == (2, 64, 64)
    folder = shutil.copytree(tiny_latent_pipeline_folder, tmp_path / "model")
    (folder / "mel" / "mel_config.json").write_text(MelConfig(x_res=128, y_res=64).to_json())
    with pytest.raises(AudiodiffError, match="the UNet makes 32x32 latents, which the VAE decodes to 64x64 images, "
                                             "but mel_config.json says 64x128"):
        models.load_model(str(folder))


def test_a_uri_load_fetches_only_the_pipeline_files(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIODIFF_MODEL_CACHE", str(tmp_path / "cache"))
    parts = models.new_model("tiny")
    uri = f"{s3_bucket}/run"  # a fine-tune output: the pipeline and what training keeps beside it
    models.save_model(parts, uri)
    for beside in ("checkpoints/checkpoint_000001/model.pt", "samples/step-100/clips/a.wav", "logs/events.out",
                   "metrics.jsonl", "unet/diffusion_pytorch_model.bin"):
        storage.write_bytes(f"{uri}/{beside}", b"x" * (1 << 20))
    assert_same_weights(models.load_model(uri).unet, parts.unet)
    cached = {os.path.relpath(os.path.join(root, name), tmp_path / "cache")
              for root, _, names in os.walk(tmp_path / "cache") for name in names}
    (entry,) = {path.split(os.sep)[0] for path in cached if path.endswith("identity")}
    assert cached == {"fetched.jsonl", f"{entry}.lock", os.path.join(entry, "identity"), *(
        os.path.join(entry, "model", *f.split("/")) for f in (
            "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "mel/mel_config.json"))}
    models.save_model(parts, str(tmp_path / "local"))  # the same files anywhere: the same identity
    assert models.model_identity(uri) == models.model_identity(str(tmp_path / "local")) == models.model_identity("tiny")


@pytest.mark.timeout(120)
def test_a_model_is_fetched_once_per_node_and_again_when_it_changes(local_ray, s3_bucket, model_cache):
    @ray.remote(num_cpus=0)
    class Barrier:
        """Releases its waiters together, so that their loads race."""

        def __init__(self, parties: int):
            self.parties, self.all_here = parties, asyncio.Event()

        async def wait(self):
            self.parties -= 1
            if self.parties == 0:
                self.all_here.set()
            await self.all_here.wait()

    def load_after(barrier, uri: str) -> str:
        ray.get(barrier.wait.remote(), timeout=60)
        models.load_model(uri)
        return models.model_identity(uri)

    uri = f"{s3_bucket}/model"
    models.save_model(models.new_model("tiny"), uri)
    barrier = Barrier.remote(3)  # two Ray workers and this process
    tasks = [ray.remote(num_cpus=0.25)(load_after).remote(barrier, uri) for _ in range(2)]
    identities = [load_after(barrier, uri), *ray.get(tasks)]

    def downloads():
        with open(os.path.join(model_cache, "fetched.jsonl")) as f:
            return [line for line in map(json.loads, f) if line["uri"] == uri]

    assert len(downloads()) == 1 and set(identities) == {downloads()[0]["identity"]}
    models.save_model(models.new_model("tiny", seed=1), uri)  # new weights of the same size at the same URI
    models.load_model(uri)
    assert len(downloads()) == 2 and downloads()[1]["entry"] != downloads()[0]["entry"]
    assert models.model_identity(uri) == downloads()[1]["identity"] != identities[0]
    assert not [name for name in os.listdir(model_cache) if name.endswith(".partial")]
