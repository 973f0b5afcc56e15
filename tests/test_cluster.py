"""Every stage through `ray job submit`, against a head started by cluster/local-head.sh (loopback, token auth)."""

import contextlib
import io
import ipaddress
import json
import os
import secrets
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from audiodiff import storage
from audiodiff.runtime import cluster_capacity
from audiodiff.synth import write_examples

REPO = Path(__file__).resolve().parents[1]
HEAD_SCRIPT = str(REPO / "cluster" / "local-head.sh")


@dataclass
class Head:
    address: str
    env: dict
    token: str
    session: int

    def client(self) -> JobSubmissionClient:
        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})


def session_tree(session: int) -> list[psutil.Process]:
    """The head's processes still running: its session and their descendants (job drivers start sessions of
    their own)."""
    found = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(process.pid) == session:
                found[process.pid] = process
                found.update((child.pid, child) for child in process.children(recursive=True))
    return [p for p in found.values() if running(p)]


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # where pid 1 does not reap, finished children stay
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3_endpoint, free_port):
    """A head of our own: private state dir, token and ports (the session's other Ray may be running); the S3
    variables in its environment stand for the platform's credentials. Stopped, and checked gone, at the end."""
    state = tmp_path_factory.mktemp("head")
    token = secrets.token_hex(32)
    (state / "token").write_text(token)
    (state / "token").chmod(0o600)
    dashboard = free_port()
    env = {**os.environ, "AUDIODIFF_HEAD_DIR": str(state), "AUDIODIFF_DASHBOARD_PORT": str(dashboard),
           "RAY_AUTH_TOKEN_PATH": str(state / "token"), "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ports = ["--port", "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port"]
    start = subprocess.run([HEAD_SCRIPT, "start", *[a for flag in ports for a in (flag, str(free_port()))],
                            "--min-worker-port", "21000", "--max-worker-port", "21999", "--num-cpus", "2"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stdout + start.stderr
    session = int((state / "head.pid").read_text())
    try:
        yield Head(f"http://127.0.0.1:{dashboard}", env, token, session)
    finally:
        stop = subprocess.run([HEAD_SCRIPT, "stop"], env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert session_tree(session) == []


def submit(head: Head, stage: str, *args) -> tuple[subprocess.CompletedProcess, str]:
    """`ray job submit` from the repository root, as the README shows; waits for the job to end."""
    submission_id = f"{stage}-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        ["ray", "job", "submit", "--address", head.address, "--submission-id", submission_id, "--working-dir", ".",
         "--runtime-env", "cluster/runtime_env.yaml", "--", "python", f"jobs/{stage}.py", *map(str, args)],
        cwd=REPO, env=head.env, capture_output=True, text=True, timeout=540)
    return result, submission_id


def job_logs(head: Head, submission_id: str) -> str:
    result = subprocess.run(["ray", "job", "logs", "--address", head.address, submission_id],
                            env=head.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def succeeded(head: Head, stage: str, *args) -> str:
    result, submission_id = submit(head, stage, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert head.client().get_job_status(submission_id) == JobStatus.SUCCEEDED
    return job_logs(head, submission_id)


def test_head_listens_on_loopback_only_and_refuses_requests_without_the_token(head):
    pids = {p.pid for p in session_tree(head.session)}
    listening = {ipaddress.ip_address(c.laddr.ip) for c in psutil.net_connections("inet")
                 if c.pid in pids and c.status == psutil.CONN_LISTEN}
    assert listening and all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in listening), listening
    no_token = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"HOME": str(REPO / "nowhere")}
    refused = subprocess.run(["ray", "job", "list", "--address", head.address], env=no_token,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "token" in refused.stdout + refused.stderr


def test_preprocess_finetune_and_generate_jobs_on_object_storage(head, s3_bucket):
    write_examples(f"{s3_bucket}/audio", tracks_per_genre=2, seconds=6.0)  # 6 tracks, 24 slices of 64x64

    logs = succeeded(head, "preprocess", f"{s3_bucket}/audio", "--model", "tiny", "--genre-from-folder",
                     "--output", f"{s3_bucket}/spectrograms")
    assert "preprocess: 6 tracks read, 6 written, 0 rejected; 24 slices" in logs
    assert json.loads(storage.read_bytes(f"{s3_bucket}/spectrograms/stats.json"))["slices_written"] == 24

    logs = succeeded(head, "finetune", "--data", f"{s3_bucket}/spectrograms", "--model", "tiny",
                     "--output", f"{s3_bucket}/model", "--num-workers", 2, "--epochs", 2, "--warmup-steps", 2,
                     "--log-every", 2)
    assert "finetune: 22 training images (2 held out for the quality figure" in logs and "2 worker(s)" in logs
    assert "step 2/" in logs and "quality (Fréchet distance)" in logs  # progress from the workers
    assert storage.exists(f"{s3_bucket}/model/model_index.json")

    logs = succeeded(head, "generate", "--model", f"{s3_bucket}/model", "--output", f"{s3_bucket}/clips",
                     "--num-clips", 2, "--num-extended", 1, "--scheduler", "ddim", "--steps", 4)
    assert "generate: 3 clips written" in logs
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{s3_bucket}/clips/manifest.parquet"))).to_pylist()
    assert sorted(r["kind"] for r in rows) == ["extended", "standard", "standard"]
    assert all(storage.exists(f"{s3_bucket}/clips/{r['wav']}") for r in rows)


@pytest.mark.parametrize("stage, args, message", [
    ("generate", ["--model", "tiny", "--output", "{bucket}/x", "--num-clips", "many"],
     "argument --num-clips: invalid int value: 'many'"),
    ("finetune", ["--data", "{bucket}/no-such-dataset", "--model", "tiny", "--output", "{bucket}/x"],
     "audiodiff finetune: error: {bucket}/no-such-dataset: no such dataset"),
])
def test_a_job_with_a_bad_argument_fails_with_the_message_in_its_logs(head, s3_bucket, stage, args, message):
    result, submission_id = submit(head, stage, *[a.format(bucket=s3_bucket) for a in args])
    assert result.returncode != 0
    assert head.client().get_job_status(submission_id) == JobStatus.FAILED
    assert message.format(bucket=s3_bucket) in job_logs(head, submission_id)


def test_gpu_capacity_counts_the_gpu_workers_an_autoscaler_can_add(local_ray):
    """KubeRay and the cluster launcher start GPU groups at zero: `--gpu` must not be refused for that. The
    autoscaler reports its node groups to the GCS; this puts such a report there the way it does."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    assert cluster_capacity("GPU") == 0
    groups = [NodeGroupConfig(name="cpu", resources={"CPU": 16}, min_count=0, max_count=8),
              NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, min_count=0, max_count=4)]
    _internal_kv_put(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, ClusterConfig(node_group_configs=groups).SerializeToString(),
                     namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
    try:
        assert cluster_capacity("GPU") == 4
    finally:
        _internal_kv_del(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
    assert cluster_capacity("GPU") == 0
