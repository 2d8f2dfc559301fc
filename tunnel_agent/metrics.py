"""The agent's Prometheus metrics: ``GET /metrics`` on its status port, read from live state at scrape time.

:class:`AgentCollector` takes one :class:`~tunnel_agent.status.AgentStatus` snapshot per scrape (the same
one ``/api/status`` shows): the tunnel's state, RTT and reconnects, the certificate's expiry and renewal,
and — when the agent measures its destinations (the health report it sends the relay) — each
destination's C-ECHO result and the host's metrics; plus the association tracker's counters. The status
port listens on loopback by default and, like ``/api/status`` beside it, needs no credentials; what it
shows is counts, times and route names, never patient data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tunnel_agent.spool.service import DestinationStatus
from tunnel_agent.status import AgentStatus, TransportStatus
from tunnel_core.health import AgentState
from tunnel_link.associations import AssociationTracker
from tunnel_runtime.metrics import (
    PREFIX,
    association_families,
    destination_families,
    host_families,
    metrics_handler,
    new_registry,
    tasks_family,
)

__all__ = ["AgentCollector", "handler", "registry_for"]

Snapshot = Callable[[], AgentStatus]


def registry_for(snapshot: Snapshot, tracker: AssociationTracker) -> CollectorRegistry:
    """A registry of the agent's own metrics and the process's ``process_*`` metrics."""
    return new_registry(AgentCollector(snapshot, tracker))


def handler(snapshot: Snapshot, tracker: AssociationTracker):
    """The aiohttp handler for ``GET /metrics`` on the status port."""
    return metrics_handler(registry_for(snapshot, tracker))


class AgentCollector(Collector):
    """Collect at scrape time; call only on the agent's event loop (aiohttp handlers are)."""

    def __init__(self, snapshot: Snapshot, tracker: AssociationTracker) -> None:
        self.snapshot = snapshot
        self.tracker = tracker

    def collect(self) -> Iterator[Metric]:
        status = self.snapshot()
        yield from _tunnel_families(status)
        yield from association_families(self.tracker)
        yield from _certificate_families(status)
        health = status.health
        yield from destination_families((([], d) for d in (health.destinations if health else ())), [])
        yield from host_families([([], health.host)] if health else [], [])
        yield from _transport_families(status.transport)
        yield from _spool_families(status.spool)
        yield tasks_family(status.process.tasks)


# (name, kind, help, field of DestinationStatus): one sample per spool destination. Documented alerts
# (docs/spool.md): oldest age above what the link should take, quarantine non-empty, bytes near the limit.
_SPOOL = (
    ("spool_instances", GaugeMetricFamily, "Instances held in the spool, not yet delivered", "instances"),
    ("spool_bytes", GaugeMetricFamily, "Bytes held in the spool, not yet delivered", "bytes"),
    ("spool_oldest_age_seconds", GaugeMetricFamily, "Age of the oldest instance still held", "oldest_age"),
    ("spool_in_flight", GaugeMetricFamily, "Instances being forwarded now", "in_flight"),
    ("spool_forwarded", CounterMetricFamily, "Instances delivered since the agent started", "forwarded"),
    ("spool_forwarded_bytes", CounterMetricFamily, "Dataset bytes delivered since the agent started",
     "forwarded_bytes"),
    ("spool_retries", CounterMetricFamily, "Instances put back for a later try since the spool opened", "retries"),
    ("spool_quarantined", GaugeMetricFamily, "Instances in quarantine (the destination refused them for good)",
     "quarantined"),
    ("spool_quarantined_bytes", GaugeMetricFamily, "Bytes in quarantine", "quarantined_bytes"),
    ("spool_possible_duplicates", GaugeMetricFamily, "Instances in flight at the last crash, sent again",
     "possible_duplicates"),
    ("spool_forwarding_associations", GaugeMetricFamily, "Forwarding associations open now",
     "associations_active"),
)


