"""The relay's Prometheus metrics: ``GET /metrics`` on the admin port, read from live state at scrape time.

:class:`RelayCollector` takes one :class:`~relay.status.RelayStatus` snapshot per scrape (the same one the
JSON API and the dashboard show, including each site's up/degraded/down decision of ``tunnel_core.health``)
plus the association tracker's counters, and the agents' health reports for the C-ECHO results of the
destinations behind them and their host metrics. Report-derived series exist only while the site is
connected: a stale "echo ok" of a site that is gone would mislead; ``dicom_tunnel_site_up`` says it is
gone.

With the relay's guards (``relay.guard``), ``dicom_tunnel_throttled_total{endpoint="enroll"|"login"}`` counts
requests refused by a rate limit (429, not processed) and ``dicom_tunnel_admin_misdirected_total`` requests
to the admin port refused for their Host header.

``/metrics`` needs no admin token, like ``/healthz``: the admin port listens on loopback by default
(expose it only to the scraper), and what it shows is counts, times and names of sites, routes,
directions and outcomes — no patient data, no secrets, nothing that changes the relay. The admin
token guards ``/api/`` only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.guard import RelayGuards
from relay.status import RelayStatus, SiteStatus
from tunnel_core.health import Condition, Readiness
from tunnel_link.associations import AssociationTracker
from tunnel_link.gate import GatedTlsServer
from tunnel_runtime.metrics import (
    PREFIX,
    association_families,
    destination_families,
    host_families,
    metrics_handler,
    new_registry,
    tasks_family,
)


class StatusReader(Protocol):
    """What the collector reads of the relay (``relay.status.StatusSource``)."""

    def snapshot(self) -> RelayStatus: ...

    def readiness(self) -> Readiness: ...

    def registry_up(self) -> bool: ...


def registry_for(status: StatusReader, tracker: AssociationTracker, guards: RelayGuards | None = None,
                 gate: GatedTlsServer | None = None) -> CollectorRegistry:
    """A registry of the relay's own metrics and the process's ``process_*`` metrics."""
    return new_registry(RelayCollector(status, tracker, guards, gate))


def handler(status: StatusReader, tracker: AssociationTracker, guards: RelayGuards | None = None,
            gate: GatedTlsServer | None = None):
    """The aiohttp handler for ``GET /metrics`` (the composition root routes it on the admin port)."""
    return metrics_handler(registry_for(status, tracker, guards, gate))


class RelayCollector(Collector):
    """Collect at scrape time; call only on the relay's event loop (aiohttp handlers are). Without
    ``guards`` the throttle and Host-refusal counters are left out; without ``gate`` the tunnel port's."""

    def __init__(self, status: StatusReader, tracker: AssociationTracker, guards: RelayGuards | None = None,
                 gate: GatedTlsServer | None = None) -> None:
        self.status = status
        self.tracker = tracker
        self.guards = guards
        self.gate = gate

    def collect(self) -> Iterator[Metric]:
        status = self.status.snapshot()
        yield GaugeMetricFamily(f"{PREFIX}_ready", "1 when the relay is ready to take traffic (see /readyz)",
                                value=1.0 if self.status.readiness().ready else 0.0)
        yield GaugeMetricFamily(f"{PREFIX}_registry_up", "1 while the registry's database answered the relay's "
                                "last call (the sweep asks every second)",
                                value=1.0 if self.status.registry_up() else 0.0)
        yield from _site_families(status)
        yield from association_families(self.tracker)
        # Report-derived series only while the site is connected: a stale "echo ok" would mislead.
        reporting = [s for s in status.sites if s.connected and s.health is not None]
        yield from destination_families((([s.name], d) for s in reporting for d in s.health.destinations), ["site"])
        yield from host_families((([s.name], s.health.host) for s in reporting), ["site"])
        yield from _report_families(reporting)
        yield from _wireguard_families(status.sites)
        if self.guards is not None:
            yield from _guard_families(self.guards)
        if self.gate is not None:
            yield from _gate_families(self.gate)
        yield tasks_family(status.process.tasks)


