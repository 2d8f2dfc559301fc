"""Emulated WAN: single-association C-STORE through the delay proxy, direct against our tunnel.

For each RTT, two :mod:`tunnel_bench.wanproxy` processes emulate the same link (one-way delay RTT/2,
the same bandwidth in each direction): one between storescu and the bulk storescp (direct), one between
an agent of its own site and the relay's tunnel port (the agent's ``relay_url`` names the proxy), so
storescu -> agent listener -> [WAN] -> relay -> storescp. Every DIMSE exchange pays the round trip on
both paths; what differs is what the tunnel adds (windows, framing, head-of-line effects). A few
association set-ups are timed too: the tunnel's TCP and TLS are already up, a direct caller's are not.
The same is repeated with N parallel associations (no collapse with many streams): on the direct path
they are N TCP connections sharing the emulated link, through the tunnel N streams of one connection.

Spool mode (docs/spool.md) is the third path of the single-association runs: the same storescu to the WAN
agent's spool destination, timed twice, when storescu returns (the modality is done) and when the cloud
sink holds every instance (the forwarder's associations crossed the emulated link). Both are set against
the link's own bandwidth, the direct path and passthrough.
"""

from __future__ import annotations

import sys
import time

import psutil

from devkit.ports import LOOPBACK, free_ports
from devkit.procs import ProcessTracker
from devkit.programs import CHECKOUT
from devkit.waits import wait_for_port, wait_until
from tunnel_bench.paths import Endpoint
from tunnel_bench.peers import StoreJob, clear_dir, count_files
from tunnel_bench.probes import probe_series
from tunnel_bench.resources import ResourceSampler
from tunnel_bench.scenarios import BenchContext, store_once
from tunnel_bench.stats import MB, latency_summary, median, ratio, throughput
from tunnel_bench.tunnelstack import SPOOL_AE, TunnelStack

__all__ = ["measure_wan"]

WAN_PROBES = 20
SPOOL_PARALLEL = 8  # the spool destination's forwarding associations: the product's default


def _proxy(procs: ProcessTracker, name: str, target_port: int, delay_ms: float, rate_mbit: float) -> tuple:
    port = free_ports(1)[0]
    proc = procs.spawn([sys.executable, "-m", "tunnel_bench.wanproxy", "--listen-port", str(port),
                        "--target-port", str(target_port), "--delay-ms", str(delay_ms),
                        "--rate-mbit", str(rate_mbit)], name=name, cwd=CHECKOUT)
    wait_for_port(LOOPBACK, port, proc=proc)
    return port, proc


def _runs(ctx: BenchContext, rtt_ms: int, endpoints: dict[str, Endpoint], parallel: int) -> dict:
    """Median throughput of ``wan_runs`` interleaved runs per endpoint, in ``parallel`` associations."""
    workload = ctx.workload.head(ctx.settings.wan_instances)
    seconds: dict[str, list[float]] = {key: [] for key in endpoints}
    for run in range(ctx.settings.wan_runs):
        for key, endpoint in endpoints.items():
            elapsed = store_once(ctx, endpoint, workload, parallel)
            seconds[key].append(elapsed)
            ctx.progress(f"WAN {rtt_ms} ms RTT run {run + 1}/{ctx.settings.wan_runs} {key:<6} x{parallel}: "
                         f"{workload.total_bytes / MB / elapsed:6.1f} MB/s ({elapsed:.1f} s)")
    out = {key: {**throughput(workload.total_bytes, len(workload.files), median(times)),
                 "runs_s": [round(t, 3) for t in times]} for key, times in seconds.items()}
    out["ratio"] = ratio(out["tunnel"]["mb_s"], out["direct"]["mb_s"])
    return out


def _spool_once(ctx: BenchContext, port: int, files: list, expected: int,
                agent_pid: int) -> tuple[float, float, dict]:
    """(seconds until storescu returned, seconds until the sink held every instance, the agent's CPU
    seconds and peak RSS over the run) for one spool run."""
    sink = ctx.sinks.bulk_dir
    clear_dir(sink)
    started = time.perf_counter()
    with ResourceSampler({"agent": [psutil.Process(agent_pid)]}) as sampler:
        with StoreJob(port, SPOOL_AE, [files], ctx.log_dir / "storescu") as job:
            job.start().wait(ctx.settings.store_timeout_s)
        returned = time.perf_counter() - started
        wait_until(lambda: count_files(sink) >= expected, ctx.settings.store_timeout_s,
                   message=lambda: f"{expected} files in {sink} (have {count_files(sink)})")
        delivered = time.perf_counter() - started
    clear_dir(sink)
    return returned, delivered, sampler.result()["agent"]


