"""The relay's site table: every site it knows, the live tunnel of each, and the routing built from the registry.

Theory of operation: a site is known from the config (``[[sites]]``), from the registry's routing rows, or
because an enrolled agent connected. Each :class:`SiteState` holds one live tunnel per agent of the site
(:class:`AgentTunnel`; a newer connection from the same agent replaces its older one), what the relay has
heard from each agent (its latest health report; how many reports did not parse) and the cloud
destinations the site may reach.
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

__all__ = ["REPORT_LOG_BURST", "AgentTunnel", "SiteState", "SiteTable", "reload_routing"]

log = logging.getLogger("relay")

REPORT_LOG_BURST = 10  # ignored REPORTs logged one line each before the log is limited to one a minute


@dataclass
class AgentTunnel:
    """One agent's live tunnel for its site: who it is, where it came from, what it reported."""

    agent: str  # the agent's name (``Tunnel-Agent``; "" for an agent that sends none)
    session: MuxSession
    peer: str
    transport: str  # "websocket", "websocket, inner TLS" or "wireguard"
    serial: str | None  # the certificate the session stands on (updated by renewal)
    not_after: float | None
    report: HealthReport | None = None  # the agent's latest health report on this tunnel
    report_at: float | None = None

    @property
    def usable(self) -> bool:
        return not self.session.draining

    def echo_failing(self, route: str) -> bool:
        """The agent's last C-ECHO to ``route``'s destination failed (not merely unchecked)."""
        if self.report is None:
            return False
        return any(d.route == route and d.ok is False for d in self.report.destinations)

    def as_dict(self) -> dict[str, object]:
        return {"agent": self.agent, "peer": self.peer, "transport": self.transport,
                "connected_since": self.session.connected_at, "active_streams": self.session.active_streams,
                "draining": self.session.draining, "certificate_serial": self.serial}


