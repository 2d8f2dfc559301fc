"""Throughput and association latency per path. Each function returns a plain dict for the results JSON.

Throughput: the whole workload, once in 1 association and once in N parallel associations (N storescu
processes, each with 1/N of the files, dealt round-robin), to the bulk ``storescp --fork`` through the
path. Time runs from starting the storescu processes until all have exited with status 0 and the sink
directory holds every file. Runs are interleaved (run 1 of every path, then run 2...) so drift on the
machine hits every path alike; the reported figure is the median run. While each run moves data, the
path's own processes (relay and agent, sshd and ssh, both stunnels) are sampled for CPU and peak RSS.
Before the first run, each path carries 20 files untimed (warm-up).

Latency: sequential probes (connect + A-ASSOCIATE + A-RELEASE) against the echo storescp through the
path: idle, then while one storescu sends the workload over the same path to the bulk sink (restarted
if it finishes before the probes do).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from devkit.waits import wait_until
from tunnel_bench.errors import BenchError
from tunnel_bench.paths import BenchPath, Endpoint
from tunnel_bench.peers import Sinks, StoreJob, Workload, clear_dir, count_files, store
from tunnel_bench.probes import probe_series
from tunnel_bench.resources import ResourceSampler
from tunnel_bench.stats import MB, latency_summary, median, throughput

__all__ = ["BenchContext", "BulkLoad", "Settings", "measure_latency", "measure_throughput", "store_once"]

GB = 1e9
WARMUP_FILES = 20


@dataclass(frozen=True)
class Settings:
    """How much of everything one run does (see ``cli.settings_for``)."""

    mode: str
    runs: int
    parallel: int
    latency_count: int
    idle_associations: int
    churn_rate: int
    churn_seconds: int
    wan_rtts_ms: tuple[int, ...]
    wan_rate_mbit: float
    wan_instances: int
    wan_runs: int
    store_timeout_s: float
    wireguard_instances: int = 0  # WireGuard row: the first N instances (0: the whole workload)
    wan_whole_set: bool = False  # also send the whole workload once into the spool at the largest RTT


@dataclass
class BenchContext:
    settings: Settings
    workload: Workload
    sinks: Sinks
    log_dir: Path
    progress: Callable[[str], None]


def store_once(ctx: BenchContext, endpoint: Endpoint, workload: Workload, parallel: int) -> float:
    """Seconds to move ``workload`` through ``endpoint`` in ``parallel`` associations."""
    lists = workload.split(parallel)
    return store(endpoint.port, endpoint.called_ae, lists, ctx.sinks.bulk_dir, expected=len(workload.files),
                 timeout=ctx.settings.store_timeout_s, log_dir=ctx.log_dir / "storescu")


def _one_run(ctx: BenchContext, path: BenchPath, parallel: int) -> tuple[float, dict]:
    with ResourceSampler(path.roles()) as sampler:
        seconds = store_once(ctx, path.bulk, ctx.workload, parallel)
    return seconds, sampler.result()


def _summarize_runs(ctx: BenchContext, seconds: list[float], usage: list[dict]) -> dict:
    wl = ctx.workload
    runs = [throughput(wl.total_bytes, len(wl.files), s) for s in seconds]
    best = throughput(wl.total_bytes, len(wl.files), median(seconds))
    gigabytes = wl.total_bytes / GB
    resources = {role: {"cpu_s_per_gb": round(median([u[role]["cpu_s"] for u in usage]) / gigabytes, 3),
                        "peak_rss": max(u[role]["peak_rss"] for u in usage)} for role in (usage[0] if usage else {})}
    return {**best, "runs": runs, "resources": resources}


def measure_throughput(ctx: BenchContext, paths: Sequence[BenchPath]) -> dict[str, dict[str, dict]]:
    """{path key: {"1": summary, "N": summary}}; see the module docstring."""
    concurrency = (1, ctx.settings.parallel)
    for path in paths:  # untimed: first connections pay for lazy set-up (TLS session caches, imports...)
        store_once(ctx, path.bulk, ctx.workload.head(WARMUP_FILES), 1)
    seconds = {(p.key, c): [] for p in paths for c in concurrency}
    usage = {(p.key, c): [] for p in paths for c in concurrency}
    for run in range(ctx.settings.runs):
        for parallel in concurrency:
            for path in paths:
                elapsed, used = _one_run(ctx, path, parallel)
                seconds[path.key, parallel].append(elapsed)
                usage[path.key, parallel].append(used)
                rate = ctx.workload.total_bytes / MB / elapsed
                ctx.progress(f"throughput run {run + 1}/{ctx.settings.runs} {path.label:<26} x{parallel}: "
                             f"{rate:7.1f} MB/s ({elapsed:.2f} s)")
    return {p.key: {str(c): _summarize_runs(ctx, seconds[p.key, c], usage[p.key, c]) for c in concurrency}
            for p in paths}


class BulkLoad:
    """One storescu sending the workload through ``endpoint`` for as long as the block runs."""

    def __init__(self, ctx: BenchContext, endpoint: Endpoint) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.restarts = 0
        self._job: StoreJob | None = None

    def __enter__(self) -> BulkLoad:
        self._start()
        sink = self.ctx.sinks.bulk_dir
        wait_until(lambda: count_files(sink) > 0, 30, message=f"bulk load through port {self.endpoint.port}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._job is not None:
            self._job.stop()
        clear_dir(self.ctx.sinks.bulk_dir)

    def _start(self) -> None:
        clear_dir(self.ctx.sinks.bulk_dir)
        self._job = StoreJob(self.endpoint.port, self.endpoint.called_ae, [list(self.ctx.workload.files)],
                             self.ctx.log_dir / "bulkload").start()

    def keep_going(self) -> None:
        """Call between probes: restart the storescu if it has finished."""
        if self._job is not None and not self._job.running:
            self._job.stop()
            self.restarts += 1
            self._start()


def _latency(endpoint: Endpoint, count: int, between: Callable[[], None] | None = None) -> dict:
    times, errors = probe_series(endpoint, count, between=between)
    summary = latency_summary(times, failures=len(errors))
    if errors:
        summary["first_error"] = errors[0]
    return summary


def measure_latency(ctx: BenchContext, paths: Sequence[BenchPath]) -> dict[str, dict[str, dict]]:
    """{path key: {"idle": summary, "loaded": summary}} over ``latency_count`` probes each."""
    out: dict[str, dict[str, dict]] = {}
    count = ctx.settings.latency_count
    for path in paths:
        _latency(path.echo, 5)  # warm-up: first connections pay for lazy set-up in every program
        idle = _latency(path.echo, count)
        started = time.monotonic()
        with BulkLoad(ctx, path.bulk) as load:
            loaded = _latency(path.echo, count, between=load.keep_going)
            loaded["bulk_restarts"] = load.restarts
        loaded["seconds"] = round(time.monotonic() - started, 2)
        out[path.key] = {"idle": idle, "loaded": loaded}
        ctx.progress(f"latency {path.label:<26} idle p50/p99 {_ms(idle)}; under bulk load {_ms(loaded)}")
        if idle["n"] == 0:
            raise BenchError(f"every latency probe through {path.label} failed: {idle.get('first_error')}")
    return out


def _ms(summary: dict) -> str:
    if summary["n"] == 0:
        return "all failed"
    failed = f", {summary['failures']} failed" if summary["failures"] else ""
    return f"{summary['p50_ms']:.2f}/{summary['p99_ms']:.2f} ms{failed}"
