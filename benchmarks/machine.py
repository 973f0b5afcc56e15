"""What every benchmark names the machine by. (The scripts run as `python benchmarks/NAME.py`, so this folder is
on their import path.)"""

import platform


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
