"""Connecting to Ray: the cluster a job was submitted to, an address given, or a new local Ray."""

from __future__ import annotations

import logging
import os
import sys

import ray

from audiodiff.errors import AudiodiffError

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
        # the dashboard serves the State API that Ray Train's controller queries; on loopback only
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1")


def cluster_capacity(resource: str) -> float:
    """How much of a resource (e.g. "GPU") the cluster has, or can grow to where an autoscaler reports its node
    groups (KubeRay, the cluster launcher): GPU workers often start at zero and come when a job asks for them."""
    from ray._private.state import state  # where Ray Data and Ray Train read the autoscaling limits too (2.60)

    limits = state.get_max_resources_from_cluster_config() or {}
    return max(ray.cluster_resources().get(resource, 0), limits.get(resource, 0))


def largest_node(resource: str) -> float:
    """The most of a resource one live node has: what a single worker can be given."""
    return max((n["Resources"].get(resource, 0) for n in ray.nodes() if n["Alive"]), default=0)


def smallest_object_store() -> float:
    """Bytes of the smallest object store of a live node: data held for every worker must fit on each node."""
    return min((n["Resources"].get("object_store_memory", 0) for n in ray.nodes() if n["Alive"]
                and n["Resources"].get("CPU", 0) + n["Resources"].get("GPU", 0) > 0), default=0)


def require_gpus(needed: int, asked_by: str) -> None:
    """Stops a job that asks for more GPUs than the cluster has or can scale to, before any work starts."""
    have = cluster_capacity("GPU")
    if have < needed:
        raise AudiodiffError(f"{asked_by} needs {needed} GPUs; the Ray cluster has {have:g}, autoscaling included")
