"""Audio-to-audio: `remix` (variations of every slice of the input tracks, or of whole tracks), `continue`
(each input track continued into a long one) and `interpolate` (clips between two inputs, through their
DDIM-inverted noise).

Inputs are anything preprocess reads, decoded, resampled and sliced by preprocess's own path on CPU actors;
a track that is not usable audio goes to `rejects.parquet` with its reason and the run carries on. Each
input slice is also rendered as a clip (kind "input", by the vocoder its outputs go through) for the gallery
to play beside them. The clips are made by audiodiff.clips; the output is generate's, with the
audio-to-audio manifest columns (DESIGN.md, "Audio-to-audio and long-form output").
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import zlib

import numpy as np
import pyarrow as pa
import ray

from audiodiff import checks, ownership, sampling, storage
from audiodiff.clips import (WORK_SCHEMA, ClipSettings, check_long_form, check_output, clip_seed, default_overlap,
                             make_clips, work_dataset)
from audiodiff.conditioning import check_conditioning, condition_names, conditioned
from audiodiff.dataset import write_rejects
from audiodiff.encode import png_bytes
from audiodiff.errors import AudiodiffError
from audiodiff.mel import SILENT, MelConfig
from audiodiff.models import PipelineParts, load_model
from audiodiff.outputs import clip_row
from audiodiff.preprocess import make_spectrograms
from audiodiff.runtime import LIGHT_CPUS, worker_errors
from audiodiff.sources import TrackSettings, open_source

@dataclasses.dataclass
class RemixConfig(ClipSettings):
    command = "remix"
    sources: list[str] = dataclasses.field(default_factory=list)
    scheduler: str = sampling.INPUT_SAMPLER
    strength: float = 0.5
    variations: int = 1
    keep_start: float = 0.0  # seconds of each input slice kept as they are, at its start ...
    keep_end: float = 0.0  # ... and at its end
    whole_track: bool = False  # join each track's remixed slices back into one clip

    def __post_init__(self):
        super().__post_init__()
        _check_sources(self)
        if not 0.0 <= self.strength <= 1.0:
            raise AudiodiffError(f"--strength must lie in [0, 1] (0: the input as it is, 1: ignore it), got "
                                 f"{self.strength}")
        checks.at_least(self, 1, "variations")
        checks.at_least(self, 0, "keep_start", "keep_end")

    def settings(self) -> dict:
        return {**super().settings(), "strength": self.strength, "keep_start": self.keep_start,
                "keep_end": self.keep_end, "whole_track": self.whole_track}


@dataclasses.dataclass
class ContinueConfig(ClipSettings):
    command = "continue"
    sources: list[str] = dataclasses.field(default_factory=list)
    scheduler: str = sampling.INPUT_SAMPLER
    seconds: float | None = None
    overlap: float | None = None  # seconds each window keeps from the one before (clips.default_overlap)

    def __post_init__(self):
        super().__post_init__()
        _check_sources(self)
        if self.seconds is None:
            raise AudiodiffError("give --seconds: how long each continued track is")
        checks.positive(self, "seconds", "overlap")

    def settings(self) -> dict:
        return {**super().settings(), "seconds": self.seconds, "overlap": self.overlap}


@dataclasses.dataclass
class InterpolateConfig(ClipSettings):
    command = "interpolate"
    sources: list[str] = dataclasses.field(default_factory=list)  # the two clips, A and B
    scheduler: str = sampling.INVERTING_SAMPLER
    points: int = 5  # clips from A to B, both ends included
    # DDIM inversion then sampling magnifies bf16's rounding: an untrained tiny model's ends moved by up to 214
    # grey levels under bf16 autocast against fp32's, so interpolation computes in fp32 unless told otherwise
    precision: str = "fp32"

    def __post_init__(self):
        super().__post_init__()
        if len(self.sources) != 2:
            raise AudiodiffError(f"interpolate takes two clips, A and B; got {len(self.sources)}")
        if self.scheduler != sampling.INVERTING_SAMPLER:
            raise AudiodiffError(f"--scheduler {self.scheduler}: interpolate inverts the clips with "
                                 f"{sampling.INVERTING_SAMPLER}, which samples from the inverted noise too; use "
                                 f"--scheduler {sampling.INVERTING_SAMPLER}")
        checks.at_least(self, 2, "points")

    def settings(self) -> dict:
        return {**super().settings(), "points": self.points}


def _check_sources(config: ClipSettings) -> None:
    if not config.sources:
        raise AudiodiffError("give at least one SOURCE")


def _input_row(name: str, source: str, slice_index: int | None, frames: int, config: ClipSettings,
               mel: MelConfig) -> dict:
    """The clip of an input as it is (strength 0), rendered for the gallery to play beside its outputs."""
    return clip_row(f"{name}-input", 0, "input", frames, mel, config.scheduler_label, config.num_steps, config.model,
                    strength=0.0, source=source, slice=slice_index)


def track_id(source: str) -> str:
    """A name for a track's clips: its file name, made safe, and a hash of the whole source."""
    stem = posixpath.splitext(posixpath.basename(source.replace("\\", "/").split("#")[0]))[0]
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '_', stem)[:40]}-{zlib.crc32(source.encode()):08x}"


