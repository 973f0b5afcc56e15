"""Model folders in diffusers' AudioDiffusionPipeline layout: load from a hub id, a local folder, an
object-storage URI or a preset name; save with safetensors weights.

```
model_index.json, unet/{config.json, diffusion_pytorch_model.safetensors},
scheduler/scheduler_config.json, mel/mel_config.json, [vqvae/...], [conditioning/...]
```
A model from object storage is fetched once per node into a cache (AUDIODIFF_MODEL_CACHE, by default
~/.cache/audiodiff/models) that the node's processes share; a hub id goes through huggingface_hub's own cache,
which is shared the same way.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile

import diffusers
import pyarrow.fs as pafs
import safetensors.torch
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from audiodiff import sampling, storage
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelConfig
from audiodiff.model_files import PRESETS, download_from_hub, no_such_model
from audiodiff.unets import full_unet, tiny_unet

# a saved model names its training schedule's class; samplers are built on its config (audiodiff.sampling)
_UNET_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, UNet2DConditionModel)}
_WEIGHTS = "diffusion_pytorch_model.safetensors"
_PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"
_COMPONENTS = ("unet", "scheduler", "mel", "vqvae", "conditioning")


@dataclasses.dataclass
class Conditioning:
    """A genre-conditioned model's encodings: one learned vector per genre (`vectors` [n, dim], in the order of
    `names`) and the null vector [dim] that stands for no genre (classifier-free guidance). Saved beside the
    pipeline's components in `conditioning/`, which model_index.json does not name (it is no diffusers part)."""

    names: list[str]
    vectors: torch.Tensor
    null: torch.Tensor

    def encoding(self, genre: str | None) -> torch.Tensor:
        """The UNet's cross-attention input for `genre` (None: the null vector), [1, 1, dim]."""
        if genre is None:
            return self.null.reshape(1, 1, -1)
        if genre not in self.names:
            raise AudiodiffError(f"unknown genre '{genre}'; this model knows {', '.join(self.names)}")
        return self.vectors[self.names.index(genre)].reshape(1, 1, -1)

    def save_pretrained(self, directory: str) -> None:
        """`directory`/conditioning.safetensors (tensors "vectors" and "null") and genres.json (the names)."""
        os.makedirs(directory, exist_ok=True)
        safetensors.torch.save_file({"vectors": self.vectors.detach().cpu().contiguous(),
                                     "null": self.null.detach().cpu().contiguous()},
                                    os.path.join(directory, "conditioning.safetensors"))
        with open(os.path.join(directory, "genres.json"), "w") as f:
            json.dump(self.names, f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, directory: str, source: str) -> Conditioning:
        """Read what `save_pretrained` wrote; `source` names the model in errors."""
        names = _read_json(os.path.join(directory, "genres.json"), "conditioning/genres.json", source)
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
                and len(set(names)) == len(names)):
            raise AudiodiffError(f"{source}: conditioning/genres.json must be a list of distinct genre names")
        path = os.path.join(directory, "conditioning.safetensors")
        try:
            tensors = safetensors.torch.load_file(path)
        except FileNotFoundError:
            raise AudiodiffError(f"{source}: missing conditioning/conditioning.safetensors") from None
        except (OSError, safetensors.SafetensorError) as e:
            raise AudiodiffError(f"{source}: cannot read conditioning/conditioning.safetensors ({e})") from None
        vectors, null = tensors.get("vectors"), tensors.get("null")
        if vectors is None or null is None or vectors.ndim != 2 or null.shape != vectors.shape[1:]:
            raise AudiodiffError(f"{source}: conditioning/conditioning.safetensors must hold \"vectors\" [genres, "
                                 "dim] and \"null\" [dim]")
        if len(vectors) != len(names):
            raise AudiodiffError(f"{source}: conditioning/conditioning.safetensors has {len(vectors)} vectors but "
                                 f"conditioning/genres.json names {len(names)} genres")
        return cls(names=names, vectors=vectors, null=null)


