"""The relay's site table: every site it knows, the live tunnel of each, and the routing built from the registry.

Theory of operation: a site is known from the config (``[[sites]]``), from the registry's routing rows, or
because an enrolled agent connected. Each :class:`SiteState` holds at most one live session (a newer
connection from the same site replaces the older one), what the relay has heard from that site's agent
(its latest health report; how many reports did not parse) and the cloud destinations the site may reach.
The listener tables (called AE -> site and route, per ``[[listeners]]`` entry) and the destinations are
rebuilt from the registry's rows by :func:`reload_routing` (one call through the registry's worker thread,
``relay.registrygate``), at start-up, after every change through the admin API, and when the revocation
sweep sees that another process or relay wrote (``relay.revocation``). Nothing else here does I/O but
logging; the clock is a parameter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from relay.identity import Identity
from relay.registry import DestinationRecord, Registry, RouteRecord
from relay.registrygate import AsyncRegistry
from tunnel_core.codes import ErrorCode
from tunnel_core.health import HealthReport, ReportError, SiteHealth, parse_report, site_condition
from tunnel_core.ratelimit import TokenBucket
from tunnel_core.routing import Destination, IngressRoute
from tunnel_link.session import MuxSession

__all__ = ["REPORT_LOG_BURST", "SiteState", "SiteTable", "reload_routing"]

log = logging.getLogger("relay")

REPORT_LOG_BURST = 10  # ignored REPORTs logged one line each before the log is limited to one a minute


@dataclass
class SiteState:
    """One site: its live session (None while down) and what the relay knows of it."""

    name: str
    destinations: dict[str, Destination] = field(default_factory=dict)
    session: MuxSession | None = None
    peer: str = ""
    connects: int = 0
    last_disconnect: float | None = None
    last_disconnect_reason: str = ""
    serial: str | None = None  # the certificate the live session stands on (updated by renewal)
    not_after: float | None = None
    report: HealthReport | None = None  # the agent's latest health report
    report_at: float | None = None
    transport: str = ""  # "websocket", "websocket, inner TLS" or "wireguard" while connected
    reports_ignored: int = 0  # REPORTs that did not parse, since the relay started
    # One log line per ignored REPORT, up to a burst, then one a minute naming how many went unlogged:
    # an enrolled agent sending garbage cannot flood the relay's log.
    report_log: TokenBucket = field(default_factory=lambda: TokenBucket(REPORT_LOG_BURST, 1 / 60, time.monotonic()))
    reports_unlogged: int = 0

    @property
    def online(self) -> bool:
        """Connected, and the tunnel takes new streams."""
        return self.session is not None and not self.session.draining

    def health(self, now: float) -> SiteHealth:
        return site_condition(connected=self.session is not None, disconnect_reason=self.last_disconnect_reason,
                              report=self.report, report_at=self.report_at, now=now)

    def take_report(self, payload: bytes, now: float, monotonic: float) -> None:
        """A REPORT from the site's agent: keep it, or count it as ignored (and log it, within a budget)."""
        try:
            self.report = parse_report(payload)
        except ReportError as exc:
            self.reports_ignored += 1
            if not self.report_log.take(monotonic):
                self.reports_unlogged += 1
                return
            more = f" ({self.reports_unlogged} more since the last line)" if self.reports_unlogged else ""
            self.reports_unlogged = 0
            log.warning("tunnel=%s ignored a health report: %s%s", self.name, exc, more)
            return
        self.report_at = now

    def connected(self, session: MuxSession, identity: Identity, peer: str, transport: str) -> MuxSession | None:
        """``session`` is the site's tunnel from now on; returns the one it replaces, if any."""
        previous = self.session
        self.session, self.peer, self.transport = session, peer, transport
        self.report = self.report_at = None  # a new tunnel reports afresh
        self.serial, self.not_after = identity.serial, identity.not_after
        self.connects += 1
        return previous

    def disconnected(self, session: MuxSession, now: float) -> None:
        """``session`` ended (a newer one may have replaced it already)."""
        if self.session is session:
            self.session = None
        self.last_disconnect = now
        self.last_disconnect_reason = session.close_reason or "closed"


