"""Making clips on accelerator actors, for every command that writes clips (generate, remix, continue,
interpolate): the settings they share, the actor that turns planned clips into WAV and PNG bytes, and the
run around it (settings check, skipping finished clips, writing on CPU tasks, manifest and gallery).

A planned clip is a manifest row (audiodiff.outputs) plus `starts`, the PNGs it starts from:
- none: denoised from noise; kind "long" goes on window after window to `frames` (sampling.continue_images);
- "input" and "remix": one PNG per slice, each slice denoised from its input at `strength` keeping
  `keep_start`/`keep_end` seconds of it, the slices joined in order (a whole track when there are several);
  a silent (all white) input slice stays silent, and an "input" (strength 0) is the input itself, rendered
  by the same vocoder as its outputs so that they compare fairly;
- "continuation": the first window, continued to `frames`;
- "interpolation": two inputs, inverted to noise with DDIM and slerped at `position`.
Audio is cut to the row's `seconds`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.expressions import col

from audiodiff import checks, devices, memorisation, ownership, progress, sampling, storage
from audiodiff.conditioning import read_encodings
from audiodiff.encode import png_image
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelCodec, MelConfig, is_silent
from audiodiff.model_files import load_mel_config
from audiodiff.models import load_model, model_identity
from audiodiff.outputs import (GALLERY, MANIFEST, MANIFEST_SCHEMA, PEAK_DBFS, SETTINGS, ClipSink, finished_clips,
                               write_manifest_and_gallery)
from audiodiff.runtime import ACTOR_CPUS, LIGHT_CPUS, check_paths_reachable, cluster_capacity, require_gpus, \
    worker_errors
from audiodiff.unets import clip_bytes

WORK_SCHEMA = MANIFEST_SCHEMA.append(pa.field("starts", pa.list_(pa.binary())))
log = logging.getLogger(__name__)

# Clips per batch without --batch-size, for clips one window wide (a clip n windows wide: 1/n of them).
# On CPU: 4, the batch the clips' contract and its tests were made at. On a GPU: as many as fit in the memory
# budget (GPU_MEMORY_SHARE, unets.clip_bytes), up to 64: a step of 64 full-model clips is 32 TFLOP (counted),
# enough work to fill a GPU (on paper: benchmarks/bench_gpu.py measures the forward per batch size).
CPU_BATCH = 4
MAX_GPU_BATCH = 64
GPU_MEMORY_SHARE = 0.8  # of the accelerator memory free once the model is loaded: room for the allocator's slack


@dataclasses.dataclass
class ClipSettings:
    """What every clip-making command shares: the model, the sampler, the output and how work is spread."""

    command: typing.ClassVar[str]  # the command's name, in its progress lines
    model: str
    output: str
    scheduler: str = sampling.GENERATE_SAMPLER
    steps: int | None = None
    karras: bool = False  # Karras sigmas, for the schedulers that take them
    eta: float = 0.0
    seed: int = 0
    batch_size: int | None = None  # clips per batch; None: by a memory budget per clip width (clips_per_batch)
    concurrency: int | None = None  # actors; None: with --gpu every GPU the cluster has or can add, else 1
    gpu: bool = False
    gpus_per_actor: float = 1.0  # a fraction shares a GPU between actors (small models)
    precision: str = "auto"  # fp32, bf16 or fp16; auto is resolved here, on the driver (audiodiff.devices)
    target_dbfs: float = PEAK_DBFS
    shared_path: bool = False  # a local output that every node of a multi-node cluster mounts
    genres: list[str] = dataclasses.field(default_factory=list)  # each clip once per genre (audiodiff.conditioning)
    encodings: str | None = None  # or once per encoding in this file
    guidance: float = 1.0  # classifier-free guidance scale (1: none)
    training: str | None = None  # the training data: mark clips that copy a slice of it (audiodiff.memorisation)

    def __post_init__(self):
        """The checks that need no model, no data and no cluster (audiodiff.checks)."""
        self.precision = devices.resolve_precision(self.precision, self.gpu)
        checks.finite(self)
        sampling.check_scheduler(self.scheduler, self.karras)
        devices.check_precision(self.precision, self.gpu)
        checks.at_least(self, 1, "batch_size", "concurrency", "steps")
        checks.at_least(self, 0, "guidance")
        if self.genres and self.encodings:
            raise AudiodiffError("give --genre or --encodings, not both")
        if not (0 < self.gpus_per_actor <= 1 or float(self.gpus_per_actor).is_integer()):
            raise AudiodiffError(f"--gpus-per-actor must be a share of one GPU (0.5, 0.25 ...) or a whole number of "
                                 f"GPUs, got {self.gpus_per_actor:g}")

    @property
    def num_steps(self) -> int:
        return self.steps or sampling.SAMPLERS[self.scheduler].default_steps

    @property
    def scheduler_label(self) -> str:
        return sampling.scheduler_label(self.scheduler, self.karras)

    def settings(self) -> dict:
        """What a clip depends on; clips under one output must share it (`generation.json`)."""
        conditions = {"genres": self.genres, "guidance": self.guidance} if self.genres else {}
        if self.encodings:
            conditions = {"encodings": self.encodings, "guidance": self.guidance}
        return {"model": self.model, "scheduler": self.scheduler_label, "steps": self.num_steps, "eta": self.eta,
                "seed": self.seed, "target_dbfs": self.target_dbfs, "precision": self.precision, **conditions}

    def place(self) -> None:
        """Chooses the number of actors where --concurrency was not given, and checks that the cluster has or can
        add their GPUs; on the current Ray, before any work starts."""
        if self.concurrency is None:
            self.concurrency = max(1, math.floor(cluster_capacity("GPU") / self.gpus_per_actor)) if self.gpu else 1
        if self.gpu:
            require_gpus(self.concurrency * self.gpus_per_actor, f"--gpu with --concurrency {self.concurrency}"
                         + (f" and --gpus-per-actor {self.gpus_per_actor:g}" if self.gpus_per_actor != 1 else ""))

    @property
    def rows_per_batch(self) -> int:
        """Planned clips handed to an actor at a time: its batches of the narrowest clips (clips_per_batch)."""
        return self.batch_size or (MAX_GPU_BATCH if self.gpu else CPU_BATCH)


def clips_per_batch(config: ClipSettings, window: int, width: int, clip_memory: int, budget: int | None) -> int:
    """Clips `width` frames wide denoised together: --batch-size where given, else on CPU CPU_BATCH windows'
    worth, on a GPU as many as `budget` bytes hold at `clip_memory` each (clip_bytes), up to MAX_GPU_BATCH
    windows' worth. A clip n windows wide gets 1/n of the batch of one window wide."""
    if config.batch_size is not None:
        return config.batch_size
    if budget is None:
        return max(1, CPU_BATCH * window // width)
    return max(1, min(MAX_GPU_BATCH * window // width, budget // clip_memory))


def cpu_threads(concurrency: int) -> int:
    """Threads of each CPU actor: its node's cores shared by the actors Ray Data spreads over the nodes, so that a
    lone actor uses all of them. Ray reserves only ACTOR_CPUS per actor, to leave room for the short light tasks
    (reading, encoding and writing clips) that feed and drain it."""
    cores = [n["Resources"]["CPU"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if not cores:
        return 1
    return max(1, math.floor(min(cores) / -(-concurrency // len(cores))))


def device_record(device: torch.device, precision: str) -> dict:
    """What generation.json records of the device an actor made its clips on: its name, the precision of the
    denoising, and how torch ran fp32 matmuls and convolutions ("ieee", or "tf32" on GPUs from Ampere). Read through
    the fp32_precision API that audiodiff.devices sets: the legacy allow_tf32 flags raise once it is used."""
    return {"device": devices.device_name(device), "precision": precision,
            "fp32_matmul": torch.backends.cuda.matmul.fp32_precision,
            "fp32_conv": torch.backends.cudnn.conv.fp32_precision}


def clip_seed(*keys: int) -> int:
    """A clip's seed from the run's seed and what tells the clip apart (its kind, index, variation ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


def default_overlap(mel: MelConfig) -> float:
    """Half of what a window can keep (its width less its end frames), at most 2 s: 2 s for 256-frame models,
    about 0.68 s for the tiny preset's 64 frames (a 1.46 s window)."""
    return min(2.0, mel.samples_for_width(mel.x_res - 2 * mel.edge_frames) / mel.sample_rate / 2)


# The vocoder works in bounded windows, but a clip's own audio (4 bytes a sample, 318 MB an hour at 22050 Hz), its
# WAV and its PNG are held whole by the actor that makes it, times the batch: one hour bounds that.
MAX_CLIP_SECONDS = 3600


def check_long_form(mel: MelConfig, seconds: float, overlap: float) -> None:
    """A long clip must be longer than one window, and each window must add something to the one before."""
    window = mel.samples_for_width(mel.x_res) / mel.sample_rate
    if seconds <= window:
        raise AudiodiffError(f"--seconds {seconds:g} is not longer than one window ({window:.2f} s); "
                             "ask for more, or make standard clips")
    if seconds > MAX_CLIP_SECONDS:
        raise AudiodiffError(f"--seconds {seconds:g} is over {MAX_CLIP_SECONDS} (one hour): a clip is held whole "
                             "(its audio, WAV and PNG) by the actor that makes it; make several shorter ones")
    usable = mel.samples_for_width(mel.x_res - 2 * mel.edge_frames) / mel.sample_rate
    if not 0 < mel.frames_in(overlap) < mel.x_res - 2 * mel.edge_frames:
        raise AudiodiffError(f"--overlap {overlap:g} s must be shorter than one window less its end frames "
                             f"({usable:.2f} s) and at least one frame ({mel.hop_length / mel.sample_rate:.3f} s)")


class ClipMaker:
    """Per actor: the model, scheduler and codec on its device; per batch: planned clips (WORK_SCHEMA) denoised
    together where they share kind, width and strength, in batches that fit its memory (clips_per_batch; a batch
    that runs out of it is halved), and turned into audio together: each clip's uint8 image and float audio, for
    the writer (ClipSink) to encode and store. `overlap`: seconds each window of a long clip keeps from the one
    before; `threads`: torch's CPU threads (cpu_threads), else the CPUs Ray gave the actor."""

    def __init__(self, config: ClipSettings, overlap: float | None = None, threads: int | None = None,
                 counter=None):
        self.config = config
        self.counter = counter  # audiodiff.progress
        self.device = torch.device("cuda" if config.gpu else "cpu")
        devices.use_cpus_given()
        if threads is not None:
            torch.set_num_threads(threads)
        parts = load_model(config.model)
        self.unet = devices.for_inference(parts.unet, self.device, config.precision)
        self.vqvae = parts.vqvae.to(self.device).eval() if parts.vqvae is not None else None
        self.conditioning = parts.conditioning
        self.encodings = read_encodings(config.encodings) if config.encodings else {}
        self.scheduler = sampling.make_scheduler(config.scheduler, parts.scheduler.config, config.karras)
        self.codec = MelCodec(parts.mel, device=self.device)
        self.overlap = parts.mel.frames_in(overlap) if overlap is not None else None
        self.budget = None  # bytes of accelerator memory a batch may take; None on CPU
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.budget = int(GPU_MEMORY_SHARE * min(free, total * min(1.0, config.gpus_per_actor)))
        self.batch_sizes: dict[int, int] = {}  # clips per batch by width, halved where a batch ran out of memory
        self.made_on = json.dumps(device_record(self.device, config.precision), sort_keys=True)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = [{**row, "starts": row["starts"] or []} for row in batch.to_pylist()]
        out = {"wav": np.array([r["wav"] for r in rows], object), "png": np.array([r["png"] for r in rows], object),
               "image": np.empty(len(rows), object), "audio": np.empty(len(rows), object),
               "made_on": np.array([self.made_on] * len(rows), object)}
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            key = (row["kind"], row["frames"], row["strength"], len(row["starts"]), row["genre"], row["encoding"])
            groups.setdefault(key, []).append(i)
        mel = self.codec.config
        for members in groups.values():
            group = [rows[i] for i in members]
            kind, window = group[0]["kind"], mel.x_res
            if kind not in ("interpolation", "long", "continuation") and group[0]["starts"]:
                images = self._images(group).cpu()  # remixed slice by slice, in batches of their own
            else:
                width = window if kind in ("long", "continuation") else group[0]["frames"]
                images = self._in_batches(len(group), width, lambda start, stop: self._images(group[start:stop]))
            audio = self.codec.images_to_audio(images).cpu().numpy()
            for i, image, clip in zip(members, images.numpy(), audio):
                out["image"][i], out["audio"][i] = image, clip[:round(rows[i]["seconds"] * mel.sample_rate)]
        progress.count(self.counter, len(rows))
        return out

    def _in_batches(self, count: int, width: int, denoise) -> torch.Tensor:
        """`denoise(start, stop)`'s images of items [start, stop) of `count`, `width` frames wide, batch by batch
        (clips_per_batch), on the CPU. A batch that runs out of accelerator memory is halved and tried again
        (each try draws its clips' noise afresh from their seeds), and later batches of that width stay halved."""
        if width not in self.batch_sizes:
            memory = clip_bytes(self.unet, self.vqvae, self.codec.config.y_res, width, self.config.precision)
            if self.config.guidance != 1.0 and self.conditioning is not None:
                memory *= 2  # classifier-free guidance denoises each clip twice in one batch
            self.batch_sizes[width] = clips_per_batch(self.config, self.codec.config.x_res, width, memory, self.budget)
        done, start = [], 0
        while start < count:
            stop = min(count, start + self.batch_sizes[width])
            try:
                with devices.autocast(self.device, self.config.precision):  # the denoising; the vocoder stays fp32
                    done.append(denoise(start, stop).cpu())
            except torch.OutOfMemoryError:
                if stop - start == 1:
                    raise AudiodiffError(f"{self.config.model}: one clip {width} frames wide does not fit in the "
                                         f"memory of {devices.device_name(self.device)}; make narrower clips "
                                         "(--extend-factor) or use a GPU with more memory") from None
                self.batch_sizes[width] = (stop - start) // 2
                log.warning("a batch of %d clips %d frames wide ran out of accelerator memory; trying %d at a time",
                            stop - start, width, self.batch_sizes[width])
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start = stop
        return torch.cat(done)

    def _images(self, rows: list[dict]) -> torch.Tensor:
        """uint8 [len(rows), y_res, frames] for clips of one kind, width and strength."""
        kind, frames = rows[0]["kind"], rows[0]["frames"]
        generators = sampling.generators([row["seed"] for row in rows], self.device)
        height, window, steps = self.codec.config.y_res, self.codec.config.x_res, self.config.num_steps
        options = self._options(rows[0])
        if kind == "interpolation":
            return self._interpolated(rows, generators, options)
        if kind in ("long", "continuation"):
            first = _decode([row["starts"][0] for row in rows]) if kind == "continuation" else None
            return sampling.continue_images(self.unet, self.scheduler, generators, height, window, frames,
                                            self.overlap, steps, edge=self.codec.config.edge_frames, first=first,
                                            **options)
        if not rows[0]["starts"]:
            return sampling.sample(self.unet, self.scheduler, generators, height, frames, steps, **options)
        return self._remixed(rows, options)

    def _options(self, row: dict) -> dict:
        """The sampler's options for a row's clips: eta, a latent model's autoencoder, and what the clips are
        conditioned on (a genre model without a genre gets its null vector: unconditioned clips)."""
        options = {"eta": self.config.eta, "vqvae": self.vqvae}
        if row["encoding"] is not None:
            options["encoding"] = self.encodings[row["encoding"]]
        elif self.conditioning is not None:
            options["encoding"] = self.conditioning.encoding(row["genre"])
            if row["genre"] is not None and self.config.guidance != 1.0:
                options |= {"null_encoding": self.conditioning.encoding(None), "guidance": self.config.guidance}
        return options

    def _remixed(self, rows: list[dict], options: dict) -> torch.Tensor:
        """Every slice of every row from its input, `batch_size` slices at a time; each row's slices joined."""
        inputs = _decode([png for row in rows for png in row["starts"]])
        owner = [i for i, row in enumerate(rows) for _ in row["starts"]]
        mel = self.codec.config
        keep = torch.zeros(len(owner), mel.x_res, dtype=torch.bool)
        for j, i in enumerate(owner):
            keep[j, :mel.frames_in(rows[i]["keep_start"] or 0)] = True
            keep[j, mel.x_res - mel.frames_in(rows[i]["keep_end"] or 0):] = True
        outputs = inputs.clone()
        audible = (~is_silent(inputs)).nonzero().flatten()

        def denoise(start: int, stop: int) -> torch.Tensor:
            chunk = audible[start:stop]
            generators = sampling.generators([rows[owner[j]]["seed"] for j in chunk.tolist()], self.device)
            return sampling.sample(
                self.unet, self.scheduler, generators, mel.y_res, mel.x_res, self.config.num_steps,
                start=inputs[chunk], strength=rows[0]["strength"], keep=keep[chunk] if keep[chunk].any() else None,
                **options)

        if len(audible):
            outputs[audible] = self._in_batches(len(audible), mel.x_res, denoise)
        return torch.stack([torch.cat(list(slices), dim=-1) for slices in outputs.split(len(rows[0]["starts"]))])

    def _interpolated(self, rows: list[dict], generators: list[torch.Generator], options: dict) -> torch.Tensor:
        # the inversion runs the unclipped DDIM update backwards, so sampling from its noise must not clip either
        scheduler = type(self.scheduler).from_config(self.scheduler.config, clip_sample=False)
        pngs = list(dict.fromkeys(png for row in rows for png in row["starts"]))
        noise = sampling.invert(self.unet, scheduler, _decode(pngs), self.config.num_steps,
                                encoding=options.get("encoding"), vqvae=self.vqvae)
        start = {png: noise[i] for i, png in enumerate(pngs)}
        mixed = torch.stack([sampling.slerp(start[row["starts"][0]], start[row["starts"][1]], row["position"])
                             for row in rows])
        mel = self.codec.config
        return sampling.sample(self.unet, scheduler, generators, mel.y_res, rows[0]["frames"], self.config.num_steps,
                               noise=mixed, **options)


def _decode(pngs: list[bytes]) -> torch.Tensor:
    return torch.from_numpy(np.stack([png_image(png) for png in pngs]))


def check_output(config: ClipSettings, command: str) -> None:
    """The output must be new, empty or an earlier output of `command` (ownership), one every node writes to, and
    clips already under it must come from the same settings; the first write also proves the output is writable
    before any work starts."""
    path = storage.join(config.output, SETTINGS)
    previous = ownership.read_record(path) if storage.exists(path) else None
    if previous is None:
        found = ownership.names_in(config.output)
        if found:
            raise ownership.refusal(config.output, command, found)
    elif previous[ownership.WRITTEN_BY] != ownership.mark(command):
        raise AudiodiffError(f"{config.output}: holds the output of `{previous[ownership.WRITTEN_BY]}`; "
                             f"`audiodiff {command}` replaces only its own output: choose another --output")
    else:
        ours = {MANIFEST: lambda uri: ownership.is_our_parquet(uri, MANIFEST_SCHEMA), GALLERY: ownership.is_our_gallery}
        uris = {name: storage.join(config.output, name) for name in ours}
        foreign = [name for name, check in ours.items() if storage.exists(uris[name]) and not check(uris[name])]
        if foreign:
            raise ownership.refusal(config.output, command, foreign)
    check_paths_reachable(config.shared_path, config.output, [config.model, *getattr(config, "sources", [])])
    # the model by its files, not its name
    settings = {ownership.WRITTEN_BY: ownership.mark(command), **config.settings(),
                "weights": model_identity(config.model)}
    if previous is not None:
        previous.pop("made_on", None)  # the devices of earlier runs (record_devices) may differ
        if previous != settings:
            changed = sorted(k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k))
            raise AudiodiffError(f"{config.output}: holds clips made with other settings ({', '.join(changed)} "
                                 "differ); choose another --output")
    else:
        storage.write_bytes(path, (json.dumps(settings, indent=2) + "\n").encode())


def record_devices(output: str, made_on: set[str]) -> None:
    """Adds to generation.json's `made_on` the device records (device_record, as JSON) of a run's actors."""
    path = storage.join(output, SETTINGS)
    settings = json.loads(storage.read_bytes(path))
    known = {json.dumps(record, sort_keys=True) for record in settings.get("made_on", [])}
    settings["made_on"] = [json.loads(record) for record in sorted(known | made_on)]
    storage.write_bytes(path, (json.dumps(settings, indent=2) + "\n").encode())


def make_clips(config: ClipSettings, plan: list[dict], work: ray.data.Dataset, title: str,
               overlap: float | None = None) -> dict:
    """Make the planned clips not yet under the output from `work` (the plan's rows with their `starts`, as
    WORK_SCHEMA), then write the manifest and gallery of the whole plan. Returns counts for a summary."""
    if config.training:  # a --training that cannot be checked against stops the run before any clip is made
        check_paths_reachable(config.shared_path, inputs=[config.training])
        mel = memorisation.check_same_mel(config.training, load_mel_config(config.model), config.model)
    output = storage.absolute(config.output)
    done = finished_clips(config.output)
    todo = [row for row in plan if row["clip_id"] not in done]
    if todo:
        if done:
            work = work.filter(expr=col("clip_id").not_in(sorted(done)), num_cpus=LIGHT_CPUS)
        threads = None if config.gpu else cpu_threads(config.concurrency)
        sink = ClipSink(output, load_mel_config(config.model).sample_rate, config.target_dbfs)
        with worker_errors(), progress.Progress(config.command, len(todo), "clips", workers=True) as made:
            work.map_batches(
                ClipMaker, fn_constructor_args=(config, overlap, threads, made.counter),
                batch_size=config.rows_per_batch,
                batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=config.concurrency),
                num_gpus=config.gpus_per_actor if config.gpu else 0, num_cpus=1 if config.gpu else ACTOR_CPUS,
            ).write_datasink(sink, ray_remote_args={"num_cpus": LIGHT_CPUS})
        record_devices(config.output, sink.made_on)
    finished = finished_clips(config.output)
    missing = [row["clip_id"] for row in plan if row["clip_id"] not in finished]
    if missing:
        raise AudiodiffError(f"{config.output}: {len(missing)} clips were not written ({', '.join(missing[:5])}...)")
    checked = {}
    if config.training:
        plan, checked = memorisation.mark_copies(config.output, plan, config.training, mel)
    index = write_manifest_and_gallery(config.output, plan, title)
    return {"command": config.command, "planned": len(plan), "written": len(todo), "skipped": len(plan) - len(todo),
            "index": index, **({"memorisation": checked} if checked else {})}


def work_dataset(rows: list[dict], config: ClipSettings) -> ray.data.Dataset:
    """Planned clips held by the driver (with their `starts`) as a dataset, widest last so that batches
    mostly hold clips of one width; in blocks of whole batches, a few per actor, so that every actor gets work
    (one block would go to one actor) without a Ray task per batch."""
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["frames"]), schema=WORK_SCHEMA)
    batches = -(-table.num_rows // config.rows_per_batch)
    size = config.rows_per_batch * max(1, -(-batches // (4 * config.concurrency)))
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)] or [table])


def summary_line(result: dict) -> str:
    rejected = f", {result['rejected']} inputs rejected (rejects.parquet)" if result.get("rejected") else ""
    copies = f"\n  {memorisation.summary(result['memorisation'])} (copy_of)" if "memorisation" in result else ""
    return (f"{result['command']}: {result['written']} clips written, {result['skipped']} already there{rejected}, "
            f"{result['planned']} in the manifest -> {result['index']}{copies}")