@dataclasses.dataclass
class PipelineParts:
    """What an AudioDiffusionPipeline is made of. `vqvae` is set only for latent audio diffusion models,
    `conditioning` only for genre-conditioned ones (whose UNet is a UNet2DConditionModel)."""

    unet: UNet2DModel | UNet2DConditionModel
    scheduler: DDPMScheduler | DDIMScheduler
    mel: MelConfig
    vqvae: AutoencoderKL | None = None
    conditioning: Conditioning | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the spectrogram images the model makes: the mel config's resolution."""
        return self.mel.y_res, self.mel.x_res

    @property
    def cross_attention_dim(self) -> int | None:
        """The size of the encodings a conditional UNet takes; None for an unconditional one."""
        return self.unet.config.cross_attention_dim if isinstance(self.unet, UNet2DConditionModel) else None


# preset: (UNet builder, size of the genre vectors of its conditional variant); its mel config is PRESETS'
PRESET_UNETS = {"full": (full_unet, 128), "tiny": (tiny_unet, 32)}


def new_model(preset: str, seed: int = 0, conditional: bool = False) -> PipelineParts:
    """A freshly initialised model for training from scratch (`conditional`: a UNet2DConditionModel, for genre
    conditioning). The same seed gives the same weights in every process (Ray workers and actors each build
    their own), without touching the global random state."""
    if preset not in PRESETS:
        raise AudiodiffError(f"unknown preset '{preset}'; choose one of {sorted(PRESETS)}")
    (make_unet, dim), mel = PRESET_UNETS[preset], PRESETS[preset]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = make_unet(dim if conditional else None)
    return PipelineParts(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000), mel=mel)


def load_model(name: str, conditional: bool = False) -> PipelineParts:
    """A preset name, a local folder, an object-storage URI (fetched once per node) or a hub id. `conditional`
    makes a preset's conditional variant; a saved model is what it is."""
    if name in PRESETS:
        return new_model(name, conditional=conditional)
    return load_model_folder(_local_folder(name), source=name)


def model_identity(name: str) -> str:
    """A short sha256 of the model's pipeline files (each one's path and content: the configs and the weights),
    for generation.json: the same for every copy of a model (a folder, its upload, a node's cached copy), another
    as soon as a weight or a config changes. A preset is hashed as save_model writes it."""
    if name in PRESETS:
        with tempfile.TemporaryDirectory(prefix="audiodiff-model-") as folder:
            _write_model_folder(new_model(name), folder)
            return _folder_identity(folder)
    if storage.is_remote(name):
        with open(os.path.join(_fetch(name), "identity")) as f:  # hashed when the node fetched it
            return f.read()
    return _folder_identity(_local_folder(name))


def _local_folder(name: str) -> str:
    """A local folder that holds the model `name` (no preset): the folder itself, the node's cached copy of a
    URI, or huggingface_hub's cached snapshot of a hub id."""
    if storage.is_remote(name):
        return os.path.join(_fetch(name), "model")
    if os.path.exists(name) or name.startswith("file://"):
        return storage.resolve(name)[1]
    if storage.is_hub_id(name):
        return _download_pipeline_from_hub(name)
    raise no_such_model(name)


def _pipeline_files(paths) -> list[str]:
    """Which of `paths` (relative to a model folder) are the pipeline's own files: model_index.json and each
    component's configs and weights, a pickled .bin only where its component has no safetensors; never what a
    fine-tune keeps beside them (checkpoints/, samples/, logs/, metrics)."""
    present = set(paths)

    def wanted(path: str) -> bool:
        component, _, name = path.partition("/")
        if component not in _COMPONENTS or "/" in name:
            return False
        if name == _PICKLED_WEIGHTS:
            return f"{component}/{_WEIGHTS}" not in present
        return name.endswith((".json", ".safetensors"))

    return sorted(path for path in present if path == "model_index.json" or wanted(path))


