"""Many associations through our tunnel: memory per idle association, and leaks under churn.

Both run against fresh relay and agent processes (restarted, then warmed up with a few associations),
so memory freed by earlier bulk transfers cannot hide what associations cost. Associations alternate
between the two directions (relay listener -> agent -> accept-all SCP, and agent listener -> relay ->
accept-all SCP). Readings of RSS, open descriptors and asyncio tasks come from each program's
``/api/status`` ``process`` object (psutil on the PID, tasks n/a, if a build has none).

- idle: open N associations and keep them open; per association = (relay + agent RSS with N open -
  RSS before) / N. Then release them all and wait for descriptors and tasks to return to baseline.
- churn: start associations at a fixed rate for a fixed time, each released right after its
  A-ASSOCIATE-AC; RSS is sampled every second. "Growth" is RSS at the end minus RSS at half time
  (warm-up excluded); descriptors and tasks must be back to their baseline once it is over.
"""

from __future__ import annotations

import asyncio

import psutil

from devkit.waits import wait_until
from tunnel_bench.probes import churn, hold_idle, release_all
from tunnel_bench.resources import Snapshot, snapshot, wait_settled
from tunnel_bench.scenarios import BenchContext
from tunnel_bench.stats import latency_summary
from tunnel_bench.tunnelstack import TunnelStack

__all__ = ["measure_churn", "measure_idle"]

SETTLE_TIMEOUT_S = 20.0
WARMUP_ASSOCIATIONS = 20
ROLES = ("relay", "agent")


def _snapshots(stack: TunnelStack) -> dict[str, Snapshot]:
    handles = {"relay": stack.relay, "agent": stack.agent}
    return {role: snapshot(handles[role].proc.pid, handles[role].status) for role in ROLES}


def _total_rss(snaps: dict[str, Snapshot]) -> int:
    return sum(snaps[role]["rss"] for role in ROLES)


def _warm_up(stack: TunnelStack) -> None:
    async def run() -> None:
        held = await hold_idle(stack.accept_endpoints(), WARMUP_ASSOCIATIONS)
        await release_all(held)

    asyncio.run(run())
    wait_until(lambda: _active_on_relay(stack) == 0, SETTLE_TIMEOUT_S, message="warm-up associations to end")


def _active_on_relay(stack: TunnelStack) -> int:
    return len(stack.relay.status().get("associations", []))


async def _idle_phase(ctx: BenchContext, stack: TunnelStack) -> dict:
    count = ctx.settings.idle_associations
    held = await hold_idle(stack.accept_endpoints(), count)
    open_now = len(held.streams)
    during = await asyncio.to_thread(_snapshots, stack)
    relay_active = await asyncio.to_thread(_active_on_relay, stack)
    release_failures = await release_all(held)
    return {"requested": count, "established": open_now, "open_failures": len(held.errors),
            "first_error": held.errors[0] if held.errors else None, "relay_active": relay_active,
            "during": during, "release_failures": release_failures}


def measure_idle(ctx: BenchContext, stack: TunnelStack) -> dict:
    """Memory per idle association through the tunnel (relay + agent), and the return to baseline."""
    stack.restart()
    _warm_up(stack)
    before = _snapshots(stack)
    phase = asyncio.run(_idle_phase(ctx, stack))
    after, settle_s = wait_settled(lambda: _snapshots(stack), before, SETTLE_TIMEOUT_S)
    established = phase["established"]
    delta = _total_rss(phase["during"]) - _total_rss(before)
    result = {**phase, "before": before, "after": after, "settle_s": round(settle_s, 2),
              "rss_delta": delta, "bytes_per_association": round(delta / established) if established else None}
    per = result["bytes_per_association"]
    ctx.progress(f"idle: {established}/{phase['requested']} associations open, "
                 f"{'n/a' if per is None else f'{per / 1024:.1f} KiB'} per association (relay+agent)")
    return result


def _rss_now(pids: dict[str, int]) -> dict[str, int]:
    return {role: psutil.Process(pid).memory_info().rss for role, pid in pids.items()}


def measure_churn(ctx: BenchContext, stack: TunnelStack) -> dict:
    """Associations at ``churn_rate``/s for ``churn_seconds``: RSS, descriptors and tasks before/after."""
    stack.restart()
    _warm_up(stack)
    settings = ctx.settings
    pids = {"relay": stack.relay.proc.pid, "agent": stack.agent.proc.pid}
    before = _snapshots(stack)
    series: list[dict] = []

    def sample(second: int) -> None:
        series.append({"t": second, **_rss_now(pids)})
        if second and second % 10 == 0:
            ctx.progress(f"churn: {second}/{settings.churn_seconds} s")

    run = asyncio.run(churn(stack.accept_endpoints(), settings.churn_rate, settings.churn_seconds,
                            on_second=sample))
    series.append({"t": round(run.elapsed_s, 1), **_rss_now(pids)})
    after, settle_s = wait_settled(lambda: _snapshots(stack), before, SETTLE_TIMEOUT_S)
    result = _churn_result(run, series, before, after, settle_s)
    ctx.progress(f"churn: {run.completed}/{run.attempted} associations at {result['achieved_rate']}/s; "
                 f"fds {result['fds_back']}, tasks {result['tasks_back']}, "
                 f"RSS growth second half {result['rss_growth_second_half'] / 1024:.0f} KiB")
    return result


def _churn_result(run, series: list[dict], before: dict, after: dict, settle_s: float) -> dict:
    mid, end = series[len(series) // 2], series[-1]
    growth = sum(end[r] - mid[r] for r in ROLES)
    tasks_known = all(before[r]["tasks"] is not None and after[r]["tasks"] is not None for r in ROLES)
    return {
        "attempted": run.attempted, "completed": run.completed, "skipped": run.skipped,
        "failures": len(run.errors), "first_error": run.errors[0] if run.errors else None,
        "elapsed_s": round(run.elapsed_s, 2), "achieved_rate": round(run.completed / run.elapsed_s, 1),
        "latency": latency_summary(run.durations, len(run.errors)),
        "before": before, "after": after, "settle_s": round(settle_s, 2), "rss_series": series,
        "rss_growth_total": _total_rss(after) - _total_rss(before), "rss_growth_second_half": growth,
        "fds_back": all(after[r]["fds"] <= before[r]["fds"] for r in ROLES),
        "tasks_back": all(after[r]["tasks"] <= before[r]["tasks"] for r in ROLES) if tasks_known else None,
    }
