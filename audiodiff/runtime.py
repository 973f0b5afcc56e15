"""Connecting to Ray: the cluster a job was submitted to, an address given, or a new local Ray."""

from __future__ import annotations

import os
import sys

import ray


def init_ray(address: str | None = None) -> None:
    """`ray job submit` sets RAY_ADDRESS, and the driver joins that cluster. Without an address, start a
    private local Ray on loopback (never attach to some other Ray that happens to run on this machine)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # the dashboard serves the State API that Ray Train's controller queries; on loopback only
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1")
    # Progress bars help in a terminal and flood `ray job logs` (RAY_NOTES.md).
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
