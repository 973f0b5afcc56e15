"""Connecting to Ray: the cluster a job was submitted to, an address given, or a new local Ray."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import stat
import sys
import tempfile
import traceback
from collections.abc import Iterable
from urllib.parse import urlparse

import ray

from audiodiff import storage
from audiodiff.errors import AudiodiffError

log = logging.getLogger(__name__)
# how an AudiodiffError raised in a Ray worker reads in the error the driver gets
_WORKER_ERROR = re.compile(r"^audiodiff\.errors\.(?:AudiodiffError|BadAudioError|BadImageError): (.+)$", re.M)

# CPU shares of Ray steps. Heavy per-item work (spectrogram actors) takes 3/4 of a CPU and every light step
# (reading, reshaping rows, filtering, writing) 1/4, so a full pool of one actor per core still leaves room
# to feed and drain it; with whole CPUs a light step that does not fuse into the actors (after --limit, say)
# waits forever for a CPU on a 2-core machine (as RAY_NOTES.md's Train + Data hang).
ACTOR_CPUS = 0.75
LIGHT_CPUS = 0.25
# What follows the private folder in a local Ray's longest unix socket path (Ray's temp dir, then session_<date>_
# <time>_<us>_<7-digit pid>/sockets/plasma_store): a socket path holds at most 107 bytes on Linux
_RAY_SOCKET_SUFFIX = len("/ray/session_2026-12-03_13-45-12_123456_1234567/sockets/plasma_store")


def init_ray(address: str | None = None) -> None:
    """`ray job submit` sets RAY_ADDRESS, and the driver joins that cluster. Without an address, start a
    private local Ray on loopback (never attach to some other Ray that happens to run on this machine).

    Ray Data's progress goes to terminals only: written to a file (a job's log, a redirect), its progress
    blocks and per-dataset plans drowned the stages' own lines (693 lines for the demo)."""
    if not sys.stdout.isatty():
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        _loopback_mode()
        # the dashboard serves the State API that Ray Train's controller queries; on loopback only. Workers are told
        # its address (left to look, they find every Ray on the machine and fail when there are two), and Ray Train's
        # controller checks its workers every 0.5 s, not 2 s, since a short fine-tune waits on those checks. No node
        # of a local Ray is preempted: Ray Train's preemption watcher, an actor more per fine-tune, stays off
        port = free_loopback_port()
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, _temp_dir=private_temp_dir(),
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                                           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                                           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(address: str | None = None) -> None:
    """The commands' way in: the cluster at `address` (--address) or RAY_ADDRESS, checked to answer first, else a
    new local Ray (init_ray)."""
    given = address or os.environ.get("RAY_ADDRESS")
    named = f"--address {address}" if address else f"RAY_ADDRESS={given}"
    if given:
        _check_reachable(given, named)
    try:
        init_ray(address)
    except ConnectionError as e:
        raise AudiodiffError(f"{named}: cannot join the Ray cluster there ({str(e).splitlines()[0]})") from None