def _spool_families(destinations: tuple[DestinationStatus, ...]) -> Iterator[Metric]:
    if not destinations:
        return
    for name, kind, doc, field in _SPOOL:
        family = kind(f"{PREFIX}_{name}", doc, labels=["destination"])
        for destination in destinations:
            value = getattr(destination, field)
            if value is not None:
                family.add_metric([destination.name], value)
        yield family


def _transport_families(transport: TransportStatus) -> Iterator[Metric]:
    """Which transport carries the tunnel and, with WireGuard, its handshake age and bytes (wg show dump)."""
    if transport.transport is not None:
        yield _labelled(f"{PREFIX}_transport", "1 for the transport carrying the tunnel now", "transport",
                        transport.transport)
    wg = transport.wireguard
    if wg is None:
        return
    age = GaugeMetricFamily(f"{PREFIX}_wireguard_handshake_age_seconds", "Seconds since the latest WireGuard "
                            "handshake with the relay")
    if wg.latest_handshake_age_s is not None:
        age.add_metric([], wg.latest_handshake_age_s)
    yield age
    transfer = CounterMetricFamily(f"{PREFIX}_wireguard_transfer_bytes", "Bytes through the WireGuard peer",
                                   labels=["way"])
    for way, value in (("rx", wg.rx_bytes), ("tx", wg.tx_bytes)):
        if value is not None:
            transfer.add_metric([way], value)
    yield transfer


def _labelled(name: str, doc: str, label: str, value: str) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=[label])
    family.add_metric([value], 1.0)
    return family


def _tunnel_families(status: AgentStatus) -> Iterator[Metric]:
    yield GaugeMetricFamily(f"{PREFIX}_ready", "1 when the agent's tunnel is up (see readiness)",
                            value=1.0 if status.readiness.ready else 0.0)
    yield GaugeMetricFamily(f"{PREFIX}_connected", "1 while the tunnel to the relay is up",
                            value=1.0 if status.state is AgentState.CONNECTED else 0.0)
    # One 0/1 sample per state, so a dashboard can stack them. "revoked" and "refused": the relay refused
    # this site (tunnel_core.refusal); the agent waits long before asking again.
    states = GaugeMetricFamily(f"{PREFIX}_state", "1 for the tunnel's current state, 0 for the others",
                               labels=["state"])
    for state in AgentState:
        states.add_metric([state.value], 1.0 if state is status.state else 0.0)
    yield states
    if status.rtt_ms is not None:
        yield GaugeMetricFamily(f"{PREFIX}_rtt_seconds", "Tunnel round trip (heartbeat) to the relay",
                                value=status.rtt_ms / 1000)
    yield CounterMetricFamily(f"{PREFIX}_connects", "Tunnels opened to the relay since the agent started",
                              value=status.connects)
    yield CounterMetricFamily(f"{PREFIX}_reconnects", "Tunnels opened after the first one",
                              value=status.reconnects)
    yield GaugeMetricFamily(f"{PREFIX}_active_associations", "Associations in progress through the tunnel",
                            value=len(status.associations))
    yield GaugeMetricFamily(f"{PREFIX}_active_streams", "Open mux streams of the tunnel",
                            value=status.active_streams)
    yield GaugeMetricFamily(f"{PREFIX}_tunnels_live", "Tunnels to relays up and taking new streams "
                            "(the primary and, with [fleet] tunnels above 1, those to other relays)",
                            value=status.live_tunnels)


def _certificate_families(status: AgentStatus) -> Iterator[Metric]:
    if status.certificate_not_after is not None:
        yield GaugeMetricFamily(f"{PREFIX}_certificate_expiry_timestamp_seconds",
                                "When the agent's certificate expires (Unix time)",
                                value=status.certificate_not_after)
    yield CounterMetricFamily(f"{PREFIX}_certificate_renewals", "Certificate renewals since the agent started",
                              value=status.renewals)
    yield GaugeMetricFamily(f"{PREFIX}_certificate_renewal_failing", "1 while the latest renewal attempt failed",
                            value=1.0 if status.renewal_error else 0.0)
