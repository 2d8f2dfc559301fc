"""What the tunnel processes cost: CPU seconds and peak RSS while data moves, and snapshots of RSS, open
descriptors and asyncio tasks (from the programs' own status endpoints, else psutil).

:class:`ResourceSampler` reads each role's CPU times (user + system) at start and end, and samples RSS
every 50 ms in a background thread, keeping the peak of the role's total. A process that exits while
sampled is skipped, not fatal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil

from devkit.errors import WaitTimeout
from devkit.waits import wait_until

__all__ = ["ResourceSampler", "Snapshot", "snapshot", "wait_settled"]

SAMPLE_INTERVAL_S = 0.05

Snapshot = dict[str, int | None]


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def _rss(processes: list[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


class ResourceSampler:
    """``with ResourceSampler(roles) as s: ...``; then ``s.result()`` = {role: {cpu_s, peak_rss}}."""

    def __init__(self, roles: dict[str, list[psutil.Process]], interval: float = SAMPLE_INTERVAL_S) -> None:
        self.roles = roles
        self.interval = interval
        self.peak_rss = {role: _rss(procs) for role, procs in roles.items()}
        self._cpu_start: dict[str, float] = {}
        self._cpu_end: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def __enter__(self) -> ResourceSampler:
        self._cpu_start = {role: _cpu_seconds(procs) for role, procs in self.roles.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._cpu_end = {role: _cpu_seconds(procs) for role, procs in self.roles.items()}

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            for role, procs in self.roles.items():
                self.peak_rss[role] = max(self.peak_rss[role], _rss(procs))

    def result(self) -> dict[str, dict[str, float]]:
        return {role: {"cpu_s": round(self._cpu_end[role] - self._cpu_start[role], 3),
                       "peak_rss": self.peak_rss[role]} for role in self.roles}


def snapshot(pid: int, status: Callable[[], dict] | None = None) -> Snapshot:
    """RSS, open descriptors and asyncio tasks of ``pid``: from its status JSON's ``process`` object when
    ``status`` is given and answers with one, else RSS and descriptors from psutil and tasks None."""
    if status is not None:
        try:
            process = status().get("process")
        except (OSError, ValueError):
            process = None
        if isinstance(process, dict) and {"rss", "fds", "tasks"} <= process.keys():
            return {"rss": int(process["rss"]), "fds": int(process["fds"]), "tasks": int(process["tasks"]),
                    "source": "status"}
    proc = psutil.Process(pid)
    return {"rss": proc.memory_info().rss, "fds": proc.num_fds(), "tasks": None, "source": "psutil"}


def wait_settled(read: Callable[[], dict[str, Snapshot]], baseline: dict[str, Snapshot], timeout: float,
                 interval: float = 0.25) -> tuple[dict[str, Snapshot], float]:
    """Poll ``read()`` until every role's fds and tasks are back to ``baseline`` (or ``timeout``).

    Returns the last reading and the seconds it took (``timeout`` if it never settled)."""
    start = time.monotonic()
    readings: list[dict[str, Snapshot]] = []

    def settled() -> bool:
        readings.append(read())
        return all(_settled(readings[-1][r], baseline[r]) for r in baseline)

    try:
        wait_until(settled, timeout, interval, message="descriptors and tasks back to their baseline")
    except WaitTimeout:
        return readings[-1], timeout
    return readings[-1], time.monotonic() - start


def _settled(now: Snapshot, before: Snapshot) -> bool:
    tasks_ok = now["tasks"] is None or before["tasks"] is None or now["tasks"] <= before["tasks"]
    return now["fds"] <= before["fds"] and tasks_ok

