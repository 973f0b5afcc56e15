"""Every stage through `ray job submit`, against a head started by cluster/local-head.sh (loopback, token auth)."""

import contextlib
import io
import ipaddress
import json
import os
import secrets
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import soundfile
from ray.job_submission import JobStatus, JobSubmissionClient

from audiodiff import models, storage
from audiodiff.runtime import cluster_capacity, private_temp_dir
from audiodiff.synth import write_examples

REPO = Path(__file__).resolve().parents[1]
HEAD_SCRIPT = str(REPO / "cluster" / "local-head.sh")


@dataclass
class Head:
    address: str
    gcs: str
    env: dict
    token: str
    sessions: tuple[int, ...]  # the head's, then the second node's

    def client(self) -> JobSubmissionClient:
        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def state(self, *args) -> list[dict]:
        """`ray list ... --format json` against this cluster, with its token."""
        result = subprocess.run(["ray", "list", *args, "--address", self.gcs, "--format", "json", "--limit", "1000"],
                                env=self.env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout) if result.stdout.lstrip().startswith("[") else []  # "No resource in ..."


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


def end_session(session: int) -> None:
    """Kills a session's processes by id (a test's own node or run: nothing in it to save) and waits for them."""
    left = session_tree(session)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(left, timeout=30)


# A second node joined to a head, a CPU, every listener on loopback: as Ray's own cluster_utils adds one (`ray start
# --address` refuses to join anything in loopback mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), with a temp dir and a
# log monitor of its own as on another machine (sharing the head's, the two nodes' runtime-env agents unpack a job's
# working dir into one folder and remove it from under each other); runs until ended.
_SECOND_NODE = """
import signal, sys
from ray._private.node import Node
from ray._private.parameter import RayParams
gcs, temp_dir, *ports = sys.argv[1:]
Node(RayParams(gcs_address=gcs, node_ip_address="127.0.0.1", num_cpus=1, num_gpus=0, temp_dir=temp_dir,
               min_worker_port=22000, max_worker_port=22999, node_manager_port=0,
               **dict(zip(("dashboard_agent_listen_port", "metrics_agent_port", "metrics_export_port",
                           "runtime_env_agent_port"), map(int, ports)))),
     head=False, shutdown_at_exit=True, spawn_reaper=False)
print("second node up", flush=True)
signal.pause()
"""


