"""Connecting to Ray: the cluster a job was submitted to, an address given, or a new local Ray."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

import ray

from audiodiff import storage
from audiodiff.errors import AudiodiffError

log = logging.getLogger(__name__)
# how an AudiodiffError raised in a Ray worker reads in the error the driver gets
_WORKER_ERROR = re.compile(r"^audiodiff\.errors\.(?:AudiodiffError|BadAudioError): (.+)$", re.M)

# CPU shares of Ray steps. Heavy per-item work (spectrogram actors) takes 3/4 of a CPU and every light step
# (reading, reshaping rows, filtering, writing) 1/4, so a full pool of one actor per core still leaves room
# to feed and drain it; with whole CPUs a light step that does not fuse into the actors (after --limit, say)
# waits forever for a CPU on a 2-core machine (as RAY_NOTES.md's Train + Data hang).
ACTOR_CPUS = 0.75
LIGHT_CPUS = 0.25


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
        # the dashboard serves the State API that Ray Train's controller queries; on loopback only
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1")


def _loopback_mode() -> None:
    """Ray's single-node loopback mode (RAY_NOTES.md) for the local Ray about to start, unless the user set the
    variable: without it that Ray also listened on `*`, 0.0.0.0 and the machine's other address (measured with
    `ss -ltnp`). Ray's processes read the variable as they start; this driver read it when it imported ray."""
    from ray._private import ray_constants

    value = os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    ray_constants.ENABLE_RAY_CLUSTER = value.lower() in ("1", "true")


def cluster_capacity(resource: str) -> float:
    """How much of a resource (e.g. "GPU") the cluster has, or can grow to where an autoscaler reports its node
    groups (KubeRay, the cluster launcher): GPU workers often start at zero and come when a job asks for them."""
    return max(ray.cluster_resources().get(resource, 0), _autoscaling_limits().get(resource, 0))


def _autoscaling_limits() -> dict:
    """The most of each resource the autoscaler's node groups reach, read where Ray Data and Ray Train read it: a
    private API in Ray 2.60. Should it move, count the nodes that are up, and say so."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or {}
    except Exception as e:  # noqa: BLE001 - whatever a private API's change raises, the job goes on without it
        log.warning("cannot read the autoscaler's node groups from Ray (%s: %s); counting only the nodes that are up, "
                    "so worker groups that start at zero do not count: pass --num-cpus / --num-workers to size the "
                    "job", type(e).__name__, e)
        return {}


def check_output_reachable(output: str, shared_path: bool) -> None:
    """Refuses, before any work, a local output path on a cluster that has or can grow more than one node: every
    node would write its share to its own disk. Every stage that writes calls it."""
    if shared_path or storage.is_remote(output):
        return
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    grows = any(_autoscaling_limits().get(r, 0) > ray.cluster_resources().get(r, 0) for r in ("CPU", "GPU"))
    if nodes > 1 or grows:
        size = f"{nodes} nodes" + (" and can add more" if grows else "")
        raise AudiodiffError(f"{output}: a local path, but the Ray cluster has {size}, each of which would write to "
                             "its own disk; give an object-storage URI (s3://..., gs://...), or pass --shared-path "
                             "if every node mounts this path")


def largest_node(resource: str) -> float:
    """The most of a resource one live node has: what a single worker can be given."""
    return max((n["Resources"].get(resource, 0) for n in ray.nodes() if n["Alive"]), default=0)


def smallest_object_store() -> float:
    """Bytes of the smallest object store of a live node: data held for every worker must fit on each node."""
    return min((n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n["Alive"]
                and n["Resources"].get("CPU", 0) + n["Resources"].get("GPU", 0) > 0), default=0)


def require_gpus(needed: float, asked_by: str) -> None:
    """Stops a job that asks for more GPUs than the cluster has or can scale to, before any work starts."""
    have = cluster_capacity("GPU")
    if have < needed:
        raise AudiodiffError(f"{asked_by} needs {needed:g} GPUs; the Ray cluster has {have:g}, autoscaling included")


@contextlib.contextmanager
def worker_errors():
    """Around running a dataset: the AudiodiffError a Ray worker raised (storage that cannot be read, say)
    stops the job as itself. Ray Data hands the worker's exception over as traceback text only, so the
    message, which names the input, is read from there."""
    try:
        yield
    except ray.exceptions.RayError as e:
        found = _WORKER_ERROR.findall(str(e))
        if not found:
            raise
        raise AudiodiffError(found[-1]) from None
