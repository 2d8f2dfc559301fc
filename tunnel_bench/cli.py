"""``python -m tunnel_bench``: run every measurement in one go and write the results.

Order of a run: generate the workload; the WireGuard row (its own namespaces, processes and sink, all
gone again before anything else starts); start the sinks and every path (direct, ``ssh -R``, stunnel
pair, our relay + agent); throughput (all paths, interleaved); latency idle and loaded (all paths);
idle associations and churn (our tunnel, fresh processes each); emulated WAN; then write
``results.json``, the PNG plots and ``README.md`` into the output directory and print the tables.
Every process started is ended by its PID in a ``finally`` (SIGTERM to this process included).
Exit status: 0 when every phase asked for ran (missed targets are results, not failures), 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from devkit.procs import ProcessTracker, StopFailed, raise_nofile_limit
from tunnel_bench.machine import describe_machine
from tunnel_bench.paths import direct_path, start_ssh_path, start_stunnel_path
from tunnel_bench.peers import generate_workload, start_sinks
from tunnel_bench.plots import write_plots
from tunnel_bench.readme import render_readme
from tunnel_bench.report import evaluate_targets, terminal_report, wireguard_measured, wireguard_report
from tunnel_bench.scale import measure_churn, measure_idle
from tunnel_bench.scenarios import BenchContext, Settings, measure_latency, measure_throughput
from tunnel_bench.tunnelstack import TunnelStack
from tunnel_bench.wan import measure_wan
from tunnel_bench.wgbench import measure_wireguard

__all__ = ["main", "settings_for"]

REPO = Path(__file__).resolve().parent.parent
PHASES = ("throughput", "latency", "idle", "churn", "wan", "wireguard")
NOFILE_WANTED = 65536


def settings_for(quick: bool, runs: int | None = None) -> Settings:
    """The amounts of a quick (CI, < 5 min) or a full run."""
    return Settings(
        mode="quick" if quick else "full", runs=runs or (1 if quick else 3), parallel=8, latency_count=200,
        idle_associations=1000, churn_rate=100, churn_seconds=10 if quick else 60, wan_rtts_ms=(20, 80),
        wan_rate_mbit=200.0, wan_instances=40 if quick else 150, wan_runs=1 if quick else 3,
        store_timeout_s=1800.0, wireguard_instances=100 if quick else 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tunnel_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-size run (~100 MB, 1 run each, < 5 min)")
    parser.add_argument("--prototype-set", action="store_true",
                        help="the issue's prototype shape: 13 studies, 40 MB to 1.9 GB, ~6 GB (slow)")
    parser.add_argument("--instances", type=int, help="CT instances of 512x512 (default 600; quick 200)")
    parser.add_argument("--runs", type=int, help="throughput runs per path (default 3; quick 1)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--out", type=Path, help="output directory (default docs/benchmarks; quick: "
                                                   "build/bench-quick)")
    parser.add_argument("--workdir", type=Path, help="where the workload and configs go (default: a new temp dir)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the work directory (logs) afterwards")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: redraw the plots and README.md from a results.json (into --out, "
                             "default: its directory), e.g. after adding ANALYSIS.md there")
    return parser


class _Progress:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.start)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)


def _sink_root() -> Path:
    """A tmpfs directory for what storescp receives, when one is available."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4e9 else None
    return Path(tempfile.mkdtemp(prefix="tunnel-bench-sink-", dir=base))


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that end our processes


