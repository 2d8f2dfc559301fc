"""The agent's Prometheus metrics: ``GET /metrics`` on its status port, read from live state at scrape time.

:class:`AgentCollector` takes one ``agent.status()`` snapshot per scrape: the tunnel's state, RTT and
reconnects, the association tracker's counters, the certificate's expiry and renewal, and — when the
agent measures its destinations (``status()["health"]``, the report it sends the relay) — each
destination's C-ECHO result and the host's metrics. The status port listens on loopback by default and,
like ``/api/status`` beside it, needs no credentials; what it shows is counts, times and route names,
never patient data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tunnel_core.health import AgentState, agent_readiness
from tunnel_runtime.metrics import (
    PREFIX,
    association_families,
    destination_families,
    host_families,
    metrics_handler,
    new_registry,
    tasks_family,
)

if TYPE_CHECKING:
    from tunnel_agent.agent import Agent

__all__ = ["AgentCollector", "STATES", "handler", "registry_for"]

# The states of ``Agent.state``; each gets a 0/1 sample so a dashboard can stack them. "revoked" and
# "refused": the relay refused this site (tunnel_core.refusal); the agent waits long before asking again.
STATES = tuple(state.value for state in AgentState)


def registry_for(agent: Agent) -> CollectorRegistry:
    """A registry of the agent's own metrics and the process's ``process_*`` metrics."""
    return new_registry(AgentCollector(agent))


def handler(agent: Agent):
    """The aiohttp handler for ``GET /metrics`` on the status port."""
    return metrics_handler(registry_for(agent))


class AgentCollector(Collector):
    """Collect at scrape time; call only on the agent's event loop (aiohttp handlers are)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        status = self.agent.status()
        yield from _tunnel_families(status)
        yield from association_families(self.agent.tracker)
        yield from _certificate_families(status)
        health = status.get("health")
        destinations = _dicts(health.get("destinations")) if isinstance(health, dict) else []
        yield from destination_families(
            (([d["route"]], d) for d in destinations if isinstance(d.get("route"), str)), [])
        host = health.get("host") if isinstance(health, dict) else None
        yield from host_families([([], host)] if isinstance(host, dict) else [], [])
        yield from _transport_families(status)
        yield tasks_family(status["process"]["tasks"])


def _transport_families(status: dict[str, Any]) -> Iterator[Metric]:
    """Which transport carries the tunnel and, with WireGuard, its handshake age and bytes (wg show dump)."""
    transport = status.get("transport")
    if isinstance(transport, str):
        yield _labelled(f"{PREFIX}_transport", "1 for the transport carrying the tunnel now", "transport", transport)
    wg = status.get("wireguard")
    if not isinstance(wg, dict):
        return
    age = GaugeMetricFamily(f"{PREFIX}_wireguard_handshake_age_seconds", "Seconds since the latest WireGuard "
                            "handshake with the relay")
    if isinstance(wg.get("latest_handshake_age_s"), int | float):
        age.add_metric([], wg["latest_handshake_age_s"])
    yield age
    transfer = CounterMetricFamily(f"{PREFIX}_wireguard_transfer_bytes", "Bytes through the WireGuard peer",
                                   labels=["way"])
    for way, key in (("rx", "rx_bytes"), ("tx", "tx_bytes")):
        if isinstance(wg.get(key), int | float):
            transfer.add_metric([way], wg[key])
    yield transfer


def _labelled(name: str, doc: str, label: str, value: str) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=[label])
    family.add_metric([value], 1.0)
    return family


def _tunnel_families(status: dict[str, Any]) -> Iterator[Metric]:
    state = status["state"]
    ready = agent_readiness(state=AgentState(state), last_error=status["last_error"])
    yield GaugeMetricFamily(f"{PREFIX}_ready", "1 when the agent's tunnel is up (see readiness)",
                            value=1.0 if ready.ready else 0.0)
    yield GaugeMetricFamily(f"{PREFIX}_connected", "1 while the tunnel to the relay is up",
                            value=1.0 if state == "connected" else 0.0)
    states = GaugeMetricFamily(f"{PREFIX}_state", "1 for the tunnel's current state, 0 for the others",
                               labels=["state"])
    for name in (*STATES, *(() if state in STATES else (state,))):
        states.add_metric([name], 1.0 if name == state else 0.0)
    yield states
    if status["rtt_ms"] is not None:
        yield GaugeMetricFamily(f"{PREFIX}_rtt_seconds", "Tunnel round trip (heartbeat) to the relay",
                                value=status["rtt_ms"] / 1000)
    yield CounterMetricFamily(f"{PREFIX}_connects", "Tunnels opened to the relay since the agent started",
                              value=status["connects"])
    yield CounterMetricFamily(f"{PREFIX}_reconnects", "Tunnels opened after the first one",
                              value=status["reconnects"])
    yield GaugeMetricFamily(f"{PREFIX}_active_associations", "Associations in progress through the tunnel",
                            value=len(status["associations"]))
    yield GaugeMetricFamily(f"{PREFIX}_active_streams", "Open mux streams of the tunnel",
                            value=status["active_streams"])


def _certificate_families(status: dict[str, Any]) -> Iterator[Metric]:
    if status["certificate_not_after"] is not None:
        yield GaugeMetricFamily(f"{PREFIX}_certificate_expiry_timestamp_seconds",
                                "When the agent's certificate expires (Unix time)",
                                value=status["certificate_not_after"])
    yield CounterMetricFamily(f"{PREFIX}_certificate_renewals", "Certificate renewals since the agent started",
                              value=status["renewals"])
    yield GaugeMetricFamily(f"{PREFIX}_certificate_renewal_failing", "1 while the latest renewal attempt failed",
                            value=1.0 if status["renewal_error"] else 0.0)


def _dicts(value: object) -> list[dict[str, Any]]:
    return [d for d in value if isinstance(d, dict)] if isinstance(value, list) else []
