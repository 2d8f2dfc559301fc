"""PNG plots of the results (matplotlib, Agg backend): throughput, latency, WAN, CPU per GB."""

from __future__ import annotations

from pathlib import Path

from tunnel_bench.report import PATH_ORDER

__all__ = ["write_plots"]

COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, labels: list[str], series: dict[str, list[float | None]], *, fmt: str = "{:.0f}") -> None:
    """Grouped bars: one group per label, one bar per series, each bar annotated with its value."""
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        xs = [i + (index - (len(series) - 1) / 2) * width for i in range(len(labels))]
        heights = [v or 0 for v in values]
        bars = ax.bar(xs, heights, width, label=name, color=COLORS[index % len(COLORS)])
        for bar, value in zip(bars, values, strict=True):
            if value is not None:
                ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _headroom(ax, values: list[float | None]) -> None:
    """Linear y axis from 0 with 30% room above the tallest bar for the legend."""
    ax.set_ylim(0, max([v or 0 for v in values] + [1e-9]) * 1.3)


def _path_keys(results: dict) -> list[str]:
    return [k for k in PATH_ORDER if k in results["paths"]]


def _labels(results: dict) -> list[str]:
    return [results["paths"][k]["label"].replace(", ", "\n") for k in _path_keys(results)]


def _throughput(plt, results: dict, out: Path) -> None:
    n = str(results["config"]["parallel"])
    keys = _path_keys(results)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    series = {"1 association": [results["paths"][k]["throughput"]["1"]["mb_s"] for k in keys],
              f"{n} associations": [results["paths"][k]["throughput"][n]["mb_s"] for k in keys]}
    _bars(ax, _labels(results), series)
    _headroom(ax, [v for values in series.values() for v in values])
    ax.set_ylabel("MB/s (median)")
    ax.set_title(f"C-STORE throughput, dcmtk storescu -> storescp ({results['workload']['bytes'] / 1e6:.0f} MB)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _latency(plt, results: dict, out: Path) -> None:
    keys = _path_keys(results)
    lat = [results["paths"][k]["latency"] for k in keys]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    _bars(ax, _labels(results), {
        "idle p50": [x["idle"]["p50_ms"] for x in lat], "idle p99": [x["idle"]["p99_ms"] for x in lat],
        "loaded p50": [x["loaded"]["p50_ms"] for x in lat], "loaded p99": [x["loaded"]["p99_ms"] for x in lat]},
        fmt="{:.2g}")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8, label="target: idle p50 <= 1 ms")
    ax.axhline(5.0, color="black", linestyle=":", linewidth=0.8, label="target: idle p99 <= 5 ms")
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.set_yscale("log")
    highest = max(v for x in lat for kind in ("idle", "loaded") for v in (x[kind]["p99_ms"] or 0, 1.0))
    ax.set_ylim(top=highest * 8)  # room for the legend above the bars
    ax.set_ylabel("ms (log scale)")
    ax.set_title(f"Association set-up + release, {results['config']['latency_count']} sequential "
                 "(loaded: during a bulk storescu on the same path)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _wan(plt, results: dict, out: Path) -> None:
    points = results["wan"]["points"]
    n = results["config"]["parallel"]
    series = {"direct, 1 assoc": [p["direct"]["mb_s"] for p in points],
              "tunnel, 1 assoc": [p["tunnel"]["mb_s"] for p in points]}
    if all("parallel" in p for p in points):
        series[f"direct, {n} assoc"] = [p["parallel"]["direct"]["mb_s"] for p in points]
        series[f"tunnel, {n} assoc"] = [p["parallel"]["tunnel"]["mb_s"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4))
    _bars(ax, [f"{p['rtt_ms']} ms RTT" for p in points], series, fmt="{:.1f}")
    _headroom(ax, [v for values in series.values() for v in values])
    ax.set_ylabel("MB/s")
    ax.set_title(f"Emulated WAN at {results['wan']['rate_mbit']:.0f} Mbit/s (tunnel: proxy between agent "
                 "and relay)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _cpu(plt, results: dict, out: Path) -> None:
    n = str(results["config"]["parallel"])
    keys = [k for k in _path_keys(results) if results["paths"][k]["throughput"]["1"]["resources"]]
    labels = [results["paths"][k]["label"].replace(", ", "\n") for k in keys]

    def total(key: str, conc: str) -> float:
        return sum(r["cpu_s_per_gb"] for r in results["paths"][key]["throughput"][conc]["resources"].values())

    fig, ax = plt.subplots(figsize=(8, 4))
    series = {"1 association": [total(k, "1") for k in keys], f"{n} associations": [total(k, n) for k in keys]}
    _bars(ax, labels, series, fmt="{:.2f}")
    _headroom(ax, [v for values in series.values() for v in values])
    ax.set_ylabel("CPU seconds per GB moved")
    ax.set_title("CPU of the tunnel's own processes (sshd+ssh, both stunnels, relay+agent)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_plots(results: dict, out_dir: Path) -> list[str]:
    """Write the PNGs into ``out_dir``; returns their file names (empty if matplotlib is missing)."""
    try:
        plt = _pyplot()
    except ImportError:
        return []
    written = []
    for name, draw, needed in (("throughput.png", _throughput, "paths"), ("latency.png", _latency, "paths"),
                               ("cpu.png", _cpu, "paths"), ("wan.png", _wan, "wan")):
        if results.get(needed):
            draw(plt, results, out_dir / name)
            written.append(name)
    return written