class SiteTable:
    """Build with the configured site and listener names; call :func:`reload_routing` once the registry is
    open. ``sites`` and ``tables`` are read by the listeners, the tunnel endpoints, status and dashboard."""

    def __init__(self, sites: Iterable[str], listeners: Iterable[str]) -> None:
        self.sites: dict[str, SiteState] = {name: SiteState(name) for name in sites}
        self._listeners = tuple(listeners)
        self.tables: dict[str, dict[str, IngressRoute]] = {name: {} for name in self._listeners}
        self.routing_version = -1  # the registry's data_version the tables were built from

    def site(self, name: str) -> SiteState:
        """Sites from the config have routes; a site enrolled only in the registry can connect with none."""
        site = self.sites.get(name)
        if site is None:
            site = self.sites[name] = SiteState(name)
        return site

    def online(self) -> set[str]:
        return {name for name, site in self.sites.items() if site.online}

    def live(self) -> Iterator[SiteState]:
        """The sites with a session (draining or not)."""
        return (site for site in self.sites.values() if site.session is not None)

    def has_routes(self, name: str) -> bool:
        site = self.sites.get(name)
        return bool(site and site.destinations) or any(
            r.site == name for table in self.tables.values() for r in table.values())

    def apply_routing(self, routes: Iterable[RouteRecord], destinations: Iterable[DestinationRecord],
                      version: int) -> None:
        """Rebuild the listener tables and the sites' destinations from the registry's rows (config + API),
        read at registry ``version`` (see :func:`reload_routing`)."""
        tables: dict[str, dict[str, IngressRoute]] = {name: {} for name in self._listeners}
        for r in routes:
            if r.listener in tables:
                tables[r.listener][r.called_ae] = IngressRoute(r.called_ae, r.site, r.route, frozenset(r.allowed))
        by_site: dict[str, dict[str, Destination]] = {}
        for d in destinations:
            by_site.setdefault(d.site, {})[d.called_ae] = Destination(
                d.called_ae, d.host, d.port, None, frozenset(d.allowed))
        for name in by_site.keys() - self.sites.keys():
            self.site(name)
        for name, site in self.sites.items():
            site.destinations = by_site.get(name, {})
        self.tables = tables
        self.routing_version = version

    def certificate_renewed(self, identity: Identity, serial: str, not_after: float) -> None:
        """A live tunnel that authenticated with ``identity``'s certificate now stands on the new one."""
        site = self.sites.get(identity.site)
        if site is not None and site.session is not None and site.serial == identity.serial:
            site.serial, site.not_after = serial, not_after

    async def close_all(self, reason: str) -> None:
        """Every live tunnel at once (GOAWAY ``GOING_AWAY``), each bounded by the session's close timeout: one
        stalled site cannot hold up the shutdown of the others."""
        await asyncio.gather(*(site.session.close(ErrorCode.GOING_AWAY, reason)
                               for site in self.sites.values() if site.session is not None))


async def reload_routing(table: SiteTable, registry: AsyncRegistry, *, only_if_changed: bool = False) -> bool:
    """Read the routing rows in one registry call and apply them (``only_if_changed``: only when the registry
    was written since the tables were built). The version is read before the rows, so a write in between is
    picked up by the next reload. True if the tables were rebuilt; RegistryError when the registry cannot
    be read (the tables stay as they were)."""

    def read(r: Registry) -> tuple[int, list[RouteRecord], list[DestinationRecord]] | None:
        version = r.data_version()
        if only_if_changed and version == table.routing_version:
            return None
        return version, r.routes(), r.destinations()

    rows = await registry.call(read)
    if rows is None:
        return False
    version, routes, destinations = rows
    table.apply_routing(routes, destinations, version)
    return True