# remix


def check_remix(config: RemixConfig, mel: MelConfig) -> None:
    """What the remix settings leave of the model's window."""
    window = mel.samples_for_width(mel.x_res) / mel.sample_rate
    if mel.frames_in(config.keep_start) + mel.frames_in(config.keep_end) >= mel.x_res:
        raise AudiodiffError(f"--keep-start {config.keep_start:g} s and --keep-end {config.keep_end:g} s cover or "
                             f"overlap the whole slice ({window:.2f} s): nothing would be left to remix")


def _remix_rows(track: dict, config: RemixConfig, mel: MelConfig) -> list[dict]:
    """A track's clips: per slice (or for the whole track) its input and `variations` remixes. With the
    track's PNGs (`pngs`) each row carries its `starts`; without, the rows are the plan only."""
    pngs = dict(zip(track["slices"], track["pngs"])) if "pngs" in track else None
    if config.whole_track:
        count = len(track["slices"]) + track["silent"]
        white = png_bytes(np.full((mel.y_res, mel.x_res), SILENT, np.uint8))
        units = [(None, f"{track_id(track['source'])}-whole", range(count))]
    else:
        units = [(s, f"{track_id(track['source'])}-{s:05d}", [s]) for s in track["slices"]]
    rows = []
    for slice_index, name, slices in units:
        starts = {"starts": [pngs.get(s, white) if config.whole_track else pngs[s] for s in slices]} if pngs else {}
        frames = mel.x_res * len(slices)
        common = {"source": track["source"], "slice": slice_index}
        source = _input_row(name, track["source"], slice_index, frames, config, mel)
        rows.append({**source, **starts})
        for k in range(config.variations):
            rows.append({**clip_row(f"{name}-v{k:02d}", clip_seed(config.seed, k), "remix", frames, mel,
                                    config.scheduler_label, config.num_steps, config.model, strength=config.strength,
                                    keep_start=config.keep_start, keep_end=config.keep_end,
                                    input_wav=source["wav"], input_png=source["png"], **common), **starts})
    return rows


def run_remix(config: RemixConfig) -> dict:
    parts = _start(config)
    check_remix(config, parts.mel)
    check_output(config, "remix")
    return _run(config, parts, lambda track: _remix_rows(track, config, parts.mel),
                f"audiodiff remix: {', '.join(config.sources)} at strength {config.strength:g}")


# continue


def _continue_rows(track: dict, config: ContinueConfig, mel: MelConfig) -> list[dict]:
    """A track's last audible slice, as its input, and the long clip that continues it."""
    starts = {"starts": [track["pngs"][-1]]} if "pngs" in track else {}
    name, common = track_id(track["source"]), {"source": track["source"], "slice": track["slices"][-1]}
    source = _input_row(name, track["source"], track["slices"][-1], mel.x_res, config, mel)
    continued = clip_row(f"{name}-continued", clip_seed(config.seed, zlib.crc32(track["source"].encode())),
                         "continuation", mel.width_for_seconds(config.seconds), mel, config.scheduler_label,
                         config.num_steps, config.model, seconds=config.seconds, input_wav=source["wav"],
                         input_png=source["png"], **common)
    return [{**source, **starts}, {**continued, **starts}]