def _spool_runs(ctx: BenchContext, rtt_ms: int, port: int, rate_mbit: float, agent_pid: int) -> dict:
    workload = ctx.workload.head(ctx.settings.wan_instances)
    returned, delivered, peak_rss = [], [], 0
    for run in range(ctx.settings.wan_runs):
        r, d, usage = _spool_once(ctx, port, list(workload.files), len(workload.files), agent_pid)
        returned.append(r)
        delivered.append(d)
        peak_rss = max(peak_rss, usage["peak_rss"])
        ctx.progress(f"WAN {rtt_ms} ms RTT run {run + 1}/{ctx.settings.wan_runs} spool  x1: storescu done in "
                     f"{r:.1f} s ({workload.total_bytes / MB / r:6.1f} MB/s), cloud holds all after {d:.1f} s "
                     f"({workload.total_bytes / MB / d:6.1f} MB/s)")
    link_mb_s = rate_mbit * 1e6 / 8 / MB
    at_cloud = throughput(workload.total_bytes, len(workload.files), median(delivered))
    return {"returned": {**throughput(workload.total_bytes, len(workload.files), median(returned)),
                         "runs_s": [round(t, 3) for t in returned]},
            "delivered": {**at_cloud, "runs_s": [round(t, 3) for t in delivered]},
            "link_mb_s": round(link_mb_s, 3), "of_link": ratio(at_cloud["mb_s"], link_mb_s),
            "agent_peak_rss": peak_rss, "forwarding_associations": SPOOL_PARALLEL}


def _whole_set(ctx: BenchContext, rtt_ms: int, port: int, rate_mbit: float, agent_pid: int) -> dict:
    """The whole workload (the prototype's ~6 GB) once into the spool: against size / bandwidth."""
    workload = ctx.workload
    returned, delivered, usage = _spool_once(ctx, port, list(workload.files), len(workload.files), agent_pid)
    ideal = workload.total_bytes / (rate_mbit * 1e6 / 8)
    ctx.progress(f"WAN {rtt_ms} ms RTT whole set into the spool: {workload.total_bytes / MB:.0f} MB, storescu "
                 f"done in {returned:.0f} s, cloud holds all after {delivered:.0f} s (size / bandwidth "
                 f"{ideal:.0f} s)")
    return {"instances": len(workload.files), "bytes": workload.total_bytes, "returned_s": round(returned, 3),
            "delivered_s": round(delivered, 3), "ideal_s": round(ideal, 3), "of_ideal": ratio(delivered, ideal),
            "agent_peak_rss": usage["peak_rss"], "agent_cpu_s": usage["cpu_s"]}


def _point(ctx: BenchContext, rtt_ms: int, direct: Endpoint, tunnel: Endpoint, rate_mbit: float,
           agent_pid: int) -> dict:
    endpoints = {"direct": direct, "tunnel": tunnel}
    workload = ctx.workload.head(ctx.settings.wan_instances)
    parallel = ctx.settings.parallel
    point = {"rtt_ms": rtt_ms, "instances": len(workload.files), "bytes": workload.total_bytes,
             **_runs(ctx, rtt_ms, endpoints, 1),
             "spool": _spool_runs(ctx, rtt_ms, tunnel.port, rate_mbit, agent_pid),
             "parallel": {"associations": parallel, **_runs(ctx, rtt_ms, endpoints, parallel)}}
    if ctx.settings.wan_whole_set and rtt_ms == max(ctx.settings.wan_rtts_ms):
        point["spool_whole_set"] = _whole_set(ctx, rtt_ms, tunnel.port, rate_mbit, agent_pid)
    spool_mb_s = point["spool"]["delivered"]["mb_s"]
    point["spool"]["vs_direct"] = ratio(spool_mb_s, point["direct"]["mb_s"])
    point["spool"]["vs_passthrough"] = ratio(spool_mb_s, point["tunnel"]["mb_s"])
    for key, endpoint in endpoints.items():
        times, errors = probe_series(endpoint, WAN_PROBES)
        point[key]["association"] = latency_summary(times, len(errors))
    return point


def measure_wan(ctx: BenchContext, procs: ProcessTracker, stack: TunnelStack) -> dict:
    """{"rate_mbit", "points": [{rtt_ms, direct, tunnel, ratio, parallel: {direct, tunnel, ratio}}]}."""
    rate = ctx.settings.wan_rate_mbit
    points = []
    for index, rtt_ms in enumerate(ctx.settings.wan_rtts_ms):
        delay = rtt_ms / 2
        direct_port, direct_proxy = _proxy(procs, f"wanproxy-direct-{rtt_ms}", ctx.sinks.bulk_port, delay, rate)
        tunnel_port, tunnel_proxy = _proxy(procs, f"wanproxy-tunnel-{rtt_ms}", stack.tunnel_port, delay, rate)
        agent = stack.wan_agent(index, tunnel_port)
        try:
            stack.start_agent(agent)
            points.append(_point(ctx, rtt_ms, Endpoint(direct_port, "SINK"),
                                 Endpoint(agent.listener_port, "CLOUD"), rate, agent.proc.pid))
        finally:
            stack.stop_agent(agent)
            procs.stop(tunnel_proxy)
            procs.stop(direct_proxy)
    return {"rate_mbit": rate, "points": points}