def _site_families(status: RelayStatus) -> Iterator[Metric]:
    up = GaugeMetricFamily(f"{PREFIX}_site_up", "1 while the site's agent has a tunnel to the relay",
                           labels=["site"])
    condition = GaugeMetricFamily(f"{PREFIX}_site_condition", "1 for the site's current condition "
                                  "(up, degraded, down), 0 for the others", labels=["site", "condition"])
    rtt = GaugeMetricFamily(f"{PREFIX}_rtt_seconds", "Tunnel round trip (heartbeat) to the site's agent",
                            labels=["site"])
    associations = GaugeMetricFamily(f"{PREFIX}_active_associations", "Associations in progress through "
                                     "the site's tunnel", labels=["site"])
    streams = GaugeMetricFamily(f"{PREFIX}_active_streams", "Open mux streams of the site's tunnel",
                                labels=["site"])
    connects = CounterMetricFamily(f"{PREFIX}_connects", "Tunnels the site's agent opened since the relay "
                                   "started", labels=["site"])
    expiry = GaugeMetricFamily(f"{PREFIX}_certificate_expiry_timestamp_seconds", "When the certificate of "
                               "the site's live tunnel expires (Unix time)", labels=["site"])
    ignored = CounterMetricFamily(f"{PREFIX}_reports_ignored", "Health reports from the site's agent that did "
                                  "not parse and were ignored", labels=["site"])
    active: dict[str, int] = {}
    for assoc in status.associations:
        if assoc.site:
            active[assoc.site] = active.get(assoc.site, 0) + 1
    for s in status.sites:
        up.add_metric([s.name], 1.0 if s.connected else 0.0)
        for c in Condition:
            condition.add_metric([s.name, c.value], 1.0 if s.condition is c else 0.0)
        if s.rtt_ms is not None:
            rtt.add_metric([s.name], s.rtt_ms / 1000)
        associations.add_metric([s.name], active.get(s.name, 0))
        streams.add_metric([s.name], s.active_streams)
        connects.add_metric([s.name], s.connects)
        if s.certificate_not_after is not None:
            expiry.add_metric([s.name], s.certificate_not_after)
        ignored.add_metric([s.name], s.reports_ignored)
    yield from (up, condition, rtt, associations, streams, connects, expiry, ignored)


def _wireguard_families(sites: Sequence[SiteStatus]) -> Iterator[Metric]:
    """Per site with a WireGuard peer, from ``wg show dump``: handshake age and bytes."""
    handshake = GaugeMetricFamily(f"{PREFIX}_wireguard_handshake_age_seconds", "Seconds since the latest "
                                  "WireGuard handshake with the site's agent", labels=["site"])
    transfer = CounterMetricFamily(f"{PREFIX}_wireguard_transfer_bytes", "Bytes through the site's WireGuard "
                                   "peer", labels=["site", "way"])
    for s in sites:
        wg = s.wireguard
        if wg is None:
            continue
        if wg.latest_handshake_age_s is not None:
            handshake.add_metric([s.name], wg.latest_handshake_age_s)
        transfer.add_metric([s.name, "rx"], wg.rx_bytes)
        transfer.add_metric([s.name, "tx"], wg.tx_bytes)
    yield from (handshake, transfer)


def _guard_families(guards: RelayGuards) -> Iterator[Metric]:
    throttled = CounterMetricFamily(f"{PREFIX}_throttled", "Requests refused by a per-source or total rate "
                                    "limit (HTTP 429), without being processed", labels=["endpoint"])
    throttled.add_metric(["enroll"], guards.enroll.throttled)
    throttled.add_metric(["login"], guards.login.throttled)
    yield throttled
    yield CounterMetricFamily(f"{PREFIX}_admin_misdirected", "Requests to the admin port refused (421) because "
                              "their Host header is not allowed", value=guards.misdirected)


def _gate_families(gate: GatedTlsServer) -> Iterator[Metric]:
    yield GaugeMetricFamily(f"{PREFIX}_unauthenticated_connections", "Connections to the tunnel port that have "
                            "not authenticated yet (TLS handshake, enrollment, or waiting for a request)",
                            value=gate.unauthenticated)
    yield CounterMetricFamily(f"{PREFIX}_unauthenticated_refused", "Connections to the tunnel port closed at "
                              "accept: the per-source or total cap on unauthenticated connections was reached",
                              value=gate.admission.refused)
    yield CounterMetricFamily(f"{PREFIX}_tls_handshake_failures", "TLS handshakes on the tunnel port that failed "
                              "or did not finish within [tunnel] handshake_timeout", value=gate.handshake_failures)


def _report_families(reporting: Sequence[SiteStatus]) -> Iterator[Metric]:
    age = GaugeMetricFamily(f"{PREFIX}_health_report_age_seconds", "Age of the latest health report from the "
                            "site's agent", labels=["site"])
    reconnects = CounterMetricFamily(f"{PREFIX}_agent_reconnects", "Reconnects the site's agent reports since "
                                     "it started", labels=["site"])
    info = GaugeMetricFamily(f"{PREFIX}_agent_info", "The version the site's agent reports (value 1)",
                             labels=["site", "version"])
    for s in reporting:
        report = s.health
        assert report is not None
        if s.health_age_s is not None:
            age.add_metric([s.name], s.health_age_s)
        if report.tunnel.reconnects is not None:
            reconnects.add_metric([s.name], report.tunnel.reconnects)
        info.add_metric([s.name, report.version], 1.0)
    yield from (age, reconnects, info)