def _list_pipeline(fs: pafs.FileSystem, root: str) -> dict[str, pafs.FileInfo]:
    """The pipeline's files under `root` on `fs`, by path relative to it; only the component folders are listed
    (a fine-tune output also holds thousands of sample files)."""
    infos = [fs.get_file_info(f"{root}/model_index.json")]
    for component in _COMPONENTS:
        infos += fs.get_file_info(pafs.FileSelector(f"{root}/{component}", allow_not_found=True))
    files = {info.path[len(root) + 1:]: info for info in infos if info.type == pafs.FileType.File}
    return {path: files[path] for path in _pipeline_files(files)}


def _folder_identity(folder: str) -> str:
    """What model_identity returns for a local folder: sha256 over its pipeline files' paths and contents."""
    lines = []
    for path in _list_pipeline(pafs.LocalFileSystem(), folder):
        with open(os.path.join(folder, path), "rb") as f:
            lines.append(f"{path} {hashlib.file_digest(f, 'sha256').hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


def model_cache() -> str:
    """Where a node keeps the models it fetched from object storage: AUDIODIFF_MODEL_CACHE, by default
    ~/.cache/audiodiff/models, which outlives reboots and job runs and is private to the user, like
    huggingface_hub's cache beside it. Point it at a volume with room for the models on machines whose home is
    small or ephemeral. Nothing is evicted: delete entries of models no longer used."""
    return os.path.abspath(os.environ.get("AUDIODIFF_MODEL_CACHE")
                           or os.path.join(os.path.expanduser("~"), ".cache", "audiodiff", "models"))


def _fetch(uri: str) -> str:
    """The node's cache entry for the model at `uri`: `model/` (its pipeline files) and `identity` (their
    hash). An entry is named by a hash of the URI and of its pipeline files' sizes, times and ETags, so new
    weights at the same URI make a new entry. The first process on the node to need it downloads it under a
    file lock into a partial folder that is renamed into place; the others wait on the lock and then find it,
    so each entry is downloaded once and never seen half-written. Each download adds a line to fetched.jsonl."""
    if not storage.exists(storage.join(uri, "model_index.json")):
        raise AudiodiffError(f"{uri}: not a model folder (no model_index.json there)")
    fs, root = storage.resolve(uri)
    try:
        files = _list_pipeline(fs, root)
        versions = [[path, *_version(fs, info)] for path, info in files.items()]
    except OSError as e:
        raise AudiodiffError(f"{uri}: cannot list the model's files ({e})") from None
    key = hashlib.sha256(json.dumps([uri.rstrip("/"), versions]).encode()).hexdigest()[:16]
    cache = model_cache()
    entry = os.path.join(cache, key)
    if os.path.isdir(entry):
        return entry
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        if not os.path.isdir(entry):
            partial = os.path.join(cache, f"{key}.partial")
            shutil.rmtree(partial, ignore_errors=True)  # left by a process that died while it downloaded
            for path, info in files.items():
                target = os.path.join(partial, "model", *path.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                try:
                    pafs.copy_files(info.path, target, source_filesystem=fs,
                                    destination_filesystem=pafs.LocalFileSystem())
                except OSError as e:
                    raise AudiodiffError(f"{storage.join(uri, path)}: cannot fetch ({e})") from None
            identity = _folder_identity(os.path.join(partial, "model"))
            with open(os.path.join(partial, "identity"), "w") as f:
                f.write(identity)
            os.rename(partial, entry)
            with open(os.path.join(cache, "fetched.jsonl"), "a") as f:
                f.write(json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                    "uri": uri, "entry": key, "identity": identity,
                                    "bytes": sum(info.size for info in files.values())}) + "\n")
    return entry


def _version(fs: pafs.FileSystem, info: pafs.FileInfo) -> tuple:
    """What tells one upload of a stored file from the next: its size, time and, where the store reports one, its
    ETag (S3's times have whole seconds: a same-size rewrite within a second changes only the ETag)."""
    with fs.open_input_file(info.path) as f:
        etag = f.metadata().get("ETag", b"").decode()
    return info.size, info.mtime_ns, etag


