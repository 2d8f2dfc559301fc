"""The relay: agents connect in over mutual-TLS WebSocket; cloud DICOM callers connect to its listeners.

- ``/tunnel`` (configurable) accepts one WebSocket per site. The site is the CN of the client certificate
  the TLS handshake verified against the relay CA — never anything the agent says.
- Each ``[[listeners]]`` entry is a DICOM port: the A-ASSOCIATE-RQ is routed by called AE within that
  listener's table, the calling AE checked, and a stream opened to the site's agent with the request.
- Streams an agent opens name a called AE; they are dialed only to that site's ``[[sites.destinations]]``.
- The same HTTPS port serves enrollment and renewal (``relay.enroll``); the handshake accepts a client
  without a certificate for those, and every other path refuses one.
- Who may connect is the registry's decision (``relay.registry``): a certificate must be one the relay
  issued, unrevoked, for an unrevoked site. Live tunnels are re-checked once a second (revocation by
  any process, certificate expiry) and closed when that no longer holds.
- The admin port serves the token-authenticated admin API (``relay.admin``) on loopback by default.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from aiohttp import web

from relay import admin, enroll, guard, pki
from relay.config import RelaySettings
from relay.pki import PkiError, site_from_certificate
from relay.registry import CertificateVerdict, DestinationRecord, Registry, RouteRecord, serial_hex
from relay.wgtransport import RelayWireGuard
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.dicom import AssociateRequest, RejectReason
from tunnel_core.frames import OpenPayload
from tunnel_core.health import (
    HealthReport,
    Readiness,
    ReportError,
    SiteHealth,
    parse_report,
    relay_readiness,
    site_condition,
)
from tunnel_core.mux import ConnectionDraining, Mux, Role, StreamLimitReached
from tunnel_core.ratelimit import TokenBucket
from tunnel_core.refusal import REFUSED_HEADER, RefusalToken, close_message
from tunnel_core.routing import Accept, Destination, IngressRoute, decide_destination, decide_ingress
from tunnel_link.aio import cancel_and_wait, wait_for_events
from tunnel_link.associations import (
    Association,
    AssociationTracker,
    IngressLimits,
    serve_caller,
    serve_stream,
)
from tunnel_link.errors import LinkError
from tunnel_link.gate import GatedTlsServer
from tunnel_link.httpserver import app_runner, serve_tcp
from tunnel_link.innertls import InnerTlsError, InnerTlsFailure, InnerTlsWebSocket, inner_tls_server
from tunnel_link.pipe import Pipe, PipeServer
from tunnel_link.session import CLOSE_TIMEOUT, MAX_MESSAGE_IN, MuxSession, TunnelStream
from tunnel_link.sockets import tune
from tunnel_link.tls import server_context
from tunnel_runtime.procstats import process_stats

log = logging.getLogger("relay")

CONNECT_TIMEOUT = 5.0
INNER_HANDSHAKE_TIMEOUT = 10.0
REPORT_LOG_BURST = 10  # ignored REPORTs logged one line each before the log is limited to one a minute
SWEEP_INTERVAL = 1.0  # seconds between re-checks of live tunnels against the registry and the clock
# The registry's verdict as the agent is told it (Tunnel-Refused, docs/protocol.md §1).
_REFUSAL_TOKENS = {
    CertificateVerdict.UNKNOWN: RefusalToken.UNKNOWN_CERTIFICATE,
    CertificateVerdict.REVOKED: RefusalToken.CERTIFICATE_REVOKED,
    CertificateVerdict.SITE_REVOKED: RefusalToken.SITE_REVOKED,
    CertificateVerdict.SITE_MISMATCH: RefusalToken.SITE_MISMATCH,
}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is, after the registry agreed: from a verified client certificate (``serial``,
    ``not_after``), or from the WireGuard peer the connection came through (both None)."""

    site: str
    serial: str | None
    not_after: float | None