@dataclass
class SiteState:
    """One site: its agents' live tunnels (none while down) and what the relay knows of it.

    Several agents of one site are active-active: each holds its own tunnel (a newer connection from the
    same agent replaces its older one), and :meth:`pick` gives a new association the tunnel with the
    fewest associations in flight, skipping an agent whose C-ECHO to that route is failing while another's
    is not. The single-tunnel fields (``session``, ``peer``, ``transport``, ``serial``, ``report``...) read
    the newest tunnel, for status and logs."""

    name: str
    destinations: dict[str, Destination] = field(default_factory=dict)
    tunnels: dict[str, AgentTunnel] = field(default_factory=dict)  # by agent name, oldest first
    connects: int = 0
    last_disconnect: float | None = None
    last_disconnect_reason: str = ""
    reports_ignored: int = 0  # REPORTs that did not parse, since the relay started
    # One log line per ignored REPORT, up to a burst, then one a minute naming how many went unlogged:
    # an enrolled agent sending garbage cannot flood the relay's log.
    report_log: TokenBucket = field(default_factory=lambda: TokenBucket(REPORT_LOG_BURST, 1 / 60, time.monotonic()))
    reports_unlogged: int = 0

    @property
    def newest(self) -> AgentTunnel | None:
        return next(reversed(self.tunnels.values()), None)

    @property
    def session(self) -> MuxSession | None:
        tunnel = self.newest
        return tunnel.session if tunnel is not None else None

    @property
    def peer(self) -> str:
        tunnel = self.newest
        return tunnel.peer if tunnel is not None else ""

    @property
    def transport(self) -> str:
        tunnel = self.newest
        return tunnel.transport if tunnel is not None else ""

    @property
    def serial(self) -> str | None:
        tunnel = self.newest
        return tunnel.serial if tunnel is not None else None

    @property
    def not_after(self) -> float | None:
        tunnel = self.newest
        return tunnel.not_after if tunnel is not None else None

    @property
    def report(self) -> HealthReport | None:
        latest = self._latest_report()
        return latest.report if latest is not None else None

    @property
    def report_at(self) -> float | None:
        latest = self._latest_report()
        return latest.report_at if latest is not None else None

    def _latest_report(self) -> AgentTunnel | None:
        reported = [t for t in self.tunnels.values() if t.report_at is not None]
        return max(reported, key=lambda t: t.report_at or 0.0) if reported else None

    @property
    def online(self) -> bool:
        """Connected, and some tunnel takes new streams."""
        return any(t.usable for t in self.tunnels.values())

    def pick(self, route: str) -> MuxSession | None:
        """The tunnel a new association on ``route`` takes: the usable one with the fewest streams in
        flight, among the agents whose C-ECHO to that route is not failing (all usable ones if every
        agent's is)."""
        usable = [t for t in self.tunnels.values() if t.usable]
        healthy = [t for t in usable if not t.echo_failing(route)] or usable
        if not healthy:
            return None
        return min(healthy, key=lambda t: t.session.active_streams).session

    def health(self, now: float) -> SiteHealth:
        return site_condition(connected=bool(self.tunnels), disconnect_reason=self.last_disconnect_reason,
                              report=self.report, report_at=self.report_at, now=now)

    def take_report(self, session: MuxSession, payload: bytes, now: float, monotonic: float) -> None:
        """A REPORT from one of the site's agents: keep it with its tunnel, or count it as ignored (and log
        it, within a budget)."""
        tunnel = next((t for t in self.tunnels.values() if t.session is session), None)
        try:
            report = parse_report(payload)
        except ReportError as exc:
            self.reports_ignored += 1
            if not self.report_log.take(monotonic):
                self.reports_unlogged += 1
                return
            more = f" ({self.reports_unlogged} more since the last line)" if self.reports_unlogged else ""
            self.reports_unlogged = 0
            log.warning("tunnel=%s ignored a health report: %s%s", self.name, exc, more)
            return
        if tunnel is not None:
            tunnel.report, tunnel.report_at = report, now

    def connected(self, session: MuxSession, identity: Identity, peer: str, transport: str,
                  agent: str = "") -> MuxSession | None:
        """``session`` is ``agent``'s tunnel from now on; returns the one of that agent it replaces, if any."""
        previous = self.tunnels.pop(agent, None)
        self.tunnels[agent] = AgentTunnel(agent, session, peer, transport, identity.serial, identity.not_after)
        self.connects += 1
        return previous.session if previous is not None else None

    def disconnected(self, session: MuxSession, now: float) -> None:
        """``session`` ended (a newer one of its agent may have replaced it already)."""
        for agent, tunnel in list(self.tunnels.items()):
            if tunnel.session is session:
                del self.tunnels[agent]
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

    def online_agents(self) -> dict[str, tuple[str, ...]]:
        """Site -> the agents whose tunnels here take new streams (sites with none left out)."""
        held = {name: tuple(sorted(t.agent for t in site.tunnels.values() if t.usable))
                for name, site in self.sites.items()}
        return {name: agents for name, agents in held.items() if agents}

    def live(self) -> Iterator[SiteState]:
        """The sites with a session (draining or not)."""
        return (site for site in self.sites.values() if site.tunnels)

    def live_tunnels(self) -> Iterator[tuple[SiteState, AgentTunnel]]:
        """Every live tunnel of every site (draining or not)."""
        return ((site, tunnel) for site in self.sites.values() for tunnel in list(site.tunnels.values()))

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
        for tunnel in site.tunnels.values() if site is not None else ():
            if tunnel.serial == identity.serial:
                tunnel.serial, tunnel.not_after = serial, not_after

    async def close_all(self, reason: str) -> None:
        """Every live tunnel at once (GOAWAY ``GOING_AWAY``), each bounded by the session's close timeout: one
        stalled site cannot hold up the shutdown of the others."""
        await asyncio.gather(*(tunnel.session.close(ErrorCode.GOING_AWAY, reason)
                               for _site, tunnel in self.live_tunnels()))


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
