"""What relay and agent both expose on ``GET /metrics``: Prometheus families built at scrape time.

Theory of operation: nothing here counts anything. Each program keeps its own state (the
``AssociationTracker``, its sessions, the agent's health report) and a custom collector turns a snapshot
of that state into metric families when Prometheus scrapes, on the event loop's thread, so there is no
locking and no per-association or per-byte cost beyond the tracker's own counters. Each program has its
own ``CollectorRegistry`` (not prometheus_client's global one), so importing this never registers
anything behind anyone's back, and two programs in one test process do not mix.

Labels are bounded, operator-chosen names only: site, route, direction, outcome, way, condition, state.
No AE title becomes a label (a caller chooses its calling AE, so that would be unbounded), and nothing
derived from a DICOM dataset (patient names, IDs, UIDs) is ever read here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from tunnel_core.health import DestinationReport, HostReport
from tunnel_link.associations import AssociationTracker

__all__ = [
    "PREFIX",
    "association_families",
    "destination_families",
    "host_families",
    "metrics_handler",
    "new_registry",
    "tasks_family",
]

PREFIX = "dicom_tunnel"


def new_registry(collector: object) -> CollectorRegistry:
    """A registry of its own holding ``collector`` and the standard ``process_*`` metrics of this process
    (resident memory, open and max file descriptors, CPU seconds, start time; Linux /proc)."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def metrics_handler(registry: CollectorRegistry):
    """An aiohttp handler serving ``registry`` in the Prometheus text format. It collects on the event
    loop's thread, which is the only thread that touches the programs' state."""

    async def handle(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle


def association_families(tracker: AssociationTracker) -> Iterator[Metric]:
    """Ended associations by (direction, outcome), their bytes each way, their durations; active ones."""
    totals = CounterMetricFamily(
        f"{PREFIX}_associations", "Associations (and connections refused before one) by direction and outcome",
        labels=["direction", "outcome"])
    for (direction, outcome), n in sorted(tracker.totals.items()):
        totals.add_metric([direction, outcome], n)
    yield totals
    carried = CounterMetricFamily(
        f"{PREFIX}_association_bytes", "DICOM bytes of ended associations, from and to the calling side",
        labels=["direction", "way"])
    for (direction, way), n in sorted(tracker.bytes_total.items()):
        carried.add_metric([direction, way], n)
    yield carried
    durations = HistogramMetricFamily(
        f"{PREFIX}_association_duration_seconds", "How long ended associations lasted", labels=["direction"])
    for direction, hist in sorted(tracker.durations.items()):
        buckets = [(_le(bound), n) for bound, n in hist.cumulative()]
        durations.add_metric([direction], buckets, sum_value=hist.sum)
    yield durations


def destination_families(rows: Iterable[tuple[Sequence[str], DestinationReport]],
                         labels: Sequence[str]) -> Iterator[Metric]:
    """C-ECHO results of destinations behind an agent. ``rows``: (label values before the route name, a
    destination of the health report). A destination not checked yet (``ok`` is None) has no sample,
    rather than a misleading 0."""
    names = [*labels, "route"]
    ok = GaugeMetricFamily(f"{PREFIX}_destination_echo_ok", "1 if the latest C-ECHO of the destination "
                           "succeeded, 0 if it failed", labels=names)
    latency = GaugeMetricFamily(f"{PREFIX}_destination_echo_latency_seconds",
                                "Round trip of the latest successful C-ECHO", labels=names)
    success = GaugeMetricFamily(f"{PREFIX}_destination_last_success_timestamp_seconds",
                                "When the destination last answered a C-ECHO (Unix time)", labels=names)
    failure = GaugeMetricFamily(f"{PREFIX}_destination_last_failure_timestamp_seconds",
                                "When a C-ECHO of the destination last failed (Unix time)", labels=names)
    for before, dest in rows:
        values = [*before, dest.route]
        if dest.ok is not None:
            ok.add_metric(values, 1.0 if dest.ok else 0.0)
        _add(latency, values, dest.latency_ms, scale=0.001)
        _add(success, values, dest.last_success)
        _add(failure, values, dest.last_failure)
    yield from (ok, latency, success, failure)


def host_families(rows: Iterable[tuple[Sequence[str], HostReport]], labels: Sequence[str]) -> Iterator[Metric]:
    """The agent's host metrics of a health report (cpu, memory, free disk, rss, fds)."""
    specs = (
        ("cpu_percent", "agent_host_cpu_percent", "CPU use of the agent's host, percent"),
        ("memory_percent", "agent_host_memory_percent", "Memory use of the agent's host, percent"),
        ("disk_free_bytes", "agent_disk_free_bytes", "Free space on the agent's state directory's disk"),
        ("rss_bytes", "agent_resident_memory_bytes", "Resident memory of the agent process"),
        ("open_fds", "agent_open_fds", "Open file descriptors of the agent process"),
    )
    families = [(key, GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))) for key, name, doc in specs]
    for values, host in rows:
        for key, family in families:
            _add(family, list(values), getattr(host, key))
    yield from (family for _, family in families)


def tasks_family(tasks: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_asyncio_tasks", "asyncio tasks of this process (leak hunting)",
                             value=tasks)


def _add(family: GaugeMetricFamily, values: list[str], number: object, scale: float = 1.0) -> None:
    if isinstance(number, int | float) and not isinstance(number, bool):
        family.add_metric(values, float(number) * scale)


def _le(bound: float) -> str:
    return floatToGoString(bound)  # "+Inf" and Go's float spelling, as prometheus_client's own histograms
