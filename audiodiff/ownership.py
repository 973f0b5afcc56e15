"""The deletion rule (DESIGN.md, "Safety of outputs and inputs"): a command removes or replaces only what it, or an
earlier run of the same command, wrote, recognised by a mark it put inside its files, never by a file's name.

The marks: a JSON record names its command (`"written_by": "audiodiff generate"`); a parquet file carries
`written_by: audiodiff` in its schema's metadata (its columns tell which file it is); a gallery page carries
GALLERY_MARK in its head. Folders are walked without following symbolic links: a link is never ours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from audiodiff import storage
from audiodiff.errors import AudiodiffError

WRITTEN_BY = "written_by"
SCHEMA_MARK = {WRITTEN_BY: "audiodiff"}  # the metadata of every parquet schema audiodiff writes
GALLERY_MARK = '<meta name="generator" content="audiodiff">'


def mark(command: str) -> str:
    """What a command's JSON records hold under WRITTEN_BY."""
    return f"audiodiff {command}"


def read_record(uri: str) -> dict | None:
    """A JSON record audiodiff wrote (a dict with WRITTEN_BY), or None for any other file."""
    if is_link(uri):
        return None
    try:
        record = json.loads(storage.read_bytes(uri))
    except (ValueError, AudiodiffError):  # not JSON, not UTF-8, or unreadable
        return None
    return record if isinstance(record, dict) and str(record.get(WRITTEN_BY, "")).startswith("audiodiff ") else None


def is_our_parquet(uri: str, schema: pa.Schema) -> bool:
    """A parquet file audiodiff wrote with `schema`, told by its footer."""
    if is_link(uri):
        return False
    fs, path = storage.resolve(uri)
    try:
        found = pq.read_schema(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid):
        return False
    return (found.metadata or {}).get(WRITTEN_BY.encode()) == SCHEMA_MARK[WRITTEN_BY].encode() and \
        found.names == schema.names


def is_our_gallery(uri: str) -> bool:
    if is_link(uri):
        return False
    try:
        return GALLERY_MARK.encode() in storage.read_bytes(uri)[:1024]
    except AudiodiffError:
        return False


def is_link(uri: str) -> bool:
    fs, path = storage.resolve(uri)
    return isinstance(fs, pafs.LocalFileSystem) and os.path.islink(path)


def files_under(uri: str) -> tuple[list[str], list[str]]:
    """(files, links) under the folder `uri`, as '/'-separated paths relative to it; links (to files or folders)
    are listed, never entered. Nothing when `uri` does not exist."""
    if not storage.exists(uri):
        return [], []
    if not storage.is_dir(uri):
        raise AudiodiffError(f"{uri}: a file, not a folder; give a folder for --output")
    fs, root = storage.resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        return [f[len(uri.rstrip("/")) + 1:] for f in storage.list_files(uri)], []
    files, links = [], []
    for folder, subfolders, names in os.walk(root):  # os.walk enters no linked folder, but lists it
        relative = os.path.relpath(folder, root).replace(os.sep, "/")
        for name in subfolders + names:
            path = name if relative == "." else f"{relative}/{name}"
            if os.path.islink(os.path.join(folder, name)):
                links.append(path)
            elif name in names:
                files.append(path)
    return sorted(files), sorted(links)


def names_in(uri: str) -> list[str]:
    """What the folder `uri` holds at its top (files and folders), without listing deeper; nothing when it does
    not exist."""
    if not storage.exists(uri):
        return []
    if not storage.is_dir(uri):
        raise AudiodiffError(f"{uri}: a file, not a folder; give a folder for --output")
    fs, root = storage.resolve(uri)
    try:
        return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(root)))
    except OSError as e:
        raise AudiodiffError(f"{uri}: cannot list ({e})") from None


def refusal(output: str, command: str, found: list[str]) -> AudiodiffError:
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return AudiodiffError(f"{output}: holds what `audiodiff {command}` did not write ({shown}); it replaces only its "
                          "own output: choose a new or empty --output, or move those away")


def check_only_ours(output: str, command: str, is_ours: Callable[[str], bool]) -> list[str]:
    """The files under `output` (relative paths), every one recognised by `is_ours`; otherwise refuses, naming the
    folder and what else it holds (symbolic links included)."""
    files, links = files_under(output)
    foreign = [f"{link} (a symbolic link)" for link in links] + [f for f in files if not is_ours(f)]
    if foreign:
        raise refusal(output, command, foreign)
    return files


def within(inner: str, outer: str) -> bool:
    """Whether the URI `inner` is `outer` or lies under it (local paths compared with their links resolved)."""
    def key(uri: str) -> str:
        fs, path = storage.resolve(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            return "file:" + os.path.realpath(path).rstrip(os.sep) + os.sep
        return f"{type(fs).__name__}:{path.rstrip('/')}/"
    return key(inner).startswith(key(outer))


def check_apart(sources: list[str], output: str) -> None:
    """Refuses a source under the output (its files could be replaced, or read back as input) and an output inside a
    source (a re-run would read its own output)."""
    for source in sources:
        if source.startswith("hf://") or storage.is_hub_id(source):
            continue
        if within(source, output):
            raise AudiodiffError(f"{source}: lies inside --output {output}; write the output somewhere else")
        if within(output, source):
            raise AudiodiffError(f"--output {output}: lies inside the source {source}; write it somewhere else")