def run_continue(config: ContinueConfig) -> dict:
    parts = _start(config)
    if config.overlap is None:
        config = dataclasses.replace(config, overlap=default_overlap(parts.mel))
    check_long_form(parts.mel, config.seconds, config.overlap)
    check_output(config, "continue")
    return _run(config, parts, lambda track: _continue_rows(track, config, parts.mel),
                f"audiodiff continue: {', '.join(config.sources)} to {config.seconds:g} s", overlap=config.overlap)


# interpolate


def run_interpolate(config: InterpolateConfig) -> dict:
    parts = _start(config)
    check_output(config, "interpolate")
    mel = parts.mel
    tracks = _spectrograms(config.sources, mel).take_all()
    ends = [_only_track(uri, tracks) for uri in config.sources]
    rows = []
    for track in ends:
        source = _input_row(track_id(track["source"]), track["source"], track["slices"][0], mel.x_res, config, mel)
        rows.append({**source, "starts": [track["pngs"][0]]})
    pair = [track["pngs"][0] for track in ends]
    for i in range(config.points):
        rows.append({**clip_row(f"interpolation-{i:03d}", clip_seed(config.seed, i), "interpolation", mel.x_res,
                                mel, config.scheduler_label, config.num_steps, config.model,
                                position=i / (config.points - 1)), "starts": pair})
    rows = conditioned(rows, *condition_names(config.genres, config.encodings))
    plan = [{k: v for k, v in row.items() if k != "starts"} for row in rows]
    return make_clips(config, plan, work_dataset(rows, config),
                      f"audiodiff interpolate: {config.sources[0]} to {config.sources[1]}")


def _only_track(uri: str, tracks: list[dict]) -> dict:
    """The one track read from `uri` (a file, or a folder holding one), with its first audible slice."""
    where = storage.absolute(uri)  # as preprocess names local sources
    mine = [t for t in tracks if t["source"] == where or t["source"].startswith(where.rstrip("/") + "/")]
    if len(mine) != 1:
        raise AudiodiffError(f"{uri}: interpolate takes one track per input, found {len(mine)}")
    if mine[0]["reason"]:
        raise AudiodiffError(f"{uri}: {mine[0]['reason']}")
    return mine[0]


# shared


def _start(config: ClipSettings) -> PipelineParts:
    """The checks that need the cluster or the model, and the model (one that cannot be loaded stops the run here)."""
    config.place()
    ownership.check_apart(config.sources, config.output)
    parts = load_model(config.model)
    check_conditioning(parts, config.model, config.genres, config.encodings, config.guidance)
    return parts


def _spectrograms(sources: list[str], mel: MelConfig) -> ray.data.Dataset:
    """The tracks of `sources`, decoded, resampled and sliced by preprocess's path (at its default settings);
    materialized, because the plan and the clips both read them."""
    settings = TrackSettings()
    opened = [open_source(uri, settings).dataset for uri in sources]
    tracks = opened[0].union(*opened[1:]) if len(opened) > 1 else opened[0]
    with worker_errors():
        return make_spectrograms(tracks, mel, settings).materialize()


def _run(config: ClipSettings, parts: PipelineParts, rows_of_track, title: str, overlap: float | None = None) -> dict:
    """Slice the sources, record the rejects, plan every usable track's clips and make them."""
    made = _spectrograms(config.sources, parts.mel)
    tracks = sorted(made.drop_columns(["pngs"]).take_all(), key=lambda t: t["source"])
    rejects = [{"source": t["source"], "reason": t["reason"]} for t in tracks if t["reason"]]
    write_rejects(config.output, rejects)
    conditions = condition_names(config.genres, config.encodings)
    plan = [row for track in tracks if not track["reason"] for row in conditioned(rows_of_track(track), *conditions)]

    def work(batch: pa.Table) -> pa.Table:
        rows = [row for track in batch.to_pylist() if not track["reason"]
                for row in conditioned(rows_of_track(track), *conditions)]
        return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)

    result = make_clips(config, plan, made.map_batches(work, batch_format="pyarrow", batch_size=1, num_cpus=LIGHT_CPUS), title, overlap)
    return {**result, "rejected": len(rejects)}
