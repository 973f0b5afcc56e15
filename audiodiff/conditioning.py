"""What a conditional model's clips are conditioned on, for every clip-making command: the genres of a model
trained with `finetune --condition genre` (its `conditioning/` folder), or named encodings from a file for
any `UNet2DConditionModel` (teticio's conditional models take 100-dim encodings of audio).

An encodings file is parquet, with a `name` (string) and an `encoding` (list of floats) column, or
safetensors, one tensor of [dim] (or [1, dim], [1, 1, dim]) per name; never a pickle. Each planned clip
(except the inputs, which are rendered as they are) is made once per genre or encoding name, with the same
seed, so the clips of one seed differ only in what they were conditioned on; the name goes in the
manifest's `genre` or `encoding` column and the clip id ends with it.
"""

from __future__ import annotations

import io
import re

import pyarrow.parquet as pq
import torch

from audiodiff import storage
from audiodiff.errors import AudiodiffError
from audiodiff.models import PipelineParts
from audiodiff.outputs import clip_files


def read_encodings(uri: str) -> dict[str, torch.Tensor]:
    """name -> float32 [1, 1, dim] from a parquet or safetensors file."""
    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(data)
        except SafetensorError as e:
            raise AudiodiffError(f"{uri}: not a safetensors file ({e})") from None
        bad = [name for name, t in tensors.items() if t.numel() != t.shape[-1] or not t.is_floating_point()]
        if bad:
            raise AudiodiffError(f"{uri}: {', '.join(bad[:3])} not a vector of floats; each tensor must be one "
                                 "encoding of shape [dim], [1, dim] or [1, 1, dim]")
        encodings = {name: t.float().reshape(1, 1, -1) for name, t in tensors.items()}
    elif uri.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as e:  # pyarrow raises several types for bytes that are not parquet
            raise AudiodiffError(f"{uri}: not a parquet file ({e})") from None
        if not {"name", "encoding"} <= set(table.column_names):
            raise AudiodiffError(f"{uri}: needs a `name` and an `encoding` column; it has "
                                 f"{', '.join(table.column_names)}")
        names, vectors = table["name"].to_pylist(), table["encoding"].to_pylist()
        if any(v is None for v in vectors) or len({len(v) for v in vectors}) > 1:
            raise AudiodiffError(f"{uri}: every `encoding` must be a list of floats of one length")
        encodings = {str(n): torch.tensor(v, dtype=torch.float32).reshape(1, 1, -1) for n, v in zip(names, vectors)}
    else:
        raise AudiodiffError(f"{uri}: encodings are read from .parquet or .safetensors files (never a pickle)")
    if not encodings:
        raise AudiodiffError(f"{uri}: holds no encodings")
    return encodings


def check_conditioning(parts: PipelineParts, model: str, genres: list[str], encodings: str | None,
                       guidance: float) -> None:
    """What the model takes must match what the command gives, checked before any work starts."""
    dim = parts.cross_attention_dim
    if dim is None and (genres or encodings):
        raise AudiodiffError(f"{model}: an unconditional model (UNet2DModel) takes no --genre or --encodings")
    if genres:
        if parts.conditioning is None:
            raise AudiodiffError(f"{model}: has no genres (no conditioning/ folder); --genre needs a model "
                                 "fine-tuned with --condition genre, or give --encodings")
        for genre in genres:
            parts.conditioning.encoding(genre)  # an unknown genre is refused, naming the known ones
    if encodings:
        for name, vector in read_encodings(encodings).items():
            if vector.shape[-1] != dim:
                raise AudiodiffError(f"{encodings}: encoding '{name}' has {vector.shape[-1]} values but {model}'s "
                                     f"UNet takes encodings of cross_attention_dim {dim}")
    if dim is not None and not genres and not encodings and parts.conditioning is None:
        raise AudiodiffError(f"{model}: a conditional model (UNet2DConditionModel, encodings of {dim} values): "
                             "give --encodings FILE")
    if guidance != 1.0 and parts.conditioning is None:
        raise AudiodiffError(f"--guidance needs a model with a null encoding (fine-tuned with --condition genre); "
                             f"{model} has none")


def condition_names(genres: list[str], encodings: str | None) -> tuple[str | None, list[str]]:
    """The manifest column the conditions go in, and their names (none: unconditioned)."""
    column, names = ("genre", list(genres)) if genres else ("encoding", list(read_encodings(encodings))) \
        if encodings else (None, [])
    slugs = [_slug(n) for n in names]
    if len(set(slugs)) != len(slugs):
        raise AudiodiffError(f"the names {', '.join(names)} do not make distinct clip ids; rename them")
    return column, names


def conditioned(rows: list[dict], column: str | None, names: list[str]) -> list[dict]:
    """Each planned clip once per condition (inputs once, as they are), the name in `column` and the clip id."""
    if column is None:
        return rows
    out = []
    for row in rows:
        if row["kind"] == "input":
            out.append(row)
            continue
        for name in names:
            clip_id = f"{row['clip_id']}-{_slug(name)}"
            out.append({**row, column: name, "clip_id": clip_id, **clip_files(clip_id)})
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:40] or "_"
