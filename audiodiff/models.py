"""Model folders in diffusers' AudioDiffusionPipeline layout: load from a hub id, a local folder, an
object-storage URI or a preset name; save with safetensors weights.

```
model_index.json, unet/{config.json, diffusion_pytorch_model.safetensors},
scheduler/scheduler_config.json, mel/mel_config.json, [vqvae/...]
```
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel

from audiodiff import storage
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelConfig

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}  # by the names the commands take
_SCHEDULER_CLASSES = {cls.__name__: cls for cls in SCHEDULERS.values()}
_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclasses.dataclass
class PipelineParts:
    """What an AudioDiffusionPipeline is made of. `vqvae` is set only for latent audio diffusion models."""

    unet: UNet2DModel
    scheduler: DDPMScheduler | DDIMScheduler
    mel: MelConfig
    vqvae: AutoencoderKL | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the spectrogram images the model makes: the mel config's resolution."""
        return self.mel.y_res, self.mel.x_res


def _full_unet() -> UNet2DModel:
    """teticio's audio-diffusion-256 architecture (113.7 M parameters)."""
    return UNet2DModel(
        sample_size=256, in_channels=1, out_channels=1, layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    )


def _tiny_unet() -> UNet2DModel:
    """1.2 M parameters on 64x64 images; 32-channel attention heads (diffusers' default 8-channel heads
    make CPU attention 3x slower). A batch-4 training step takes about 0.2 s on 2 CPU cores."""
    return UNet2DModel(
        sample_size=64, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=8, attention_head_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


PRESETS = {
    "full": (_full_unet, MelConfig()),
    "tiny": (_tiny_unet, MelConfig(x_res=64, y_res=64)),
}


def new_model(preset: str, seed: int = 0) -> PipelineParts:
    """A freshly initialised model for training from scratch. The same seed gives the same weights in every
    process (Ray workers and actors each build their own), without touching the global random state."""
    if preset not in PRESETS:
        raise AudiodiffError(f"unknown preset '{preset}'; choose one of {sorted(PRESETS)}")
    make_unet, mel = PRESETS[preset]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = make_unet()
    return PipelineParts(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000), mel=mel)


def load_model(name: str) -> PipelineParts:
    """A preset name, a local folder, an object-storage URI (copied locally first) or a hub id."""
    if name in PRESETS:
        return new_model(name)
    if storage.is_remote(name):
        if not storage.exists(storage.join(name, "model_index.json")):
            raise AudiodiffError(f"{name}: not a model folder (no model_index.json there)")
        with tempfile.TemporaryDirectory(prefix="audiodiff-model-") as local:
            storage.download_dir(name, local)
            return load_model_folder(local, source=name)
    if os.path.exists(name) or name.startswith("file://"):
        return load_model_folder(storage.resolve(name)[1], source=name)
    if storage.is_hub_id(name):
        return load_model_folder(_download_from_hub(name), source=name)
    raise _no_such_model(name)


def _no_such_model(name: str) -> AudiodiffError:
    return AudiodiffError(f"{name}: no such model folder, and not a hub id (owner/name), an s3:// or gs:// URI "
                          f"or a preset ({', '.join(sorted(PRESETS))})")


