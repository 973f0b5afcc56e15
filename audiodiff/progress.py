"""Progress lines for long work, the same in a terminal and in a job's log (where Ray's own progress bars are
off): `generate: 12/24 clips (50%), 0.4 clips/s, about 30 s left`.

A line comes at most every AUDIODIFF_PROGRESS_SECONDS (30 s), and then only once another tenth of the work is
done or ten such intervals have passed, so a long job's log gets a line at each tenth (or every 5 minutes) and a
short one none. Work done on the driver is counted with `advance`; work done in Ray workers reports to a small
counting actor whose handle (`counter`) the workers' UDFs are given and pass to `count`."""

from __future__ import annotations

import os
import threading
import time

import ray

INTERVAL_VARIABLE = "AUDIODIFF_PROGRESS_SECONDS"


def line(stage: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """One progress line: done/total, the rate so far and the time left at that rate."""
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"{stage}: {done}/{total} {unit}" if total else f"{stage}: {done} {unit}"
    if total:
        text += f" ({100 * done / total:.0f}%)"
    text += f", {rate:.3g} {unit}/s" if rate >= 0.1 else f", {60 * rate:.3g} {unit}/min"
    if total and rate > 0 and done < total:
        text += f", about {duration((total - done) / rate)} left"
    return text


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@ray.remote(num_cpus=0)
class _Counter:
    def __init__(self):
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def get(self) -> int:
        return self.done


def count(counter, n: int) -> None:
    """In a Ray worker: `n` more done (nothing when the work has no counter); waits for the count to be taken,
    so that the work is counted before its results reach the driver."""
    if counter is not None:
        ray.get(counter.add.remote(n))


def due(since: float, done: int, last_done: int, total: int | None, interval: float) -> bool:
    """Whether a line is due, `since` seconds after the last (which said `last_done`)."""
    if since < interval:
        return False
    advanced = done > last_done and (not total or interval == 0 or done - last_done >= total / 10)
    return advanced or 0 < 10 * interval <= since


class Progress:
    """Around a stage's long work, on the driver: prints progress lines from a thread of its own while the work
    runs (`with Progress("generate", 24, "clips") as progress:`)."""

    def __init__(self, stage: str, total: int | None, unit: str, workers: bool = False):
        self.stage, self.total, self.unit = stage, total, unit
        self.interval = float(os.environ.get(INTERVAL_VARIABLE, 30))
        self.counter = _Counter.remote() if workers else None
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, daemon=True, name=f"audiodiff-{stage}-progress")

    def advance(self, n: int) -> None:
        self.done += n

    def __enter__(self) -> Progress:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.counter is not None:
            ray.kill(self.counter)

    def _done(self) -> int:
        workers = ray.get(self.counter.get.remote()) if self.counter is not None else 0
        return min(self.done + workers, self.total or self.done + workers)  # a retried batch counts twice

    def _report(self) -> None:
        last_time, last_done, lines = self.started, 0, 0
        while True:
            stopping = self._stop.wait(min(max(self.interval, 0.2), 5.0))
            try:
                done = self._done()
            except ray.exceptions.RayError:  # the job is failing; its own error says why
                return
            now = time.monotonic()
            # at the end, the last line only where lines came before (a short job has its summary line)
            if (not stopping and due(now - last_time, done, last_done, self.total, self.interval)) or \
                    (stopping and done > last_done and (lines or self.interval == 0)):
                print(line(self.stage, done, self.total, self.unit, now - self.started), flush=True)
                last_time, last_done, lines = now, done, lines + 1
            if stopping:
                return
