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

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.expressions import col

from audiodiff import devices, sampling, storage
from audiodiff.conditioning import read_encodings
from audiodiff.encode import png_image
from audiodiff.errors import AudiodiffError
from audiodiff.mel import MelCodec, is_silent
from audiodiff.models import load_model, model_identity
from audiodiff.outputs import MANIFEST_SCHEMA, PEAK_DBFS, ClipSink, encode_clip, finished_clips, \
    write_manifest_and_gallery
from audiodiff.runtime import ACTOR_CPUS, LIGHT_CPUS, check_output_reachable, require_gpus, worker_errors

WORK_SCHEMA = MANIFEST_SCHEMA.append(pa.field("starts", pa.list_(pa.binary())))


@dataclasses.dataclass
class ClipSettings:
    """What every clip-making command shares: the model, the sampler, the output and how work is spread."""

    model: str
    output: str
    scheduler: str = "ddpm"
    steps: int | None = None
    karras: bool = False  # Karras sigmas, for the schedulers that take them
    eta: float = 0.0
    seed: int = 0
    batch_size: int = 4
    concurrency: int = 1
    gpu: bool = False
    precision: str = "auto"  # fp32, bf16 or fp16; auto is resolved here, on the driver (audiodiff.devices)
    target_dbfs: float = PEAK_DBFS
    shared_path: bool = False  # a local output that every node of a multi-node cluster mounts
    genres: list[str] = dataclasses.field(default_factory=list)  # each clip once per genre (audiodiff.conditioning)
    encodings: str | None = None  # or once per encoding in this file
    guidance: float = 1.0  # classifier-free guidance scale (1: none)

    def __post_init__(self):
        self.precision = devices.resolve_precision(self.precision, self.gpu)

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

    def check(self) -> None:
        """The checks that need no model and no data, made before any work starts."""
        sampling.check_scheduler(self.scheduler, self.karras)
        devices.check_precision(self.precision, self.gpu)
        if self.batch_size < 1 or self.concurrency < 1:
            raise AudiodiffError("--batch-size and --concurrency must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise AudiodiffError(f"--steps must be at least 1, got {self.steps}")
        if self.gpu:
            require_gpus(self.concurrency, f"--gpu with --concurrency {self.concurrency}")


def clip_seed(*keys: int) -> int:
    """A clip's seed from the run's seed and what tells the clip apart (its kind, index, variation ...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


class ClipMaker:
    """Per actor: the model, scheduler and codec on its device; per batch: planned clips (WORK_SCHEMA) denoised
    together where they share kind, width and strength, turned into audio together, and encoded for the
    writer to store. `overlap`: seconds each window of a long clip keeps from the one before."""

    def __init__(self, config: ClipSettings, overlap: float | None = None):
        self.config = config
        self.device = torch.device("cuda" if config.gpu else "cpu")
        devices.use_cpus_given()
        parts = load_model(config.model)
        self.unet = devices.for_inference(parts.unet, self.device, config.precision)
        self.vqvae = parts.vqvae.to(self.device).eval() if parts.vqvae is not None else None
        self.conditioning = parts.conditioning
        self.encodings = read_encodings(config.encodings) if config.encodings else {}
        self.scheduler = sampling.make_scheduler(config.scheduler, parts.scheduler.config, config.karras)
        self.codec = MelCodec(parts.mel, device=self.device)
        self.overlap = parts.mel.frames_in(overlap) if overlap is not None else None

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = [{**row, "starts": row["starts"] or []} for row in batch.to_pylist()]
        out = {"wav": np.array([r["wav"] for r in rows], object), "png": np.array([r["png"] for r in rows], object),
               "wav_bytes": np.empty(len(rows), object), "png_bytes": np.empty(len(rows), object)}
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            key = (row["kind"], row["frames"], row["strength"], len(row["starts"]), row["genre"], row["encoding"])
            groups.setdefault(key, []).append(i)
        mel = self.codec.config
        for members in groups.values():
            with devices.autocast(self.device, self.config.precision):  # the denoising; the vocoder stays fp32
                images = self._images([rows[i] for i in members])
            audio = self.codec.images_to_audio(images).cpu().numpy()
            for i, image, clip in zip(members, images.cpu().numpy(), audio):
                clip = clip[:round(rows[i]["seconds"] * mel.sample_rate)]
                out["wav_bytes"][i], out["png_bytes"][i] = encode_clip(image, clip, mel.sample_rate,
                                                                       self.config.target_dbfs)
        return out

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
        for chunk in audible.split(self.config.batch_size):
            generators = sampling.generators([rows[owner[j]]["seed"] for j in chunk.tolist()], self.device)
            outputs[chunk] = sampling.sample(
                self.unet, self.scheduler, generators, mel.y_res, mel.x_res, self.config.num_steps,
                start=inputs[chunk], strength=rows[0]["strength"], keep=keep[chunk] if keep[chunk].any() else None,
                **options).cpu()
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


def check_output(config: ClipSettings) -> None:
    """The output must be one every node writes to, and clips already under it must come from the same
    settings; the first write also proves the output is writable before any work starts."""
    check_output_reachable(config.output, config.shared_path)
    path = storage.join(config.output, "generation.json")
    settings = {**config.settings(), "weights": model_identity(config.model)}  # the model by its files, not its name
    if storage.exists(path):
        previous = json.loads(storage.read_bytes(path))
        if previous != settings:
            changed = sorted(k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k))
            raise AudiodiffError(f"{config.output}: holds clips made with other settings ({', '.join(changed)} "
                                 "differ); choose another --output")
    else:
        storage.write_bytes(path, (json.dumps(settings, indent=2) + "\n").encode())


def make_clips(config: ClipSettings, plan: list[dict], work: ray.data.Dataset, title: str,
               overlap: float | None = None) -> dict:
    """Make the planned clips not yet under the output from `work` (the plan's rows with their `starts`, as
    WORK_SCHEMA), then write the manifest and gallery of the whole plan. Returns counts for a summary."""
    output = storage.absolute(config.output)
    done = finished_clips(config.output)
    todo = [row for row in plan if row["clip_id"] not in done]
    if todo:
        if done:
            work = work.filter(expr=col("clip_id").not_in(sorted(done)), num_cpus=LIGHT_CPUS)
        with worker_errors():
            work.map_batches(
                ClipMaker, fn_constructor_args=(config, overlap), batch_size=config.batch_size,
                batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=config.concurrency),
                num_gpus=1 if config.gpu else 0, num_cpus=1 if config.gpu else ACTOR_CPUS,
            ).write_datasink(ClipSink(output), ray_remote_args={"num_cpus": LIGHT_CPUS})
    finished = finished_clips(config.output)
    missing = [row["clip_id"] for row in plan if row["clip_id"] not in finished]
    if missing:
        raise AudiodiffError(f"{config.output}: {len(missing)} clips were not written ({', '.join(missing[:5])}...)")
    index = write_manifest_and_gallery(config.output, plan, title)
    return {"planned": len(plan), "written": len(todo), "skipped": len(plan) - len(todo), "index": index}


def work_dataset(rows: list[dict], config: ClipSettings) -> ray.data.Dataset:
    """Planned clips held by the driver (with their `starts`) as a dataset, widest last so that batches
    mostly hold clips of one width; in blocks of whole batches, a few per actor, so that every actor gets work
    (one block would go to one actor) without a Ray task per batch."""
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["frames"]), schema=WORK_SCHEMA)
    batches = -(-table.num_rows // config.batch_size)
    size = config.batch_size * max(1, -(-batches // (4 * config.concurrency)))
    return ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)] or [table])


def summary_line(stage: str, result: dict) -> str:
    rejected = f", {result['rejected']} inputs rejected (rejects.parquet)" if result.get("rejected") else ""
    return (f"{stage}: {result['written']} clips written, {result['skipped']} already there{rejected}, "
            f"{result['planned']} in the manifest -> {result['index']}")
