"""What the relay shows of itself: one frozen snapshot that the JSON API, the dashboard and the metrics read.

Theory of operation: :class:`StatusSource` takes a :class:`RelayStatus` from the live parts (the site table,
the association tracker, the WireGuard peers) when asked, once per request or scrape, and it holds copies:
one answer is consistent with itself, and nothing that reads it can change the relay. Each site's
condition is ``tunnel_core.health.site_condition``'s decision, so the API, the dashboard and
``dicom_tunnel_site_condition`` say the same. :meth:`RelayStatus.as_dict` is ``GET /api/status``
(``docs/api.md``: its keys, their order and their values are the contract); the metrics read the fields,
so renaming a JSON key cannot silently break a metric.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from relay.registry import RegistryUnavailable, SiteRecord
from relay.registrygate import AsyncRegistry
from relay.sites import SiteState, SiteTable
from tunnel_core.health import Condition, HealthReport, Readiness, relay_readiness
from tunnel_link.associations import Association, AssociationTracker
from tunnel_runtime.procstats import ProcessStats, process_stats

__all__ = ["PeerTraffic", "RegisteredSite", "RelayStatus", "SiteStatus", "StatusSource", "WireGuardPeerStatus"]

log = logging.getLogger("relay")


@dataclass(frozen=True, slots=True)
class WireGuardPeerStatus:
    """A site's WireGuard peer as of the latest ``wg show dump`` (the revocation sweep reads it each second)."""

    latest_handshake_age_s: float | None
    rx_bytes: int
    tx_bytes: int
    endpoint: str | None


@dataclass(frozen=True, slots=True)
class SiteStatus:
    """One site as the relay sees it now. Connection fields are None (or 0) while it is down."""

    name: str
    condition: Condition
    reason: str  # what ops should read first
    transport: str | None
    wireguard: WireGuardPeerStatus | None  # None without [wireguard], or for a site without a peer
    health: HealthReport | None  # the agent's latest report
    health_age_s: float | None
    reports_ignored: int
    connected: bool
    peer: str | None
    connected_since: float | None
    rtt_ms: float | None
    active_streams: int
    connects: int
    last_disconnect: float | None
    last_disconnect_reason: str
    certificate_serial: str | None
    certificate_not_after: float | None
    agents: tuple[dict[str, object], ...] = ()  # one per agent tunnel of the site (several agents: active-active)

    @classmethod
    def of(cls, site: SiteState, now: float, wireguard: WireGuardPeerStatus | None = None) -> SiteStatus:
        session, health = site.session, site.health(now)
        rtt = session.rtt if session is not None else None
        return cls(
            name=site.name, condition=health.condition, reason=health.reason,
            transport=site.transport if session else None, wireguard=wireguard, health=site.report,
            health_age_s=round(now - site.report_at, 1) if site.report_at else None,
            reports_ignored=site.reports_ignored, connected=session is not None,
            peer=site.peer if session else None, connected_since=session.connected_at if session else None,
            rtt_ms=round(rtt * 1000, 3) if rtt is not None else None,
            active_streams=sum(t.session.active_streams for t in site.tunnels.values()), connects=site.connects,
            last_disconnect=site.last_disconnect, last_disconnect_reason=site.last_disconnect_reason,
            certificate_serial=site.serial if session else None,
            certificate_not_after=site.not_after if session else None,
            agents=tuple(t.as_dict() for t in site.tunnels.values()))

    @classmethod
    def never_seen(cls, name: str, now: float) -> SiteStatus:
        """A site only the registry knows (enrolled, never connected since the relay started)."""
        return cls.of(SiteState(name), now)

    def as_dict(self) -> dict[str, Any]:
        """One entry of ``GET /api/status``'s ``sites`` (docs/api.md)."""
        return {
            "name": self.name,
            "condition": self.condition.value,
            "reason": self.reason,
            "transport": self.transport,
            "wireguard": asdict(self.wireguard) if self.wireguard is not None else None,
            "health": self.health.as_dict() if self.health is not None else None,
            "health_age_s": self.health_age_s,
            "reports_ignored": self.reports_ignored,
            "connected": self.connected,
            "peer": self.peer,
            "connected_since": self.connected_since,
            "rtt_ms": self.rtt_ms,
            "active_streams": self.active_streams,
            "connects": self.connects,
            "last_disconnect": self.last_disconnect,
            "last_disconnect_reason": self.last_disconnect_reason,
            "certificate_serial": self.certificate_serial,
            "certificate_not_after": self.certificate_not_after,
            "agents": list(self.agents),
        }