def _download_from_hub(repo_id: str, patterns: list[str] | None = None) -> str:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return huggingface_hub.snapshot_download(
            repo_id, allow_patterns=patterns or ["model_index.json", "*/*.json", f"*/{_WEIGHTS}"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise AudiodiffError(f"{repo_id}: cannot fetch from the Hugging Face Hub ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]}); pass a local folder or an s3:// / gs:// URI") from None


def load_model_folder(folder: str, source: str | None = None) -> PipelineParts:
    """Load a local folder in the AudioDiffusionPipeline layout; every missing part is named."""
    source = source or folder
    index = _read_json(os.path.join(folder, "model_index.json"), source)
    components = {k: v for k, v in index.items() if not k.startswith("_")}
    missing = [part for part in ("unet", "scheduler") if not (components.get(part) or [None])[-1]]
    if missing:
        raise AudiodiffError(f"{source}: model_index.json names no {' and no '.join(missing)}")
    scheduler_class = components["scheduler"][-1]
    if scheduler_class not in _SCHEDULER_CLASSES:
        raise AudiodiffError(f"{source}: scheduler {scheduler_class} is not supported; "
                             f"use one of {sorted(_SCHEDULER_CLASSES)}")
    for required in ("unet/config.json", f"unet/{_WEIGHTS}", "scheduler/scheduler_config.json",
                     "mel/mel_config.json"):
        if not os.path.isfile(os.path.join(folder, required)):
            hint = (" (audiodiff loads safetensors weights only and never unpickles a .bin checkpoint; "
                    "convert it with diffusers' save_pretrained(safe_serialization=True))"
                    if required.endswith(".safetensors") else "")
            raise AudiodiffError(f"{source}: missing {required}{hint}")
    mel_path = os.path.join(folder, "mel", "mel_config.json")
    with open(mel_path) as f:
        mel = MelConfig.from_json(f.read(), f"{source}/mel/mel_config.json")
    try:
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
        scheduler = _SCHEDULER_CLASSES[scheduler_class].from_pretrained(folder, subfolder="scheduler")
        has_vqvae = (components.get("vqvae") or [None])[-1] is not None
        vqvae = AutoencoderKL.from_pretrained(folder, subfolder="vqvae", use_safetensors=True) if has_vqvae else None
    except (OSError, ValueError, TypeError) as e:
        raise AudiodiffError(f"{source}: cannot load the model ({type(e).__name__}: {e})") from None
    parts = PipelineParts(unet=unet, scheduler=scheduler, mel=mel, vqvae=vqvae)
    sample_size = unet.config.sample_size
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    if vqvae is None and (height, width) != parts.image_size:
        raise AudiodiffError(f"{source}: the UNet makes {height}x{width} images but mel_config.json says "
                             f"{parts.image_size[0]}x{parts.image_size[1]} (y_res x x_res)")
    return parts


def _read_json(path: str, source: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        raise AudiodiffError(f"{source}: not a model folder (no {os.path.basename(path)})") from None
    except OSError as e:
        raise AudiodiffError(f"{source}: cannot read {os.path.basename(path)} ({e.strerror}); check the "
                             "folder's permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AudiodiffError(f"{source}: {os.path.basename(path)} is not valid JSON ({e})") from None


def save_model(parts: PipelineParts, uri: str) -> None:
    """Write `parts` in the AudioDiffusionPipeline layout to a local folder or object storage.
    model_index.json goes last, so a folder that has one is complete."""
    if storage.is_remote(uri):
        with tempfile.TemporaryDirectory(prefix="audiodiff-model-") as local:
            _write_model_folder(parts, local)
            storage.upload_dir(local, uri, last=("model_index.json",))
    else:
        _write_model_folder(parts, storage.resolve(uri)[1])


def _write_model_folder(parts: PipelineParts, folder: str) -> None:
    parts.unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    parts.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    if parts.vqvae is not None:
        parts.vqvae.save_pretrained(os.path.join(folder, "vqvae"), safe_serialization=True)
    os.makedirs(os.path.join(folder, "mel"), exist_ok=True)
    with open(os.path.join(folder, "mel", "mel_config.json"), "w") as f:
        f.write(parts.mel.to_json())
    index = {
        "_class_name": "AudioDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "mel": ["diffusers", "Mel"],
        "scheduler": ["diffusers", type(parts.scheduler).__name__],
        "unet": ["diffusers", "UNet2DModel"],
        "vqvae": ["diffusers", "AutoencoderKL"] if parts.vqvae is not None else [None, None],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise AudiodiffError(f"--scheduler must be one of {sorted(SCHEDULERS)}, got '{name}'")


def make_scheduler(name: str, parts: PipelineParts) -> DDPMScheduler | DDIMScheduler:
    """The model's noise schedule under the sampler `name` (ddpm or ddim)."""
    check_scheduler(name)
    return SCHEDULERS[name].from_config(parts.scheduler.config)


def load_mel_config(name: str) -> MelConfig:
    """Only the mel config of a model (preset, folder, URI or hub id), without loading its weights."""
    if name in PRESETS:
        return PRESETS[name][1]
    if storage.is_remote(name) or os.path.exists(name) or name.startswith("file://"):
        path = storage.join(name, "mel", "mel_config.json")
        return MelConfig.from_json(storage.read_bytes(path).decode(), path)
    if storage.is_hub_id(name):
        folder = _download_from_hub(name, patterns=["mel/mel_config.json"])
        with open(os.path.join(folder, "mel", "mel_config.json")) as f:
            return MelConfig.from_json(f.read(), f"{name}/mel/mel_config.json")
    raise _no_such_model(name)
