"""What a model's name says and its small files hold, without diffusers (seconds to import in each Ray worker):
the presets and their mel configs, a model's mel config, and downloads from the Hugging Face Hub. Loading and
saving whole models is audiodiff.models'."""

from __future__ import annotations

import os

from audiodiff import storage
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelConfig

# preset: its mel config (its UNet: audiodiff.models.PRESET_UNETS)
PRESETS = {"full": MelConfig(), "tiny": MelConfig(x_res=64, y_res=64)}


def load_mel_config(name: str) -> MelConfig:
    """Only the mel config of a model (preset, folder, URI or hub id), without loading its weights."""
    if name in PRESETS:
        return PRESETS[name]
    if storage.is_remote(name) or os.path.exists(name) or name.startswith("file://"):
        path = storage.join(name, "mel", "mel_config.json")
        return MelConfig.from_json(storage.read_text(path), path)
    if storage.is_hub_id(name):
        folder = download_from_hub(name, patterns=["mel/mel_config.json"])
        return MelConfig.from_json(storage.read_text(os.path.join(folder, "mel", "mel_config.json")),
                                   f"{name}/mel/mel_config.json")
    raise no_such_model(name)


def no_such_model(name: str) -> AudiodiffError:
    return AudiodiffError(f"{name}: no such model folder, and not a hub id (owner/name), an s3:// or gs:// URI "
                          f"or a preset ({', '.join(sorted(PRESETS))})")


def download_from_hub(repo_id: str, patterns: list[str], revision: str | None = None) -> str:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, revision=revision)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise AudiodiffError(f"{repo_id}: cannot fetch from the Hugging Face Hub ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]}); pass a local folder or an s3:// / gs:// URI") from None
