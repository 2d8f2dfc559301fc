"""What the agent shows of itself: one frozen snapshot that the JSON API and the Prometheus collector read.

Theory of operation: :class:`AgentStatus` is taken once per request or scrape (``Agent.snapshot``) from the
live parts (tunnel, certificate, health monitor, association tracker, WireGuard transport) and holds
copies, so one answer is consistent with itself. :meth:`AgentStatus.as_dict` is ``GET /api/status``
(``docs/api.md``: its keys, their order and their values are the contract); the metrics read the fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from tunnel_agent.spool.service import DestinationStatus
from tunnel_core.health import AgentState, HealthReport, Readiness, agent_readiness
from tunnel_link.associations import Association
from tunnel_runtime.procstats import ProcessStats

__all__ = ["TRANSPORT_WEBSOCKET", "AgentStatus", "TransportStatus", "TunnelStatus", "WireGuardStatus"]

TRANSPORT_WEBSOCKET = "websocket"


@dataclass(frozen=True, slots=True)
class WireGuardStatus:
    """The agent's WireGuard interface and its relay peer, as of the latest ``wg show dump``."""

    interface: str
    up: bool
    implementation: str | None
    address: str | None  # ours, with the prefix length
    relay_address: str | None
    endpoint: str | None
    latest_handshake_age_s: float | None
    rx_bytes: int | None
    tx_bytes: int | None
    checked_at: float | None  # when the dump was read
    retry_in_s: float | None  # on the fallback: seconds until WireGuard is tried again
    last_error: str


@dataclass(frozen=True, slots=True)
class TransportStatus:
    """What carries the tunnel: ``websocket``, or with ``transport = "wireguard"`` ``wireguard`` or
    ``websocket (fallback)`` (then ``reason`` says why). ``transport`` None: not connected yet."""

    transport: str | None = TRANSPORT_WEBSOCKET
    reason: str = ""
    wireguard: WireGuardStatus | None = None  # only with transport = "wireguard"

    def as_dict(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"transport": self.transport, "transport_reason": self.reason}
        if self.wireguard is not None:
            answer["wireguard"] = asdict(self.wireguard)
        return answer


@dataclass(frozen=True, slots=True)
class TunnelStatus:
    """One tunnel (or one draining connection) for the status: ``relay`` is the fleet name, or
    ``relay_url`` for the primary (``reached`` then names the relay it reached, when known)."""

    relay: str
    reached: str | None
    host: str
    state: str
    connects: int
    last_error: str
    active_streams: int
    connected_since: float | None

    def as_dict(self) -> dict[str, object]:
        return {"relay": self.relay, "reached": self.reached, "host": self.host, "state": self.state,
                "connects": self.connects, "last_error": self.last_error, "active_streams": self.active_streams,
                "connected_since": self.connected_since}


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """One consistent view of the agent. ``next_attempt`` is set only while ``state.waiting``."""

    version: str
    state: AgentState
    relay_url: str | None
    connected_since: float | None
    rtt_ms: float | None
    active_streams: int
    connects: int
    last_error: str
    next_attempt: float | None
    certificate_not_after: float | None
    renewals: int
    renewal_error: str
    routes: tuple[str, ...]
    listener: str | None  # host:port, or None when disabled
    associations: tuple[Association, ...]  # copies, taken with the snapshot
    outcomes: Mapping[str, int]
    process: ProcessStats
    health: HealthReport | None  # the report last sent to the relay
    transport: TransportStatus
    spool: tuple[DestinationStatus, ...] = ()  # the mode = "spool" destinations, by name
    tunnels: tuple[TunnelStatus, ...] = ()  # every tunnel, the primary first (the fields above are the primary's)

    @property
    def live_tunnels(self) -> int:
        """Tunnels up and taking new streams (not draining)."""
        return sum(1 for t in self.tunnels if t.state == AgentState.CONNECTED)

    @property
    def reconnects(self) -> int:
        return max(0, self.connects - 1)

    @property
    def readiness(self) -> Readiness:
        return agent_readiness(state=self.state, last_error=self.last_error)

    def as_dict(self) -> dict[str, Any]:
        """``GET /api/status`` (docs/api.md)."""
        return {
            "version": self.version,
            "state": self.state.value,
            "relay_url": self.relay_url,
            "connected_since": self.connected_since,
            "rtt_ms": self.rtt_ms,
            "active_streams": self.active_streams,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "next_attempt": self.next_attempt,
            "certificate_not_after": self.certificate_not_after,
            "renewals": self.renewals,
            "renewal_error": self.renewal_error,
            "routes": list(self.routes),
            "listener": self.listener,
            "associations": [a.as_dict() for a in self.associations],
            "outcomes": dict(self.outcomes),
            "process": self.process.as_dict(),
            "health": self.health.as_dict() if self.health is not None else None,
            "spool": {d.name: d.as_dict() for d in self.spool},
            **self.transport.as_dict(),
            **({"tunnels": [t.as_dict() for t in self.tunnels]} if self.tunnels else {}),
        }