def _download_pipeline_from_hub(repo_id: str) -> str:
    """The pipeline's files in huggingface_hub's cache: configs and safetensors, and a component's pickled .bin
    only where it has no safetensors."""
    folder = download_from_hub(repo_id, ["model_index.json", *(f"{component}/*{ext}" for component in _COMPONENTS
                                                                for ext in (".json", ".safetensors"))])
    index = _read_json(os.path.join(folder, "model_index.json"), "model_index.json", repo_id)
    pickled = [f"{component}/{_PICKLED_WEIGHTS}" for component in ("unet", "vqvae")
               if _named(index, component) and not os.path.isfile(os.path.join(folder, component, _WEIGHTS))]
    # the same commit as the first call, should the repository change in between
    return download_from_hub(repo_id, pickled, revision=os.path.basename(folder)) if pickled else folder


def _named(index: dict, component: str) -> str | None:
    """The class model_index.json gives a component ([library, class], or [null, null] where it has none)."""
    return (index.get(component) or [None])[-1]


def load_model_folder(folder: str, source: str | None = None) -> PipelineParts:
    """Load a local folder in the AudioDiffusionPipeline layout; every missing part is named."""
    source = source or folder
    index = _read_json(os.path.join(folder, "model_index.json"), "model_index.json", source)
    missing = [part for part in ("unet", "scheduler") if not _named(index, part)]
    if missing:
        raise AudiodiffError(f"{source}: model_index.json names no {' and no '.join(missing)}")
    unet_class, scheduler_class = _named(index, "unet"), _named(index, "scheduler")
    if unet_class not in _UNET_CLASSES:
        raise AudiodiffError(f"{source}: unet {unet_class} is not supported; use one of {sorted(_UNET_CLASSES)}")
    if scheduler_class not in sampling.PIPELINE_SCHEDULERS:
        raise AudiodiffError(f"{source}: scheduler {scheduler_class} is not supported; "
                             f"use one of {sorted(sampling.PIPELINE_SCHEDULERS)}")
    has_vqvae = bool(_named(index, "vqvae"))
    for required in ("unet/config.json", "scheduler/scheduler_config.json", "mel/mel_config.json",
                     *(["vqvae/config.json"] if has_vqvae else [])):
        if not os.path.isfile(os.path.join(folder, required)):
            raise AudiodiffError(f"{source}: missing {required}")
    mel = MelConfig.from_json(storage.read_text(os.path.join(folder, "mel", "mel_config.json")),
                              f"{source}/mel/mel_config.json")
    unet = _load_weights(_UNET_CLASSES[unet_class], folder, "unet", source)
    vqvae = _load_weights(AutoencoderKL, folder, "vqvae", source) if has_vqvae else None
    try:
        scheduler = sampling.PIPELINE_SCHEDULERS[scheduler_class].from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, TypeError) as e:
        raise AudiodiffError(f"{source}: cannot load the scheduler ({type(e).__name__}: {e})") from None
    conditioning = (Conditioning.from_pretrained(os.path.join(folder, "conditioning"), source)
                    if os.path.isdir(os.path.join(folder, "conditioning")) else None)
    parts = PipelineParts(unet=unet, scheduler=scheduler, mel=mel, vqvae=vqvae, conditioning=conditioning)
    _check_fit(parts, source)
    return parts