@pytest.fixture(scope="module")
def head(tmp_path_factory, s3_endpoint, free_port):
    """Two Ray nodes of our own on loopback, a CPU each: a head started by cluster/local-head.sh (private state dir,
    token and ports; the session's other Ray may be running) and a second node joined to it in a session of its
    own. The S3 variables in their environment stand for the platform's credentials. Stopped, and checked gone,
    at the end."""
    state = tmp_path_factory.mktemp("head")
    token = secrets.token_hex(32)
    (state / "token").write_text(token)
    (state / "token").chmod(0o600)
    dashboard, gcs = free_port(), free_port()
    env = {**os.environ, "AUDIODIFF_HEAD_DIR": str(state), "AUDIODIFF_DASHBOARD_PORT": str(dashboard),
           "RAY_AUTH_TOKEN_PATH": str(state / "token"), "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ports = ["--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port"]
    start = subprocess.run([HEAD_SCRIPT, "start", "--port", str(gcs),
                            *[a for flag in ports for a in (flag, str(free_port()))],
                            "--min-worker-port", "21000", "--max-worker-port", "21999", "--num-cpus", "1"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stdout + start.stderr
    sessions = [int((state / "head.pid").read_text())]
    try:
        with open(state / "node.log", "w") as log:
            node = subprocess.Popen([sys.executable, "-c", _SECOND_NODE, f"127.0.0.1:{gcs}", str(state / "node"),
                                     *(str(free_port()) for _ in range(4))],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sessions.append(node.pid)
        head = Head(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", env, token, tuple(sessions))
        deadline = time.monotonic() + 120
        while len([n for n in head.state("nodes") if n["state"] == "ALIVE"]) < 2:
            assert node.poll() is None and time.monotonic() < deadline, (state / "node.log").read_text()[-3000:]
            time.sleep(1)
        yield head
    finally:
        if len(sessions) > 1:
            end_session(sessions[1])
        stop = subprocess.run([HEAD_SCRIPT, "stop"], env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert [p for session in sessions for p in session_tree(session)] == []


def start_submit(head: Head, stage: str, *args) -> tuple[subprocess.Popen, str]:
    """`ray job submit` from the repository root, as the README shows, started; it ends when the job does."""
    submission_id = f"{stage}-{uuid.uuid4().hex[:8]}"
    process = subprocess.Popen(
        ["ray", "job", "submit", "--address", head.address, "--submission-id", submission_id, "--working-dir", ".",
         "--runtime-env", "cluster/runtime_env.yaml", "--", "python", f"jobs/{stage}.py", *map(str, args)],
        cwd=REPO, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, submission_id


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=540)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def submit(head: Head, stage: str, *args) -> tuple[subprocess.CompletedProcess, str]:
    """`ray job submit`, waiting for the job to end."""
    process, submission_id = start_submit(head, stage, *args)
    return finished(process), submission_id


def job_logs(head: Head, submission_id: str) -> str:
    """What `ray job logs` prints, through the job client in this process (the command starts Ray's CLI each time)."""
    return head.client().get_job_logs(submission_id)


def succeeded(head: Head, stage: str, *args) -> str:
    result, submission_id = submit(head, stage, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert head.client().get_job_status(submission_id) == JobStatus.SUCCEEDED
    return job_logs(head, submission_id)


@pytest.mark.slow
def test_head_listens_on_loopback_only_and_refuses_requests_without_the_token(head):
    pids = {p.pid for session in head.sessions for p in session_tree(session)}
    listening = {ipaddress.ip_address(c.laddr.ip) for c in psutil.net_connections("inet")
                 if c.pid in pids and c.status == psutil.CONN_LISTEN}
    assert listening and all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in listening), listening
    no_token = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"HOME": str(REPO / "nowhere")}
    refused = subprocess.run(["ray", "job", "list", "--address", head.address], env=no_token,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "token" in refused.stdout + refused.stderr


@pytest.mark.slow
def test_every_stage_as_a_job_on_two_nodes_writes_each_output_once_to_object_storage(head, s3_bucket):
    write_examples(f"{s3_bucket}/audio", tracks_per_genre=2, seconds=6.0)  # 6 tracks, 24 slices of 64x64
    # preprocess runs one spectrogram actor per node (0.75 CPU each); finetune's two workers take a whole CPU each
    # (the data is in the object store by then), and generate's two actors 0.75 CPU each: neither pair fits on one
    # node, so each node holds one of them
    logs = succeeded(head, "preprocess", f"{s3_bucket}/audio", "--model", "tiny", "--genre-from-folder",
                     "--num-cpus", 2, "--output", f"{s3_bucket}/spectrograms")
    assert "preprocess: 6 tracks read, 6 written, 0 rejected; 24 slices" in logs
    # preprocess: every slice once
    fs, data = storage.resolve(f"{s3_bucket}/spectrograms/data")
    slices = pq.read_table(data, filesystem=fs)
    keys = list(zip(slices["audio_file"].to_pylist(), slices["slice"].to_pylist()))
    stats = json.loads(storage.read_bytes(f"{s3_bucket}/spectrograms/stats.json"))
    assert len(keys) == len(set(keys)) == stats["slices_written"] == 24 and stats["tracks_written"] == 6

    logs = succeeded(head, "finetune", "--data", f"{s3_bucket}/spectrograms", "--model", "tiny",
                     "--output", f"{s3_bucket}/model", "--num-workers", 2, "--epochs", 1, "--warmup-steps", 2,
                     "--log-every", 2, "--num-samples", 2, "--sample-steps", 2)
    assert "finetune: 22 training images (2 held out for the quality figure" in logs and "2 worker(s)" in logs
    assert "step 2/" in logs and "quality (Fréchet distance)" in logs  # progress from the workers
    # 22 training images / (4 per worker x 2 workers) = 2 steps; the pipeline loads from the bucket
    assert "finetune: 2 steps on 22 images" in logs
    history = storage.read_bytes(f"{s3_bucket}/model/metrics.jsonl").splitlines()
    assert [json.loads(line)["step"] for line in history] == [2]
    assert models.load_model(f"{s3_bucket}/model").image_size == (64, 64)

    logs = succeeded(head, "generate", "--model", f"{s3_bucket}/model", "--output", f"{s3_bucket}/clips",
                     "--num-clips", 2, "--num-extended", 1, "--concurrency", 2, "--batch-size", 1,
                     "--scheduler", "ddim", "--steps", 4)
    assert "generate: 3 clips written" in logs
    # generate: each planned clip once, whole
    rows = pq.read_table(io.BytesIO(storage.read_bytes(f"{s3_bucket}/clips/manifest.parquet"))).to_pylist()
    assert [r["clip_id"] for r in rows] == ["standard-00000", "standard-00001", "extended-00000"]
    assert sorted(r["kind"] for r in rows) == ["extended", "standard", "standard"]
    assert storage.list_files(f"{s3_bucket}/clips/clips") == sorted(
        f"{s3_bucket}/clips/{r[ext]}" for r in rows for ext in ("wav", "png"))
    for row in rows:
        audio, rate = soundfile.read(io.BytesIO(storage.read_bytes(f"{s3_bucket}/clips/{row['wav']}")))
        assert rate == 22050 and len(audio) / rate == pytest.approx(row["seconds"])
    assert storage.exists(f"{s3_bucket}/clips/index.html")

    assert len(head.state("nodes")) == 2
    for name in ("MapWorker(MapBatches(SpectrogramMaker))", "RayTrainWorker", "MapWorker(MapBatches(ClipMaker))"):
        found = head.state("actors", "--detail", "--filter", f"class_name={name}")
        assert (len(found), len({a["node_id"] for a in found})) == (2, 2), (name, found)

    # audio-to-audio from object storage: 2 drone tracks, 8 slices, each rendered as it is and remixed
    logs = succeeded(head, "remix", f"{s3_bucket}/audio/drone", "--model", f"{s3_bucket}/model",
                     "--output", f"{s3_bucket}/remix", "--steps", 4, "--strength", 0.5)
    assert "remix: 16 clips written" in logs
    assert storage.exists(f"{s3_bucket}/remix/index.html") and storage.exists(f"{s3_bucket}/remix/rejects.parquet")


BAD_ARGUMENTS = [
    ("generate", ["--model", "tiny", "--output", "{bucket}/x", "--num-clips", "many"],
     "argument --num-clips: invalid int value: 'many'"),
    ("finetune", ["--data", "{bucket}/no-such-dataset", "--model", "tiny", "--output", "{bucket}/x"],
     "audiodiff finetune: error: {bucket}/no-such-dataset: no such dataset"),
    ("preprocess", ["{bucket}/audio", "--model", "tiny", "--output", "{tmp}/local"],
     "{tmp}/local: a local path, but the Ray cluster has 2 nodes"),
]


@pytest.mark.slow
def test_jobs_with_a_bad_argument_fail_with_the_message_in_their_logs(head, s3_bucket, tmp_path):
    write_examples(f"{s3_bucket}/audio", tracks_per_genre=1, seconds=2.0)
    # submitted together: each job spends its seconds starting its driver
    jobs = [(start_submit(head, stage, *[a.format(bucket=s3_bucket, tmp=tmp_path) for a in args]), message)
            for stage, args, message in BAD_ARGUMENTS]
    for (process, submission_id), message in jobs:
        assert finished(process).returncode != 0
        assert head.client().get_job_status(submission_id) == JobStatus.FAILED
        assert message.format(bucket=s3_bucket, tmp=tmp_path) in job_logs(head, submission_id)
    assert not (tmp_path / "local").exists()


@contextlib.contextmanager
def autoscaler_groups():
    """The autoscaler (KubeRay, the cluster launcher) reports its node groups to the GCS; this puts such a report
    there the way it does, for a CPU and a GPU group that start at zero, and takes it away at the end."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    groups = [NodeGroupConfig(name="cpu", resources={"CPU": 16}, min_count=0, max_count=8),
              NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, min_count=0, max_count=4)]
    _internal_kv_put(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, ClusterConfig(node_group_configs=groups).SerializeToString(),
                     namespace=GCS_AUTOSCALER_STATE_NAMESPACE)
    try:
        yield
    finally:
        _internal_kv_del(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, namespace=GCS_AUTOSCALER_STATE_NAMESPACE)


def test_gpu_capacity_counts_the_gpu_workers_an_autoscaler_can_add(local_ray):
    """KubeRay and the cluster launcher start GPU groups at zero: `--gpu` must not be refused for that."""
    assert cluster_capacity("GPU") == 0
    with autoscaler_groups():
        assert cluster_capacity("GPU") == 4
    assert cluster_capacity("GPU") == 0


def test_capacity_falls_back_to_the_nodes_that_are_up_when_ray_moves_its_private_api(local_ray, monkeypatch, caplog):
    import ray
    from ray._private.state import state

    monkeypatch.delattr(type(state), "get_cluster_config")
    with autoscaler_groups():
        assert cluster_capacity("CPU") == ray.cluster_resources()["CPU"] and cluster_capacity("GPU") == 0
    assert "cannot read the autoscaler's node groups from Ray (AttributeError" in caplog.text
    assert "counting only the nodes that are up" in caplog.text


def test_a_local_output_is_refused_before_work_on_a_cluster_of_more_than_one_node(local_ray, tmp_path, capsys):
    from audiodiff.cli import main
    from audiodiff.runtime import check_paths_reachable

    check_paths_reachable(False, str(tmp_path / "out"))  # one node, no autoscaler: a local path is fine
    with autoscaler_groups():  # a head now, worker nodes when jobs ask for them
        (tmp_path / "in").mkdir()  # beside the outputs: a source holding its output is refused first (ownership)
        for stage, args in (("preprocess", [str(tmp_path / "in"), "--model", "tiny"]),
                            ("finetune", ["--data", str(tmp_path / "in"), "--model", "tiny"])):
            assert main([stage, *args, "--output", str(tmp_path / stage)]) == 1
            error = capsys.readouterr().err
            assert f"{tmp_path / stage}: a local path, but the Ray cluster has 1 nodes and can add more" in error
            assert "give an object-storage URI (s3://..., gs://...), or pass --shared-path" in error
            assert not (tmp_path / stage).exists()
        check_paths_reachable(True, str(tmp_path / "out"))
        check_paths_reachable(False, "s3://bucket/out")


# Run in a process of its own with the user's environment minus the loopback variable: a local Ray, two tasks. The
# second asks the State API with no address, from a worker, as Ray Train's PlacementGroupCleaner does: with the
# session's Ray also running, it must find its own Ray, not fail on finding two.
_LOCAL_RUN = """
import json, psutil, ray
from ray.util.state import list_nodes
from audiodiff.runtime import init_ray
init_ray()
ray.get(ray.remote(lambda: 0).remote())
print(ray.get(ray.remote(lambda: [n.node_id for n in list_nodes()]).remote()) == [ray.get_runtime_context().get_node_id()])
me = psutil.Process()
pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
print(ray._private.worker._global_node.get_temp_dir_path())
print(json.dumps(sorted({c.laddr.ip for c in psutil.net_connections("inet")
                         if c.pid in pids and c.status == psutil.CONN_LISTEN})))
ray.shutdown()
"""


def python_in_own_session(code: str, *args: str, drop: tuple[str, ...] = ("RAY_ADDRESS",)) -> \
        subprocess.CompletedProcess:
    """`python -c code args` in a session of its own, without the variables in `drop`; whatever of the Ray it
    started is still running afterwards (a failed run, a process slow to exit) is ended by process id."""
    process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True, start_new_session=True,
                               env={k: v for k, v in os.environ.items() if k not in drop},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=540)  # under the 600 s of pytest-timeout, with room to clean up
    finally:
        end_session(process.pid)
    assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_a_local_ray_listens_on_loopback_only_without_the_users_export_and_keeps_its_files_private(local_ray):
    run = python_in_own_session(_LOCAL_RUN, drop=("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS"))
    *_, own_state_api, temp_dir, sockets = run.stdout.splitlines()
    assert own_state_api == "True"
    listening = [ipaddress.ip_address(a) for a in json.loads(sockets)]
    assert listening and all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in listening), listening
    # not /tmp/ray: in a folder only the user can enter (Ray opens its own dir to everyone)
    assert temp_dir == private_temp_dir() and stat.S_IMODE(os.stat(os.path.dirname(temp_dir)).st_mode) == 0o700