def _phase(results: dict, name: str, progress: Callable[[str], None], run: Callable[[], dict]) -> None:
    """Run an optional phase; a failure is recorded in the results (and printed) and the run goes on."""
    progress(f"--- {name}")
    try:
        results[name] = run()
    except Exception as exc:  # recorded in results.json and printed with its traceback, never swallowed
        progress(f"{name} FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"


def _measure(args: argparse.Namespace, settings: Settings, workdir: Path, sink_root: Path,
             procs: ProcessTracker, progress: _Progress, results: dict) -> None:
    """Fill ``results`` phase by phase (so a failure leaves what was measured before it)."""
    phases = set(args.phases.split(","))
    instances = args.instances or (200 if args.quick else 600)
    progress("generating the workload" + (" (prototype shape, ~6 GB)" if args.prototype_set else ""))
    workload = generate_workload(workdir / "workload", instances=instances, prototype=args.prototype_set)
    results["workload"] = {"description": workload.description, "instances": len(workload.files),
                           "bytes": workload.total_bytes}
    progress(f"workload: {len(workload.files)} files, {workload.total_bytes / 1e6:.1f} MB")
    if "wireguard" in phases:
        wg_workload = workload.head(settings.wireguard_instances) if settings.wireguard_instances else workload
        _phase(results, "wireguard", progress, lambda: measure_wireguard(
            wg_workload, settings.runs, procs, workdir / "wireguard", sink_root / "wireguard", progress,
            settings.store_timeout_s))
    if not phases - {"wireguard"}:
        return
    progress("starting the paths")
    sinks = start_sinks(procs, sink_root)
    ctx = BenchContext(settings, workload, sinks, workdir / "logs", progress)
    stack = TunnelStack(procs, workdir / "tunnel", sinks, wan_sites=len(settings.wan_rtts_ms))
    stack.start()
    paths = [direct_path(sinks), start_ssh_path(procs, workdir / "ssh", sinks),
             start_stunnel_path(procs, workdir / "stunnel", sinks), stack.site_to_cloud(), stack.cloud_to_site()]
    results["paths"] = {p.key: {"label": p.label} for p in paths}
    if "throughput" in phases:
        progress("--- throughput")
        for key, value in measure_throughput(ctx, paths).items():
            results["paths"][key]["throughput"] = value
    if "latency" in phases:
        progress("--- latency")
        for key, value in measure_latency(ctx, paths).items():
            results["paths"][key]["latency"] = value
    if "idle" in phases:
        _phase(results, "idle", progress, lambda: measure_idle(ctx, stack))
    if "churn" in phases:
        _phase(results, "churn", progress, lambda: measure_churn(ctx, stack))
    if "wan" in phases:
        _phase(results, "wan", progress, lambda: measure_wan(ctx, procs, stack))


def _complete(results: dict) -> bool:
    """The tables need throughput and latency for every path."""
    paths = results.get("paths") or {}
    return bool(paths) and all("throughput" in p and "latency" in p for p in paths.values())


def _write(results: dict, out_dir: Path) -> list[str]:
    """results.json, plots and README.md; a partial run (a phase failed, or --phases left one out) writes
    results-partial.json only, so README.md and results.json of the last whole run stay consistent."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not _complete(results):
        (out_dir / "results-partial.json").write_text(json.dumps(results, indent=2) + "\n")
        return []
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = write_plots(results, out_dir)
    (out_dir / "README.md").write_text(render_readme(results, plots, out_dir))
    return plots


def _run(args: argparse.Namespace, settings: Settings, progress: _Progress) -> dict:
    """Measure, then end every process by PID and remove the temporary directories (the work dir and
    its logs are kept when something failed, or with --keep-workdir)."""
    nofile = raise_nofile_limit(NOFILE_WANTED)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
    sink_root = _sink_root()
    procs = ProcessTracker(workdir / "procs")
    progress(f"tunnel_bench {settings.mode}: work dir {workdir}, sink {sink_root}, "
             f"RLIMIT_NOFILE {nofile[0]} (inherited by every process started)")
    # The machine and the source as the programs are started from them (the tree may change during a run).
    results: dict = {"schema": 1, "command": _command(), "mode": settings.mode,
                     "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     "config": dict(vars(settings)), "nofile_limit": nofile[0], "machine": describe_machine()}
    try:
        _measure(args, settings, workdir, sink_root, procs, progress, results)
    except Exception as exc:  # the run stops here; what was measured is still written, with the error
        progress(f"run FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        results.setdefault("errors", {})["run"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            procs.stop_all()
        except StopFailed as exc:
            for ended in exc.ended:
                if ended.error is not None:
                    progress(f"could not end {ended}")
        shutil.rmtree(sink_root, ignore_errors=True)
        if args.keep_workdir or results.get("errors"):
            progress(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def _command() -> str:
    return "python -m tunnel_bench" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")


def _render(results_json: Path, out_dir: Path | None) -> int:
    results = json.loads(results_json.read_text())
    if not _complete(results):
        raise SystemExit(f"{results_json} is not a complete run; nothing to render")
    results["targets"] = evaluate_targets(results)
    print(terminal_report(results), flush=True)
    plots = _write(results, out_dir or results_json.parent)
    print(f"wrote results.json, README.md{''.join(f', {p}' for p in plots)} into {out_dir or results_json.parent}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.render:
        return _render(args.render, args.out)
    settings = settings_for(args.quick, args.runs)
    if args.prototype_set and not args.quick:  # issue 12: the seed-shaped set once through the spool
        settings = dataclasses.replace(settings, wan_whole_set=True)
    out_dir = args.out or REPO / ("build/bench-quick" if args.quick else "docs/benchmarks")
    progress = _Progress()
    signal.signal(signal.SIGTERM, _on_sigterm)
    results = _run(args, settings, progress)
    results["duration_s"] = round(time.monotonic() - progress.start, 1)
    if _complete(results):
        results["targets"] = evaluate_targets(results)
        print("\n" + terminal_report(results), flush=True)
    elif wireguard_measured(results):  # --phases wireguard alone: its table and target
        print("\n" + wireguard_report(results), flush=True)
    plots = _write(results, out_dir)
    written = "results.json, README.md" + "".join(f", {p}" for p in plots) if _complete(results) else \
        "results-partial.json"
    progress(f"wrote {written} into {out_dir}")
    return 1 if results.get("errors") else 0