@dataclass
class SiteState:
    name: str
    destinations: dict[str, Destination]
    session: MuxSession | None = None
    peer: str = ""
    connects: int = 0
    last_disconnect: float | None = None
    last_disconnect_reason: str = ""
    serial: str | None = None  # the certificate the live session stands on (updated by renewal)
    not_after: float | None = None
    report: HealthReport | None = None  # the agent's latest health report (tunnel_core.health.parse_report)
    report_at: float | None = None
    transport: str = ""  # "websocket", "websocket, inner TLS" or "wireguard" while connected
    reports_ignored: int = 0  # REPORTs that did not parse, since the relay started
    # One log line per ignored REPORT, up to a burst, then one a minute naming how many went unlogged:
    # an enrolled agent sending garbage cannot flood the relay's log.
    report_log: TokenBucket = field(default_factory=lambda: TokenBucket(REPORT_LOG_BURST, 1 / 60, time.monotonic()))
    reports_unlogged: int = 0

    def health(self, now: float) -> SiteHealth:
        return site_condition(connected=self.session is not None, disconnect_reason=self.last_disconnect_reason,
                              report=self.report, report_at=self.report_at, now=now)


class Relay:
    """Build with settings, then ``await run()``; or ``async with relay.running():`` in tests."""

    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        self.limits = settings.mux.to_limits()
        self.tracker = AssociationTracker("r")
        self.sites = {s.name: SiteState(s.name, {}) for s in settings.sites}
        self.tables: dict[str, dict[str, IngressRoute]] = {li.name: {} for li in settings.listeners}
        self._routing_version = -1
        self.bound: dict[str, tuple[str, int]] = {}
        self._stopping = asyncio.Event()
        self.started = time.time()
        self._registry: Registry | None = None
        self.serving = False
        self.wireguard = RelayWireGuard(self) if settings.wireguard.enabled else None
        self.guards = guard.make_guards(settings, time.time())  # throttles shared by the tunnel and admin ports
        self.gate: GatedTlsServer | None = None  # the tunnel port's listener, once started

    def readiness(self) -> Readiness:
        try:
            registry_ok = self._registry is not None and self._registry.data_version() >= 0
        except Exception:  # sqlite3 errors of any kind mean "not ready", with the reason logged
            log.exception("registry check failed")
            registry_ok = False
        return relay_readiness(started=self.serving, registry_ok=registry_ok)

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise RuntimeError("the relay is not started")
        return self._registry

    # --- lifecycle --------------------------------------------------------------------------------------

    async def run(self) -> None:
        async with AsyncExitStack() as stack:
            await self.start(stack)
            await self._stopping.wait()

    async def start(self, stack: AsyncExitStack) -> None:
        """Bind every port; everything is torn down when ``stack`` closes."""
        s = self.settings
        ssl_ctx = server_context(s.tunnel_cert_path, s.tunnel_key_path, s.tunnel_ca_path,
                                 client_cert_optional=True)
        self._registry = Registry.open(s.state_dir)
        stack.callback(self._registry.close)
        for site in s.sites:
            self._registry.ensure_site(site.name, time.time())
        self._registry.sync_config_routing(_config_routes(s), _config_destinations(s), time.time())
        self.reload_routing()
        t = s.tunnel
        tunnel_app = web.Application(client_max_size=enroll.MAX_BODY)
        tunnel_app.router.add_get(s.tunnel.path, self._tunnel_ws)
        tunnel_app.router.add_get(s.tunnel.inner_path, self._tunnel_inner_ws)
        # Its own context: the inner handshake runs in memory BIOs, apart from the listener's.
        self._inner_ctx = server_context(s.tunnel_cert_path, s.tunnel_key_path, s.tunnel_ca_path)
        self.enroll_inner_context = server_context(s.tunnel_cert_path, s.tunnel_key_path, s.tunnel_ca_path,
                                                   client_cert_optional=True)
        enroll.add_routes(tunnel_app, self)
        # Connections to the tunnel port are gated until they authenticate (tunnel_link.gate).
        tunnel_runner = app_runner(tunnel_app, request_timeout=t.request_deadline, logger_name="relay.http")
        await tunnel_runner.setup()
        stack.push_async_callback(tunnel_runner.cleanup)
        self.gate = GatedTlsServer(tunnel_runner, ssl_ctx, limits=t.admission_limits(),
                                   handshake_timeout=t.handshake_deadline)
        self.bound["tunnel"] = await self.gate.start(t.host, t.port)
        stack.push_async_callback(self.gate.close)
        self.bound["admin"] = await serve_tcp(stack, admin.build_app(self), s.admin.host, s.admin.port,
                                              request_timeout=t.request_deadline, logger_name="relay.http")
        if self.wireguard is not None:
            wg_app = web.Application()
            wg_app.router.add_get(t.path, self._tunnel_wg_ws)
            self.bound["wireguard"] = await self.wireguard.start(stack, wg_app)
        for listener in s.listeners:
            self.bound[f"listener:{listener.name}"] = await self._serve_listener(stack, listener)
        stack.push_async_callback(self._close_sessions)
        sweeper = asyncio.create_task(self._sweep_forever())
        stack.push_async_callback(cancel_and_wait, sweeper)
        self.serving = True
        log.info("relay up: %s", ", ".join(f"{k}={h}:{p}" for k, (h, p) in self.bound.items()))

    def stop(self) -> None:
        self._stopping.set()

    async def _close_sessions(self) -> None:
        """Every live tunnel at once, each bounded by ``CLOSE_TIMEOUT``: one stalled site cannot hold up
        the shutdown of the others."""
        closes = [site.session.close(ErrorCode.GOING_AWAY, "relay shutting down")
                  for site in self.sites.values() if site.session is not None]
        await asyncio.gather(*closes)

    async def _serve_listener(self, stack: AsyncExitStack, listener) -> tuple[str, int]:
        limits = IngressLimits(listener.artim_timeout, listener.max_associate_rq)
        async def on_caller(pipe: Pipe) -> None:
            async def decide(req: AssociateRequest, assoc: Association) -> TunnelStream | RejectReason:
                # Looked up per association: routes added or removed through the registry apply at once.
                return await self._route_caller(self.tables.get(listener.name, {}), req, assoc)
            await serve_caller(pipe, limits=limits, decide=decide, tracker=self.tracker, direction="cloud-to-site")

        server = PipeServer(on_caller)
        bound = await server.start(listener.host, listener.port)
        stack.push_async_callback(server.close)
        return bound

    # --- routing ----------------------------------------------------------------------------------------

    def online_sites(self) -> set[str]:
        return {name for name, site in self.sites.items()
                if site.session is not None and not site.session.draining}

    async def _route_caller(self, table: dict[str, IngressRoute], req: AssociateRequest,
                            assoc: Association) -> TunnelStream | RejectReason:
        decision = decide_ingress(table, req.called_ae, req.calling_ae, self.online_sites())
        if not isinstance(decision, Accept):
            return decision.reason
        assoc.site, assoc.route = decision.site, decision.route
        session = self.sites[decision.site].session
        if session is None:
            return RejectReason.SITE_OFFLINE
        try:
            return await session.open_stream(OpenPayload(TargetKind.ROUTE, decision.route, req.calling_ae))
        except StreamLimitReached:
            return RejectReason.CAPACITY
        except (ConnectionDraining, LinkError):
            return RejectReason.SITE_OFFLINE

    async def _agent_stream(self, site: SiteState, stream: TunnelStream) -> None:
        """A stream the site's agent opened: only this site's cloud destinations are reachable."""
        def choose(req: AssociateRequest) -> Destination | ErrorCode:
            if stream.open.kind is not TargetKind.CALLED_AE or stream.open.target != req.called_ae:
                return ErrorCode.PROTOCOL_ERROR
            return decide_destination(site.destinations, req.called_ae, req.calling_ae)

        await serve_stream(stream, limits=IngressLimits(), choose=choose, connect_timeout=CONNECT_TIMEOUT,
                           tracker=self.tracker, direction="site-to-cloud", site=site.name)

    # --- the agent-facing WebSocket ---------------------------------------------------------------------

    async def _tunnel_ws(self, request: web.Request) -> web.StreamResponse:
        identity = self.admit_request(request)
        if not isinstance(identity, Identity):  # the header tells the agent why (docs/protocol.md §1)
            raise web.HTTPForbidden(text="a valid, unrevoked site certificate is required\n",
                                    headers={REFUSED_HEADER: identity.value})
        self._authenticated(request)
        tune(request.transport)
        ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_MESSAGE_IN, autoping=True)
        await ws.prepare(request)
        await self._serve_session(identity, ws, f"{request.remote}", "websocket")
        return ws

    async def _tunnel_wg_ws(self, request: web.Request) -> web.StreamResponse:
        """The WireGuard transport: the site is the peer whose tunnel address the connection comes from."""
        assert self.wireguard is not None
        site = self.wireguard.site_of(request.remote)
        if site is None:
            log.warning("refused wireguard tunnel from %s: no peer has that address", request.remote)
            raise web.HTTPForbidden(text="unknown WireGuard peer\n")
        tune(request.transport)
        ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_MESSAGE_IN, autoping=True)
        await ws.prepare(request)
        await self._serve_session(Identity(site, None, None), ws, f"{request.remote} (wireguard)", "wireguard")
        return ws

    async def _tunnel_inner_ws(self, request: web.Request) -> web.StreamResponse:
        """Inner-TLS mode, for agents behind a TLS-inspecting proxy: the outer TLS may end at the proxy,
        so the agent's identity comes from a second mutual-TLS session run inside the WebSocket."""
        tune(request.transport)
        ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_MESSAGE_IN, autoping=True)
        await ws.prepare(request)
        admitted: list[Identity] = []

        def admit(conn: InnerTlsWebSocket) -> bytes | None:
            # Before READY (docs/protocol.md §1): a refused agent never sees a session, only the close
            # (1008, "<token>: ...") that tells it why.
            identity = self.admit_der(conn.getpeercert(binary_form=True), request.remote, request.path)
            if isinstance(identity, Identity):
                admitted.append(identity)
                return None
            return close_message(identity)

        try:
            inner = await inner_tls_server(ws, self._inner_ctx, INNER_HANDSHAKE_TIMEOUT, admit=admit)
        except InnerTlsError as exc:
            if exc.failure is not InnerTlsFailure.NOT_ADMITTED:  # admit() logged that refusal
                log.warning("refused inner-TLS tunnel from %s: %s", request.remote, exc)
            return ws
        self._authenticated(request)
        await self._serve_session(admitted[0], inner, f"{request.remote} (inner TLS)", "websocket, inner TLS")
        return ws

    def _authenticated(self, request: web.Request) -> None:
        """The request's connection proved its identity: it no longer counts as unauthenticated."""
        if self.gate is not None:
            self.gate.authenticated(request.transport)

    async def _serve_session(self, identity: Identity, ws, peer: str, transport: str) -> None:
        site = self._site_state(identity.site)

        async def on_stream(stream: TunnelStream) -> None:
            await self._agent_stream(site, stream)

        def on_report(payload: bytes) -> None:
            try:
                site.report = parse_report(payload)
            except ReportError as exc:
                site.reports_ignored += 1
                if not site.report_log.take(time.monotonic()):
                    site.reports_unlogged += 1
                    return
                more = f" ({site.reports_unlogged} more since the last line)" if site.reports_unlogged else ""
                site.reports_unlogged = 0
                log.warning("tunnel=%s ignored a health report: %s%s", site.name, exc, more)
                return
            site.report_at = time.time()

        session = MuxSession(ws, Mux(Role.RELAY, self.limits),
                             heartbeat_interval=self.settings.tunnel.heartbeat_interval,
                             on_stream=on_stream, label=site.name, on_report=on_report)
        previous = site.session
        site.session, site.peer = session, peer
        site.report = site.report_at = None  # a new tunnel reports afresh
        site.serial, site.not_after = identity.serial, identity.not_after
        site.transport = transport
        site.connects += 1
        log.info("tunnel=%s connected from %s", site.name, peer, extra={"tunnel": site.name, "peer": peer})
        if previous is not None:
            # Not awaited: the old connection may be a peer that stopped reading, and the site's new
            # tunnel is served from this moment whatever state the old one is in.
            previous.close_nowait(ErrorCode.GOING_AWAY, "replaced by a newer connection from the site")
        try:
            await session.run()
        finally:
            if site.session is session:
                site.session = None
            site.last_disconnect = time.time()
            site.last_disconnect_reason = session.close_reason or "closed"
            log.info("tunnel=%s disconnected: %s", site.name, site.last_disconnect_reason,
                     extra={"tunnel": site.name, "reason": site.last_disconnect_reason})

    def authenticate_request(self, request: web.Request) -> Identity | None:
        """The site behind this request's verified client certificate, if the registry lets it in."""
        identity = self.admit_request(request)
        return identity if isinstance(identity, Identity) else None

    def authenticate_der(self, der: bytes | None, remote: str | None, path: str) -> Identity | None:
        """The site of a certificate the TLS layer already verified (outer or inner), if the registry agrees."""
        identity = self.admit_der(der, remote, path)
        return identity if isinstance(identity, Identity) else None

    def admit_request(self, request: web.Request) -> Identity | RefusalToken:
        """:meth:`admit_der` for the client certificate of this request's TLS connection."""
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        return self.admit_der(der, request.remote, request.path)

    def admit_der(self, der: bytes | None, remote: str | None, path: str) -> Identity | RefusalToken:
        """The site of a certificate the TLS layer already verified (outer or inner) if the registry agrees,
        else the ``Tunnel-Refused`` token that tells the agent why (logged here, once)."""
        if not der:
            log.warning("refused %s from %s: no client certificate", path, remote)
            return RefusalToken.NO_CERTIFICATE
        try:
            name = site_from_certificate(der)
            serial = serial_hex(pki.certificate_serial(der))
        except PkiError as exc:
            log.warning("refused %s from %s: %s", path, remote, exc)
            return RefusalToken.UNKNOWN_CERTIFICATE
        verdict = self.registry.check_certificate(serial, name)
        if verdict is not CertificateVerdict.OK:
            log.warning("refused %s from %s: site=%s certificate %s: %s", path, remote, name, serial,
                        verdict.value)
            return _REFUSAL_TOKENS[verdict]
        not_after = pki.certificate_not_after(der).timestamp()
        return Identity(name, serial, not_after)

    def _site_state(self, name: str) -> SiteState:
        """Sites from the config have routes; a site enrolled only in the registry can connect with none."""
        site = self.sites.get(name)
        if site is None:
            site = self.sites[name] = SiteState(name, {})
        return site

    def has_routes(self, name: str) -> bool:
        site = self.sites.get(name)
        return bool(site and site.destinations) or any(
            r.site == name for table in self.tables.values() for r in table.values())

    def reload_routing(self) -> None:
        """Rebuild the listener tables and the sites' destinations from the registry (config + API rows)."""
        tables: dict[str, dict[str, IngressRoute]] = {li.name: {} for li in self.settings.listeners}
        for r in self.registry.routes():
            if r.listener in tables:
                tables[r.listener][r.called_ae] = IngressRoute(r.called_ae, r.site, r.route, frozenset(r.allowed))
        destinations: dict[str, dict[str, Destination]] = {}
        for d in self.registry.destinations():
            destinations.setdefault(d.site, {})[d.called_ae] = Destination(
                d.called_ae, d.host, d.port, None, frozenset(d.allowed))
        for name in destinations.keys() - self.sites.keys():
            self._site_state(name)
        for name, site in self.sites.items():
            site.destinations = destinations.get(name, {})
        self.tables = tables
        self._routing_version = self.registry.data_version()

    def public_url(self) -> str:
        """The URL enrollment tokens carry: ``tunnel.public_url``, else derived from the relay certificate."""
        t = self.settings.tunnel
        if t.public_url:
            return t.public_url
        names = pki.relay_hostnames(self.settings.state_dir)
        host = names[0] if names else "localhost"
        host = f"[{host}]" if ":" in host else host
        return f"wss://{host}:{self.bound.get('tunnel', (None, t.port))[1]}{t.path}"

    # --- revocation, expiry, renewal --------------------------------------------------------------------

    def certificate_renewed(self, identity: Identity, serial: str, not_after: float) -> None:
        """A live tunnel that authenticated with ``identity``'s certificate now stands on the new one."""
        site = self.sites.get(identity.site)
        if site is not None and site.session is not None and site.serial == identity.serial:
            site.serial, site.not_after = serial, not_after

    async def enforce_revocations(self, now: float | None = None, *, sync_wireguard: bool = True,
                                  wait: bool = True) -> list[str]:
        """Close every live tunnel whose certificate is revoked, whose site is revoked, or that expired; and
        (``sync_wireguard``) bring the WireGuard peers in line with the registry first.

        Closing sends GOAWAY ``REVOKED`` and never waits on the peer (``MuxSession.close_nowait``), so one
        stalled site cannot delay this for the others. Only WireGuard removals wait, all together and for
        at most ``CLOSE_TIMEOUT``, so that the GOAWAY leaves through the tunnel before its peer goes.
        With ``wait`` (the admin API: the tunnel is gone when the command returns) it then waits, again
        for all together and bounded, until the closed sessions have ended; the sweep does not wait."""
        now = time.time() if now is None else now
        closed = []
        if self.wireguard is not None:
            allowed = {site for site, _key, _address in self.registry.wg_peers()}
            closes = []
            for site in self.sites.values():
                if (site.session is not None and not site.session.closing and site.transport == "wireguard"
                        and site.name not in allowed):
                    log.warning("tunnel=%s closing: WireGuard peer removed", site.name, extra={"tunnel": site.name})
                    closes.append(site.session.close(ErrorCode.REVOKED, "WireGuard peer removed (site revoked)"))
                    closed.append(site.name)
            await asyncio.gather(*closes)
            if sync_wireguard or closed:
                await self.wireguard.sync()
        ending: list[MuxSession] = []
        live = {s.serial: s for s in self.sites.values()
                if s.session is not None and not s.session.closing and s.serial is not None}
        refused = self.registry.refused_among(live)
        for serial, site in live.items():
            if serial in refused:
                reason = f"certificate {serial} refused: {refused[serial].value}"
            elif site.not_after is not None and now >= site.not_after:
                reason = f"certificate {serial} expired"
            else:
                continue
            session = site.session
            assert session is not None
            log.warning("tunnel=%s closing: %s", site.name, reason, extra={"tunnel": site.name, "reason": reason})
            session.close_nowait(ErrorCode.REVOKED, reason)
            ending.append(session)
            closed.append(site.name)
        if wait and ending:
            await wait_for_events([s.ended for s in ending], 2 * CLOSE_TIMEOUT)
        return closed

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                changed = self.registry.data_version() != self._routing_version  # another process wrote
                if changed:
                    self.reload_routing()
                await self.enforce_revocations(sync_wireguard=changed, wait=False)
                if self.wireguard is not None:
                    await self.wireguard.refresh()
            except Exception:  # a locked or broken registry must not kill the sweeper; say so and retry
                log.exception("revocation sweep failed")

    # --- status -----------------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        sites = []
        now = time.time()
        wg = self.wireguard.handshakes() if self.wireguard is not None else None
        for site in self.sites.values():
            session = site.session
            health = site.health(now)
            sites.append({
                "name": site.name,
                "condition": health.condition.value,
                "reason": health.reason,
                "transport": site.transport if session else None,
                "wireguard": wg.get(site.name) if wg is not None else None,
                "health": site.report.as_dict() if site.report else None,
                "health_age_s": round(now - site.report_at, 1) if site.report_at else None,
                "reports_ignored": site.reports_ignored,
                "connected": session is not None,
                "peer": site.peer if session else None,
                "connected_since": session.connected_at if session else None,
                "rtt_ms": round(session.rtt * 1000, 3) if session and session.rtt is not None else None,
                "active_streams": session.active_streams if session else 0,
                "connects": site.connects,
                "last_disconnect": site.last_disconnect,
                "last_disconnect_reason": site.last_disconnect_reason,
                "certificate_serial": site.serial if session else None,
                "certificate_not_after": site.not_after if session else None,
            })
        return {
            "started": self.started,
            "sites": sites,
            "associations": [a.as_dict() for a in self.tracker.active.values()],
            "outcomes": dict(self.tracker.outcomes),
            "process": process_stats(),
        }

    def site_views(self) -> list[dict[str, object]]:
        """Every registered site: the registry's record, whether it has routes, and whether it is connected."""
        views = []
        for record in self.registry.sites():
            state = self.sites.get(record.name)
            views.append({**record.as_dict(), "configured": self.has_routes(record.name),
                          "connected": state is not None and state.session is not None})
        return views


def _config_routes(settings: RelaySettings) -> list[RouteRecord]:
    return [RouteRecord(li.name, r.called_ae, r.site, r.route, tuple(r.allowed_calling_aes), "config")
            for li in settings.listeners for r in li.routes]


def _config_destinations(settings: RelaySettings) -> list[DestinationRecord]:
    return [DestinationRecord(site.name, d.called_ae, d.host, d.port, tuple(d.allowed_calling_aes), "config")
            for site in settings.sites for d in site.destinations]

