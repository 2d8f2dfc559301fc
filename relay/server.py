"""The relay: the composition root that builds every part from the typed settings and wires them together.

What the relay does, and which module does it:

- ``relay.tunnel``: the WebSocket each site's agent connects to over mutual TLS (or inner TLS, or through
  WireGuard, ``relay.wgtransport``); the site is who its certificate says, if the registry agrees
  (``relay.identity``). Streams the agent opens are dialed only to that site's destinations.
- ``relay.listeners``: each ``[[listeners]]`` entry is a DICOM port; the A-ASSOCIATE-RQ is routed by called
  AE within that listener's table and carried to the site's agent.
- ``relay.sites``: every site, its live tunnel and health report, and the routing tables built from the
  registry (``relay.registry``); ``relay.revocation`` re-checks live tunnels once a second and closes
  those of revoked sites, revoked or expired certificates.
- ``relay.enroll`` shares the tunnel port: enrollment and renewal; the handshake accepts a client without
  a certificate for those, every other path refuses one.
- The admin port (loopback by default): ``relay.admin`` (the token-authenticated API), ``relay.dashboard``,
  ``relay.metrics``; all three read one snapshot of the relay at a time (``relay.status``).

This module alone knows every satellite; each is handed the narrow collaborator it uses.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass

from aiohttp import web

from relay import admin, dashboard, enroll, guard, listeners, metrics
from relay.admintoken import admin_token
from relay.config import RelaySettings
from relay.drain import Drain
from relay.identity import Admission
from relay.notify import RegistryHints
from relay.peering import PEER_PATH, FleetView, PeerEndpoint, PeerLinks, run_token
from relay.presence import PresenceKeeper
from relay.registry import DestinationRecord, Registry, RouteRecord, open_registry
from relay.registrygate import AsyncRegistry
from relay.revocation import RevocationSweep
from relay.sites import SiteState, SiteTable, reload_routing
from relay.status import StatusSource
from relay.tunnel import TunnelEndpoints, accept_websocket
from relay.wgtransport import RelayWireGuard
from tunnel_core.dicom import AssociateRequest, RejectReason
from tunnel_core.discovery import FLEET_LIST_PATH, SERVING, FleetEntry
from tunnel_core.health import Readiness, relay_readiness
from tunnel_link.aio import cancel_and_wait
from tunnel_link.associations import Association, AssociationTracker
from tunnel_link.gate import GatedTlsServer
from tunnel_link.httpserver import app_runner, serve_tcp
from tunnel_link.pipe import PipeServer
from tunnel_link.session import TunnelStream
from tunnel_link.tls import server_context

log = logging.getLogger("relay")


@dataclass(frozen=True, slots=True)
class _Running:
    """The parts that exist only while the relay is started (they need the open registry)."""

    registry: AsyncRegistry
    status: StatusSource
    revocations: RevocationSweep
    wireguard: RelayWireGuard | None


class Relay:
    """Build with settings, then ``await run()`` (``stop()`` ends it); in tests ``await start(stack)`` binds
    every port and the stack tears them down. ``bound`` maps each port's name to its address."""

    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.tracker = AssociationTracker("r")
        self.table = SiteTable((s.name for s in settings.sites), (li.name for li in settings.listeners))
        self.guards = guard.make_guards(settings, time.time())  # throttles shared by the tunnel and admin ports
        self.started = time.time()
        self.bound: dict[str, tuple[str, int]] = {}
        self.gate: GatedTlsServer | None = None  # the tunnel port's listener, once started
        self._running: _Running | None = None
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop request: end the drain now
        self._listeners: list[PipeServer] = []
        self._presence: PresenceKeeper | None = None
        f = settings.fleet
        self.fleet_view = FleetView(f.name, FleetEntry(f.name, f.zone, f.tunnel_url, SERVING, run_token(self.started))
                                    if f.tunnel_url else None)
        self._drain: Drain | None = None

    async def run(self) -> None:
        async with AsyncExitStack() as stack:
            await self.start(stack)
            await self._stopping.wait()
            await self.drain()

    def stop(self) -> None:
        """Drain, then stop (SIGTERM, SIGINT, ``POST /api/drain``); asked again, stop without waiting."""
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()

    async def drain(self) -> None:
        """Leave gently, within ``[fleet] drain_deadline`` (``relay.drain``)."""
        self._started()
        if self._drain is not None:
            await self._drain.run()

    async def start(self, stack: AsyncExitStack) -> None:
        """Bind every port; everything is torn down when ``stack`` closes."""
        s = self.settings
        tunnel_tls = server_context(s.tunnel_cert_path, s.tunnel_key_path, s.tunnel_ca_path, client_cert_optional=True)
        # Opened and brought in line with the config in a worker thread (a shared database may be slow);
        # from then on every call goes through the gateway's thread, each with a deadline.
        opened = await asyncio.to_thread(open_registry, s.state_dir, s.registry_url, s.registry_password_file)
        registry = AsyncRegistry(opened)
        stack.callback(registry.close)
        routes, destinations, now = _config_routes(s), _config_destinations(s), time.time()

        def sync_config(r: Registry) -> None:
            for site in s.sites:
                r.ensure_site(site.name, now)
            r.sync_config_routing(routes, destinations, now)

        await registry.call(sync_config)
        await reload_routing(self.table, registry)
        wireguard = RelayWireGuard(s, registry) if s.wireguard.enabled else None
        running = self._running = _Running(
            registry, StatusSource(self.table, self.tracker, registry, started=self.started, wireguard=wireguard),
            RevocationSweep(self.table, registry, wireguard), wireguard)
        admission = Admission(registry)
        # Its own context: the inner handshake runs in memory BIOs, apart from the listener's.
        endpoints = TunnelEndpoints(
            self.table, admission, self.tracker, limits=s.mux.to_limits(),
            heartbeat_interval=s.tunnel.heartbeat_interval,
            inner_context=server_context(s.tunnel_cert_path, s.tunnel_key_path, s.tunnel_ca_path),
            authenticated=self._authenticated, wireguard=wireguard, fleet_header=self.fleet_view.fleet_header)
        peers = PeerEndpoint(
            self.table, self.tracker, self._route_here, limits=s.mux.to_limits(),
            heartbeat_interval=s.tunnel.heartbeat_interval, authenticated=self._authenticated,
            accept=accept_websocket)
        await self._serve_tunnel_port(stack, tunnel_tls, endpoints, peers, enroll.Enrollment(
            s, registry, admission, self.table.certificate_renewed,
            server_context(s.tunnel_cert_path, s.tunnel_key_path, s.tunnel_ca_path, client_cert_optional=True),
            wireguard))
        self.bound["admin"] = await serve_tcp(stack, self._admin_app(running), s.admin.host, s.admin.port,
                                              request_timeout=s.tunnel.request_deadline, logger_name="relay.http")
        if wireguard is not None:
            wg_app = web.Application()
            wg_app.router.add_get(s.tunnel.path, endpoints.wireguard_websocket)
            self.bound["wireguard"] = await wireguard.start(stack, wg_app)
        presence = self._presence = PresenceKeeper(registry, self.table, name=s.fleet.name, zone=s.fleet.zone,
                                                   lease=s.fleet.lease, address=s.fleet.address,
                                                   tunnel_url=s.fleet.tunnel_url, view=self.fleet_view,
                                                   started=self.started)
        # Callers for sites whose tunnels another relay holds are carried there, one hop.
        hops = PeerLinks(self.fleet_view, state_dir=s.state_dir, ca_path=s.tunnel_ca_path, name=s.fleet.name,
                         limits=s.mux.to_limits(), heartbeat_interval=s.tunnel.heartbeat_interval,
                         look_again=presence.look_again)
        stack.push_async_callback(hops.close)
        for listener in s.listeners:
            bound, server = await listeners.serve_listener(stack, listener, self.table, self.tracker, hops)
            self.bound[f"listener:{listener.name}"] = bound
            self._listeners.append(server)
        stack.push_async_callback(self.table.close_all, "relay shutting down")
        stack.callback(peers.close_all, "relay shutting down")
        if opened.target is not None:  # PostgreSQL: act on the other relays' writes at once (NOTIFY hints)
            hints = RegistryHints(opened.target, lambda kind: self._hint(running, kind))
            hints.start()
            stack.push_async_callback(hints.stop)
        sweeper = asyncio.create_task(running.revocations.run())
        stack.push_async_callback(cancel_and_wait, sweeper)
        stack.push_async_callback(presence.leave)  # after the keeper is stopped (the stack runs backwards)
        keeper = asyncio.create_task(presence.run())
        stack.push_async_callback(cancel_and_wait, keeper)
        self._drain = Drain(running.status, self.fleet_view, presence, self._listeners, endpoints, peers, self.table,
                            s.fleet.drain_deadline, self._hurry)
        running.status.serving = True
        log.info("relay up: %s", ", ".join(f"{k}={h}:{p}" for k, (h, p) in self.bound.items()))

    async def _serve_tunnel_port(self, stack: AsyncExitStack, tls: ssl.SSLContext, endpoints: TunnelEndpoints,
                                 peers: PeerEndpoint, enrollment: enroll.Enrollment) -> None:
        """The agent-facing HTTPS port: the tunnel's WebSockets, enrollment and the fleet's peer relays,
        gated until a connection authenticates (``tunnel_link.gate``)."""
        t = self.settings.tunnel
        app = web.Application(client_max_size=enroll.MAX_BODY)
        app.router.add_get(t.path, endpoints.websocket)
        app.router.add_get(t.inner_path, endpoints.inner_websocket)
        app.router.add_get(PEER_PATH, peers.websocket)
        app.router.add_get(FLEET_LIST_PATH, endpoints.fleet_list)
        enroll.add_routes(app, enrollment, self.guards.enroll)
        runner = app_runner(app, request_timeout=t.request_deadline, logger_name="relay.http")
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        self.gate = GatedTlsServer(runner, tls, limits=t.admission_limits(), handshake_timeout=t.handshake_deadline)
        self.bound["tunnel"] = await self.gate.start(t.host, t.port)
        stack.push_async_callback(self.gate.close)

    def _admin_app(self, running: _Running) -> web.Application:
        """The admin port: the API, ``/metrics`` and the dashboard, all reading ``running.status``."""
        s = self.settings
        token = admin_token(s.state_dir)
        board = dashboard.Dashboard(running.status, self.table, self.tracker, token, self.guards.login)
        api = admin.AdminApi(s, running.registry, self.table, running.status, running.revocations,
                             self.bound["tunnel"][1], drain=self.stop)
        app = admin.build_app(api, self.guards, token=token, session_allows=board.session_allows,
                              metrics=metrics.handler(running.status, self.tracker, self.guards, self.gate))
        dashboard.add_routes(app, board)
        return app

    def _hint(self, running: _Running, kind: str) -> None:
        if kind == "change":
            running.revocations.wake()
        elif self._presence is not None:
            self._presence.hint()

    async def _route_here(self, listener: str, req: AssociateRequest,
                          assoc: Association) -> TunnelStream | RejectReason:
        """A peer relay's caller: routed within ``listener``'s table to this relay's own tunnels only."""
        return await listeners.route_caller(self.table, listener, req, assoc)

    def _authenticated(self, transport: asyncio.BaseTransport | None) -> None:
        """The connection proved its identity: it no longer counts as unauthenticated."""
        if self.gate is not None:
            self.gate.authenticated(transport)

    # --- what callers (the CLI's serve, tests) read of a started relay ----------------------------------

    @property
    def sites(self) -> dict[str, SiteState]:
        return self.table.sites

    @property
    def registry(self) -> AsyncRegistry:
        return self._started().registry

    def online_sites(self) -> set[str]:
        return self.table.online()

    def readiness(self) -> Readiness:
        if self._running is None:
            return relay_readiness(started=False, registry_ok=False)  # "starting"
        return self._running.status.readiness()

    def status(self) -> dict[str, object]:
        """``GET /api/status`` (docs/api.md)."""
        return self._started().status.snapshot().as_dict()

    async def enforce_revocations(self, now: float | None = None) -> list[str]:
        """Close the tunnels the registry no longer lets in (``relay.revocation``); returns their sites."""
        return await self._started().revocations.enforce(now)

    def _started(self) -> _Running:
        if self._running is None:
            raise RuntimeError("the relay is not started")
        return self._running


def _config_routes(settings: RelaySettings) -> list[RouteRecord]:
    return [RouteRecord(li.name, r.called_ae, r.site, r.route, tuple(r.allowed_calling_aes), "config")
            for li in settings.listeners for r in li.routes]


def _config_destinations(settings: RelaySettings) -> list[DestinationRecord]:
    return [DestinationRecord(site.name, d.called_ae, d.host, d.port, tuple(d.allowed_calling_aes), "config")
            for site in settings.sites for d in site.destinations]