def _check_reachable(address: str, named: str) -> None:
    """Ray retries an address where nothing answers for minutes before it gives up; one connection says so in
    seconds. `auto` and `local` name no host."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        raise AudiodiffError(f"{named}: not HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)") from None
    if not (host and port):
        return
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise AudiodiffError(f"{named}: no Ray cluster answers there ({e.strerror or e}); give the head's address "
                             "(`ray status` on the head prints it), or leave out --address and RAY_ADDRESS for a "
                             "local Ray") from None


def private_temp_dir() -> str:
    """Where a local Ray keeps its sessions, logs and unix sockets: inside a folder of this user's that no one else
    may enter. Ray's default, /tmp/ray, is one folder for every user of the machine, so another user could read the
    logs or take the name first; and Ray opens whatever temp dir it is given to everyone (chmod 0777), so its dir is
    `ray` one level down. The folder is under $XDG_RUNTIME_DIR (the user's own, mode 0700) where there is one, else
    the temp folder; made with mode 0700, and refused if it exists as anything but a folder of this user's that only
    they can enter (someone made it first)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = (os.path.join(runtime, "audiodiff-ray") if runtime and os.path.isdir(runtime)
              else os.path.join(tempfile.gettempdir(), f"audiodiff-ray-{os.getuid()}"))
    if len(folder.encode()) + _RAY_SOCKET_SUFFIX > 107:
        raise AudiodiffError(f"{folder}: too long a path for Ray's unix sockets (at most {107 - _RAY_SOCKET_SUFFIX} "
                             "characters); point XDG_RUNTIME_DIR or TMPDIR at a shorter folder")
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    found = os.lstat(folder)  # lstat: a symlink someone planted is refused, not followed
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise AudiodiffError(f"{folder}: the local Ray's temp folder must be a folder of yours that only you can "
                             f"enter (found {stat.filemode(found.st_mode)}, owner uid {found.st_uid}); remove it, "
                             "or point XDG_RUNTIME_DIR or TMPDIR at a folder of your own")
    return os.path.join(folder, "ray")


def _loopback_mode() -> None:
    """Ray's single-node loopback mode (RAY_NOTES.md) for the local Ray about to start, unless the user set the
    variable: without it that Ray also listened on `*`, 0.0.0.0 and the machine's other address (measured with
    `ss -ltnp`). Ray's processes read the variable as they start; this driver read it when it imported ray."""
    from ray._private import ray_constants

    value = os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    ray_constants.ENABLE_RAY_CLUSTER = value.lower() in ("1", "true")


def cluster_capacity(resource: str, cpu_only: bool = False) -> float:
    """How much of a resource (e.g. "GPU") the cluster has, or can grow to where an autoscaler reports its node
    groups (KubeRay, the cluster launcher): GPU workers often start at zero and come when a job asks for them.
    `cpu_only` counts only the nodes without GPUs, where Ray's scheduler puts CPU-only work (preprocessing) while
    there are such nodes; where there are none (a workstation with a GPU), every node's."""
    def total(keep) -> float:
        return max(_live_total(resource, keep), _group_total(resource, keep))

    return (cpu_only and total(lambda r: not r.get("GPU"))) or total(lambda r: True)


def largest_node(resource: str) -> float:
    """The most of a resource one node has or an autoscaler's node group gives its nodes: what a single worker can
    be given, and how many GPUs DDP finds inside one node."""
    return max([r.get(resource, 0) for r in _live_nodes()] + [r.get(resource, 0) for r, _ in _node_groups()],
               default=0)


def smallest_object_store() -> float:
    """Bytes of the smallest object store of a live node: data held for every worker must fit on each node. Node
    groups do not report theirs, so with every worker node at zero this is 0 (and fine-tuning streams)."""
    return min((n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n["Alive"]
                and n["Resources"].get("CPU", 0) + n["Resources"].get("GPU", 0) > 0), default=0)


def _live_nodes() -> list[dict]:
    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def _node_groups() -> list[tuple[dict, float]]:
    """The autoscaler's node groups: (resources of one node, the most nodes it grows to), read where Ray Data and
    Ray Train read them, through a private API in Ray 2.60. Should it move, count the nodes that are up, and say
    so. A group without a limit (-1) counts as Ray counts it, without bound."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as e:  # noqa: BLE001 - whatever a private API's change raises, the job goes on without it
        log.warning("cannot read the autoscaler's node groups from Ray (%s: %s); counting only the nodes that are up, "
                    "so worker groups that start at zero do not count: pass --num-cpus / --num-workers to size the "
                    "job", type(e).__name__, e)
        return []
    if config is None:
        return []
    return [(dict(g.resources), sys.maxsize if g.max_count == -1 else g.max_count) for g in config.node_group_configs]


def check_paths_reachable(shared_path: bool, output: str | None = None, inputs: Iterable[str] = ()) -> None:
    """Refuses, before any work, local paths on a cluster that has or can grow more than one node: a local output
    (every node would write its share to its own disk) and local inputs that workers read (a model folder, a
    dataset, audio: the other nodes do not have them). Hub ids, presets and object-storage URIs are fine; so is
    a path every node mounts (`shared_path`). Every stage calls it with what its workers read and write."""
    from audiodiff.model_files import PRESETS  # here: its mel configs import torch, which light Ray workers need not

    local = [p for p in inputs if p not in PRESETS and _local_path(p)]
    if output is not None and not storage.is_remote(output):
        local.insert(0, output)
    if shared_path or not local:
        return
    nodes = len(_live_nodes())
    grows = any(_group_total(r) > _live_total(r) for r in ("CPU", "GPU"))
    if nodes > 1 or grows:
        size = f"{nodes} nodes" + (" and can add more" if grows else "")
        what = "writes to" if local[0] == output else "reads from"
        raise AudiodiffError(f"{local[0]}: a local path, but the Ray cluster has {size}, each of which {what} its "
                             "own disk; give an object-storage URI (s3://..., gs://...), or pass --shared-path if "
                             "every node mounts this path")


def _local_path(name: str) -> bool:
    return not storage.is_remote(name) and (os.path.exists(name) or name.startswith("file://"))


def _live_total(resource: str, keep=lambda node: True) -> float:
    return sum(r.get(resource, 0) for r in _live_nodes() if keep(r))


def _group_total(resource: str, keep=lambda node: True) -> float:
    return sum(r.get(resource, 0) * count for r, count in _node_groups() if keep(r))


def require_gpus(needed: float, asked_by: str) -> None:
    """Stops a job that asks for more GPUs than the cluster has or can scale to, before any work starts."""
    have = cluster_capacity("GPU")
    if have < needed:
        raise AudiodiffError(f"{asked_by} needs {needed:g} GPUs; the Ray cluster has {have:g}, autoscaling included")


@contextlib.contextmanager
def worker_errors(*wrappers: type[Exception]):
    """Around running a dataset: the AudiodiffError a Ray worker raised (storage that cannot be read, say)
    stops the job as itself. Ray Data hands the worker's exception over as traceback text only, so the
    message, which names the input, is read from there; also from the `wrappers` given (Ray Train's
    TrainingFailedError, whose own text cuts its workers' tracebacks short: they are read from the exceptions it
    carries, `worker_failures`)."""
    try:
        yield
    except (ray.exceptions.RayError, *wrappers) as e:
        failures = getattr(e, "worker_failures", {}).values()
        found = _WORKER_ERROR.findall("\n".join([str(e), *("".join(traceback.format_exception(f)) for f in failures)]))
        if not found:
            raise
        raise AudiodiffError(found[-1]) from None
