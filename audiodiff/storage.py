"""URIs (plain paths, file://, s3://, gs://, hf://) -> pyarrow filesystems; whole-or-absent writes; listing.

S3 takes its credentials and region from the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, instance roles) and its endpoint from
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (e.g. http://127.0.0.1:9000 for MinIO or moto). GCS uses
Google's application default credentials. `hf://datasets/owner/name/...` reads the Hugging Face Hub through
`huggingface_hub.HfFileSystem` (HF_TOKEN for private repositories).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from audiodiff.errors import AudiodiffError

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("s3", "gs", "gcs", "hf")


def is_hub_id(name: str) -> bool:
    """`owner/name`, as the Hugging Face Hub names models and datasets (and no local path does)."""
    return bool(_HUB_ID.match(name)) and not name.startswith(".") and not os.path.exists(name)


def hub_filesystem() -> pafs.FileSystem:
    from huggingface_hub import HfFileSystem

    return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem()))


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return pafs.S3FileSystem()
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    return pafs.S3FileSystem(endpoint_override=parsed.netloc, scheme=parsed.scheme)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A URI -> (filesystem, path inside it). Plain paths are made absolute."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "hf":
        return hub_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise AudiodiffError(f"{uri}: unsupported storage scheme '{parsed.scheme}://'; use a path, file://, s3://, gs:// or hf://")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(uri: str) -> str:
    """The same URI, a plain path made absolute: Ray workers do not run in the driver's directory."""
    return uri if urlparse(uri).scheme and len(urlparse(uri).scheme) > 1 else os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    if is_remote(uri) or uri.startswith("file://"):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return _info(fs, path, uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return _info(fs, path, uri).type == pafs.FileType.Directory


# Where storage refuses the request itself: the credentials, or what they are allowed to do.
_REFUSED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN", "HTTP status 403",
            "Forbidden", "Unauthorized")


def _storage_error(uri: str, doing: str, e: OSError) -> AudiodiffError:
    hint = ("; check the credentials this machine gives (S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
            "or an instance role; GCS: application default credentials) and that they may use this bucket"
            if any(code in str(e) for code in _REFUSED) else "")
    return AudiodiffError(f"{uri}: {doing} ({e}){hint}")


def _info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise _storage_error(uri, "cannot reach storage", e) from None


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise AudiodiffError(f"{uri}: no such file") from None
    except OSError as e:
        raise _storage_error(uri, "cannot read", e) from None


def read_text(uri: str) -> str:
    """A UTF-8 text file (the JSON files audiodiff and diffusers write)."""
    try:
        return read_bytes(uri).decode()
    except UnicodeDecodeError as e:
        raise AudiodiffError(f"{uri}: not a UTF-8 text file ({e}); is it the file it is named for?") from None


def read_json(uri: str, fix: str = "") -> dict:
    """A JSON object file; `fix` says what to do about one that is damaged (it ends the message)."""
    try:
        values = json.loads(read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AudiodiffError(f"{uri}: not valid JSON ({e}){fix}") from None
    if not isinstance(values, dict):
        raise AudiodiffError(f"{uri}: expected a JSON object, got {type(values).__name__}{fix}")
    return values


@contextlib.contextmanager
def local_file(uri: str) -> Iterator[str]:
    """A local path to the file: the file itself, or for object storage a temporary copy, streamed to disk in
    pieces (a long track never sits in memory) and deleted afterwards. A storage error is raised here, naming
    the URI, not later in a decoder that would take a failed read for the end of the file."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.NamedTemporaryFile(suffix=posixpath.splitext(path)[1]) as copy:
        try:
            with fs.open_input_stream(path) as f:
                while piece := f.read(8 << 20):
                    copy.write(piece)
        except FileNotFoundError:
            raise AudiodiffError(f"{uri}: no such file") from None
        except OSError as e:
            raise _storage_error(uri, "cannot read", e) from None
        copy.flush()
        yield copy.name


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file whole or not at all: a temporary name then a rename locally, one upload on object
    storage (an object appears only once its upload completes)."""
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temporary = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(temporary, "wb") as f:
                    f.write(data)
                os.replace(temporary, path)
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as e:
        raise _storage_error(uri, "cannot write", e) from None


def write_if_changed(uri: str, data: bytes) -> None:
    """A re-run that changes nothing leaves the file (and its modification time) alone."""
    if not (exists(uri) and read_bytes(uri) == data):
        write_bytes(uri, data)


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.delete_file(path)
    except OSError as e:
        raise _storage_error(uri, "cannot delete", e) from None


def list_files(uri: str, extensions: tuple[str, ...] | None = None) -> list[str]:
    """Every file under `uri`, recursively, as URIs in the same form, sorted; optionally by extension."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        raise AudiodiffError(f"{uri}: no such directory") from None
    except OSError as e:
        raise _storage_error(uri, "cannot list", e) from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                   and (extensions is None or i.path.lower().endswith(extensions)))
    return [join(uri, *f[len(path):].lstrip("/").split("/")) for f in files]


def upload_dir(local_dir: str, uri: str, last: tuple[str, ...] = ()) -> None:
    """Copy a local folder's files to storage, each written whole; files named in `last` (relative paths)
    go after the rest, so that a reader who waits for them sees a complete folder."""
    files = sorted(os.path.relpath(os.path.join(root, name), local_dir)
                   for root, _, names in os.walk(local_dir) for name in names)
    for relative in sorted(files, key=lambda f: f in last):
        with open(os.path.join(local_dir, relative), "rb") as f:
            write_bytes(join(uri, *relative.split(os.sep)), f.read())

