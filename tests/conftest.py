import os
import socket
import subprocess
import sys
import time
import uuid

# Ray's single-node loopback mode: every listener and connection stays on 127.0.0.1 (RAY_NOTES.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pyarrow.fs as pafs  # noqa: E402
import pytest  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{port} within {timeout} s")


@pytest.fixture(scope="session")
def free_port():
    """A function that returns a TCP port free on 127.0.0.1 now (outside Ray's worker range: the kernel's
    ephemeral ports start at 32768)."""
    return _free_port


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server on loopback for the whole session; stopped at the end.

    The standard AWS variables point at it for the whole session, set before any Ray starts, because Ray's
    worker processes keep the environment they started with (as on a cluster, where nodes carry it).
    """
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    try:
        _wait_for_port(port, process)
        os.environ.update(_AWS_ENV, AWS_ENDPOINT_URL=endpoint)
        yield endpoint
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        process.terminate()
        process.wait(timeout=10)


_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": ""}


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the loopback endpoint."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir(bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def local_ray(s3_endpoint):
    """One private local Ray (loopback) shared by the tests that run Ray Data jobs; started after the S3
    endpoint so that its workers see it."""
    import ray

    from audiodiff.runtime import init_ray

    init_ray()
    yield
    ray.shutdown()