@dataclass(frozen=True, slots=True)
class RelayStatus:
    """One consistent view of the relay: its sites, the associations in progress (copies), outcome counts."""

    started: float
    sites: tuple[SiteStatus, ...]
    associations: tuple[Association, ...]
    outcomes: Mapping[str, int]
    process: ProcessStats

    def site(self, name: str) -> SiteStatus | None:
        return next((s for s in self.sites if s.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        """``GET /api/status`` (docs/api.md)."""
        return {
            "started": self.started,
            "sites": [s.as_dict() for s in self.sites],
            "associations": [a.as_dict() for a in self.associations],
            "outcomes": dict(self.outcomes),
            "process": self.process.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class RegisteredSite:
    """A site of the registry (``GET /api/sites``): its record, whether it has routes, whether it is connected."""

    record: SiteRecord
    configured: bool
    connected: bool

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def revoked(self) -> bool:
        return self.record.revoked_at is not None

    def as_dict(self) -> dict[str, Any]:
        return {**self.record.as_dict(), "configured": self.configured, "connected": self.connected}


class PeerTraffic(Protocol):
    """The WireGuard peers' latest handshakes and bytes, by site (``relay.wgtransport.RelayWireGuard``)."""

    def handshakes(self) -> Mapping[str, WireGuardPeerStatus]: ...


class StatusSource:
    """Build with the site table, the tracker and the open registry; set ``serving`` once every port is
    bound. Call on the relay's event loop (aiohttp handlers and the scrape are)."""

    def __init__(self, sites: SiteTable, tracker: AssociationTracker, registry: AsyncRegistry, *, started: float,
                 wireguard: PeerTraffic | None = None) -> None:
        self.sites = sites
        self.tracker = tracker
        self.registry = registry
        self._records: list[SiteRecord] = []
        self._presence: dict[str, list[tuple[str, list[str]]]] = {}
        self.started = started
        self.wireguard = wireguard
        self.serving = False
        self.draining = False  # set once a drain began (relay.server): readiness fails first

    def snapshot(self, now: float | None = None) -> RelayStatus:
        now = time.time() if now is None else now
        peers = self.wireguard.handshakes() if self.wireguard is not None else {}
        return RelayStatus(
            started=self.started,
            sites=tuple(SiteStatus.of(site, now, peers.get(site.name)) for site in self.sites.sites.values()),
            associations=tuple(copy.copy(a) for a in self.tracker.active.values()),
            outcomes=dict(self.tracker.outcomes),
            process=process_stats(),
        )

    def readiness(self) -> Readiness:
        """From what the registry's gateway saw last (the sweep asks it every second): no I/O here."""
        return relay_readiness(started=self.serving, registry_ok=self.registry.available,
                               registry_shared=self.registry.shared, draining=self.draining)

    def registry_up(self) -> bool:
        """Whether the registry's database answered the last call (no I/O here)."""
        return self.registry.available

    async def presence(self) -> dict[str, list[tuple[str, list[str]]]]:
        """Site -> its paths now: each relay of the fleet holding its tunnels, with the agents whose tunnels
        they are; while the registry cannot be read, the last answer read."""
        now = time.time()
        try:
            self._presence = await self.registry.call(lambda r: r.paths(now))
        except RegistryUnavailable as exc:
            log.warning("tunnel holders shown as last read: %s", exc)
        return self._presence

    async def registered_sites(self) -> list[RegisteredSite]:
        """Every site of the registry, in its order; while the registry cannot be read, the last list read."""
        try:
            self._records = await self.registry.call(lambda r: r.sites())
        except RegistryUnavailable as exc:
            log.warning("sites listed as last read: %s", exc)
        connected = {site.name for site in self.sites.live()}
        return [RegisteredSite(record, self.sites.has_routes(record.name), record.name in connected)
                for record in self._records]