def _load_weights(cls, folder: str, component: str, source: str):
    """A component's model from its safetensors or, where it has none, its pickled .bin, read through torch's
    weights-only unpickler (diffusers 0.42 reads .bin files with weights_only=True too); a pickle that asks
    for anything but tensors is refused, unrun."""
    safe = os.path.isfile(os.path.join(folder, component, _WEIGHTS))
    pickled = os.path.join(folder, component, _PICKLED_WEIGHTS)
    if not safe and not os.path.isfile(pickled):
        raise AudiodiffError(f"{source}: missing {component}/{_WEIGHTS} (or a pickled {_PICKLED_WEIGHTS})")
    if not safe:
        try:  # mmap: the tensors' bytes are not read, only the pickle's instructions
            torch.load(pickled, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(pickled))
        except pickle.UnpicklingError as e:
            # torch's first line after this marker, less its advice to allow-list what the pickle asks for
            reason = next(line for line in str(e).split("WeightsUnpickler error:")[-1].splitlines() if line.strip())
            reason = reason.strip().split(". ")[0]
            raise AudiodiffError(f"{source}: refused {component}/{_PICKLED_WEIGHTS}: torch's weights-only loader "
                                 f"does not take it ({reason}), and audiodiff never runs a pickle's code; convert "
                                 "it where you trust it, with diffusers' save_pretrained(safe_serialization=True)"
                                 ) from None
        except (RuntimeError, KeyError, EOFError, OSError, ValueError) as e:  # what torch.load raises on damage
            raise AudiodiffError(f"{source}: cannot read {component}/{_PICKLED_WEIGHTS} ({type(e).__name__}: {e}); "
                                 "it is damaged or no torch checkpoint") from None
    try:
        return cls.from_pretrained(folder, subfolder=component, use_safetensors=safe)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise AudiodiffError(f"{source}: cannot load {component}/ ({type(e).__name__}: {e})") from None


def _check_fit(parts: PipelineParts, source: str) -> None:
    """The UNet, the VAE, the conditioning and the mel config agree on sizes."""
    sample_size = parts.unet.config.sample_size
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    y_res, x_res = parts.image_size
    factor = 1 if parts.vqvae is None else 2 ** (len(parts.vqvae.config.block_out_channels) - 1)
    if (height * factor, width * factor) != (y_res, x_res):
        makes = (f"{height}x{width} images" if parts.vqvae is None else
                 f"{height}x{width} latents, which the VAE decodes to {height * factor}x{width * factor} images,")
        raise AudiodiffError(f"{source}: the UNet makes {makes} but mel_config.json says {y_res}x{x_res} "
                             "(y_res x x_res)")
    if parts.vqvae is not None and parts.unet.config.in_channels != parts.vqvae.config.latent_channels:
        raise AudiodiffError(f"{source}: the UNet takes {parts.unet.config.in_channels} channels but the VAE's "
                             f"latents have {parts.vqvae.config.latent_channels}")
    if parts.conditioning is not None:
        if parts.cross_attention_dim is None:
            raise AudiodiffError(f"{source}: conditioning/ needs a UNet2DConditionModel; model_index.json names "
                                 f"{type(parts.unet).__name__}")
        dim = parts.conditioning.null.shape[0]
        if dim != parts.cross_attention_dim:
            raise AudiodiffError(f"{source}: conditioning/conditioning.safetensors holds {dim}-dim vectors but the "
                                 f"UNet's cross_attention_dim is {parts.cross_attention_dim}")


def _read_json(path: str, name: str, source: str):
    """The JSON file at `path`; errors name it as `name` within the model `source`."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        raise AudiodiffError(f"{source}: not a model folder (no model_index.json)" if name == "model_index.json"
                             else f"{source}: missing {name}") from None
    except OSError as e:
        raise AudiodiffError(f"{source}: cannot read {name} ({e.strerror}); check the folder's permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AudiodiffError(f"{source}: {name} is not valid JSON ({e})") from None


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
    if parts.conditioning is not None:
        parts.conditioning.save_pretrained(os.path.join(folder, "conditioning"))
    os.makedirs(os.path.join(folder, "mel"), exist_ok=True)
    with open(os.path.join(folder, "mel", "mel_config.json"), "w") as f:
        f.write(parts.mel.to_json())
    index = {
        "_class_name": "AudioDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "mel": ["diffusers", "Mel"],
        "scheduler": ["diffusers", type(parts.scheduler).__name__],
        "unet": ["diffusers", type(parts.unet).__name__],
        "vqvae": ["diffusers", "AutoencoderKL"] if parts.vqvae is not None else [None, None],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
