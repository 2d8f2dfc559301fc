"""The agent: keeps one outbound mutual-TLS WebSocket to the relay up, and carries associations both ways.

- The connection loop never gives up on a transient failure: each attempt re-resolves DNS and rebuilds
  the TLS context (so renewed certificates are used), and failures wait a full-jitter exponential backoff.
  A dead relay is noticed within three heartbeat intervals of silence.
- A refusal by the relay is not transient (``tunnel_core.refusal``): revoked (a 403 saying so, or GOAWAY
  REVOKED ending the live tunnel), the state becomes "revoked", ``last_error`` says so and what to do, and
  the next attempt waits ``revoked_retry`` (other refusals: "refused", ``refused_retry``), or until a new
  certificate is in place (a re-enrollment), whichever comes first.
- A stream the relay opens names a route; the route maps to a destination in *this* config and nothing
  else can be dialed, whatever the relay asks.
- The local DICOM listener carries associations from modalities and the PACS out to the relay, routed
  there by called AE among this site's cloud destinations.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID

from tunnel_agent import metrics
from tunnel_agent.config import AgentSettings
from tunnel_agent.connect import explain_untrusted_relay, refusal_token
from tunnel_agent.enroll import EnrollError, relay_url_mismatch, renew, renewal_due, with_enrollment
from tunnel_agent.health import HealthMonitor
from tunnel_agent.wgtransport import WireGuardTransport
from tunnel_core.backoff import Backoff
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.dicom import AssociateRequest, RejectReason
from tunnel_core.frames import OpenPayload
from tunnel_core.health import AgentState, agent_readiness
from tunnel_core.mux import ConnectionDraining, Mux, Role, StreamLimitReached
from tunnel_core.refusal import Refusal, refusal_from_goaway, refusal_from_token, retry_delay
from tunnel_core.routing import Destination, decide_destination
from tunnel_link.aio import cancel_and_wait
from tunnel_link.associations import (
    Association,
    AssociationTracker,
    IngressLimits,
    serve_caller,
    serve_stream,
)
from tunnel_link.errors import LinkError
from tunnel_link.httpserver import serve_tcp
from tunnel_link.pipe import Pipe, PipeServer
from tunnel_link.session import MuxSession, TunnelStream
from tunnel_link.tls import client_context
from tunnel_runtime.procstats import process_stats

log = logging.getLogger("agent")

__version__ = "0.1.0"

RENEW_RECHECK = 3600.0  # seconds between looks at the certificate while renewal is not due
RENEW_RETRY = 60.0  # seconds between attempts once it is due
CERTIFICATE_WATCH = 2.0  # seconds between looks at cert_file while refused: a re-enrollment is tried at once


class Agent:
    """Build with settings, then ``await run()``; ``stop()`` ends it cleanly."""

    def __init__(self, settings: AgentSettings, *, rand=random.random) -> None:
        settings = with_enrollment(settings)
        self.settings = settings
        self.renewals = 0
        self.renewal_error = ""
        self.limits = settings.mux.to_limits()
        self.routes = {r.name: Destination(r.name, r.host, r.port, r.called_ae) for r in settings.routes}
        self.ingress_limits = IngressLimits(settings.listener.artim_timeout,
                                            settings.listener.max_associate_rq)
        self.tracker = AssociationTracker("a")
        self.backoff = Backoff(settings.backoff_initial, settings.backoff_max, rand)
        self.session: MuxSession | None = None
        self.state = AgentState.STARTING
        self.connects = 0
        self.last_error = ""
        self.next_attempt: float | None = None
        self.bound: dict[str, tuple[str, int]] = {}
        self._stopping = asyncio.Event()
        self.started = time.time()
        self.health = HealthMonitor(self, self, settings.health, settings.routes, state_dir=settings.state_dir,
                                    version=__version__)
        self.wireguard = (WireGuardTransport(settings, session=lambda: self.session)
                          if settings.transport == "wireguard" else None)

    # --- lifecycle --------------------------------------------------------------------------------------

    async def run(self) -> None:
        async with AsyncExitStack() as stack:
            await self.start(stack)
            loop_task = asyncio.create_task(self.connect_forever())
            stack.push_async_callback(cancel_and_wait, loop_task)
            renew_task = asyncio.create_task(self.renew_forever())
            stack.push_async_callback(cancel_and_wait, renew_task)
            health_task = asyncio.create_task(self.health.run())
            stack.push_async_callback(cancel_and_wait, health_task)
            await self._stopping.wait()
            if self.session is not None:
                await self.session.close(ErrorCode.GOING_AWAY, "agent shutting down")

    async def start(self, stack: AsyncExitStack) -> None:
        """Bind the status endpoint and the local DICOM listener; torn down with ``stack``."""
        s = self.settings
        if self.wireguard is not None:
            stack.push_async_callback(self.wireguard.close)  # the interface goes last, after the tunnel
        app = web.Application()
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/metrics", metrics.handler(self))  # Prometheus (tunnel_agent.metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self.bound["status"] = await serve_tcp(stack, app, s.status.host, s.status.port,
                                               request_timeout=s.heartbeat_interval, logger_name="agent.http")
        if s.listener.enabled:
            server = PipeServer(self._on_caller)
            self.bound["listener"] = await server.start(s.listener.host, s.listener.port)
            stack.push_async_callback(server.close)
        log.info("agent up: %s; relay %s", ", ".join(f"{k}={h}:{p}" for k, (h, p) in self.bound.items()),
                 s.relay_url)
        if (mismatch := relay_url_mismatch(s)) is not None:
            log.warning("%s", mismatch)

    def stop(self) -> None:
        self._stopping.set()

    # --- the tunnel -------------------------------------------------------------------------------------

    async def connect_forever(self) -> None:
        """Connect, serve and reconnect until ``stop()``: after a failure the backoff, after a refusal by
        the relay (see the module doc) ``revoked_retry`` / ``refused_retry``."""
        while not self._stopping.is_set():
            self.state = AgentState.CONNECTING
            refusal: Refusal | None = None
            try:
                refusal = await self._connect_once()
            except asyncio.CancelledError:
                raise
            except aiohttp.ClientConnectorCertificateError as exc:
                # Fail closed, and say who is in the way: usually a TLS-inspecting proxy.
                self.last_error = await explain_untrusted_relay(self.settings, exc)
                log.error("tunnel to relay refused: %s", self.last_error)
            except Exception as exc:  # the supervisor must survive anything transient; say what it was
                token = refusal_token(exc, inner=self.settings.tls_mode == "inner")
                refusal = refusal_from_token(token, site=self._site_name())
                if refusal is None:
                    self.last_error = _describe(exc)
                    log.warning("tunnel to relay failed: %s", self.last_error)
            if refusal is None:
                delay = self.backoff.next_delay()
                self.state = AgentState.BACKOFF
                log.info("reconnecting in %.2fs (attempt %d)", delay, self.backoff.attempt)
            else:
                delay = retry_delay(refusal, revoked_retry=self.settings.revoked_retry,
                                    refused_retry=self.settings.refused_retry)
                self.state, self.last_error = AgentState(refusal.kind.value), refusal.describe()
                log.error("%s; next attempt in %.0fs, or as soon as a new certificate is in place",
                          self.last_error, delay)
            self.next_attempt = time.time() + delay
            await self._wait(delay, watch_certificate=refusal is not None)

    async def _wait(self, delay: float, *, watch_certificate: bool) -> None:
        """Wait ``delay`` seconds, or until ``stop()``; with ``watch_certificate`` also until ``cert_file``
        is replaced (``tunnel-agent enroll --force`` after the site was reinstated)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        stamp = _file_stamp(self.settings.cert_file)
        while (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._stopping.wait(),
                                       timeout=min(left, CERTIFICATE_WATCH) if watch_certificate else left)
                return
            except TimeoutError:
                pass
            if watch_certificate and _file_stamp(self.settings.cert_file) != stamp:
                log.info("a new certificate is in place (%s): connecting now", self.settings.cert_file)
                return

    async def _connect_once(self) -> Refusal | None:
        """One tunnel, served until it ends. Returns the refusal its end carried (GOAWAY REVOKED), if any."""
        s = self.settings
        ssl_ctx = client_context(s.cert_file, s.key_file, s.ca_file)
        from tunnel_agent.connect import open_tunnel

        # Direct or through the configured HTTP proxy; a proxy's failure is a one-line ProxyError. With
        # transport = "wireguard", through the WireGuard interface, with that as its fallback.
        opening = self.wireguard.open(lambda: open_tunnel(s, ssl_ctx)) if self.wireguard else open_tunnel(s, ssl_ctx)
        async with opening as ws:
            session = MuxSession(ws, Mux(Role.AGENT, self.limits),
                                 heartbeat_interval=s.heartbeat_interval, on_stream=self._relay_stream,
                                 label="relay")
            self.session, self.state, self.last_error = session, AgentState.CONNECTED, ""
            self.connects += 1
            self.backoff.reset()
            log.info("tunnel to relay connected (%s)", s.relay_url)
            try:
                await session.run()
            finally:
                self.session = None
                self.state = AgentState.DISCONNECTED
                self.last_error = session.close_reason or "closed"
                log.info("tunnel to relay closed: %s", self.last_error)
        return refusal_from_goaway(session.goaway_code, site=self._site_name())

    async def _relay_stream(self, stream: TunnelStream) -> None:
        """The relay opened a stream: it may only name one of our routes."""
        def choose(req: AssociateRequest) -> Destination | ErrorCode:
            if stream.open.kind is not TargetKind.ROUTE:
                return ErrorCode.UNKNOWN_ROUTE
            return decide_destination(self.routes, stream.open.target, req.calling_ae)

        await serve_stream(stream, limits=self.ingress_limits, choose=choose,
                           connect_timeout=self.settings.connect_timeout, tracker=self.tracker,
                           direction="cloud-to-site")

    # --- certificate renewal ---------------------------------------------------------------------------

    async def renew_forever(self) -> None:
        """Renew the certificate two thirds into its lifetime, over the relay's port; the live tunnel
        carries on (the relay moves it onto the new certificate) and the next connection uses the new one."""
        while True:
            try:
                due = renewal_due(self.settings.cert_file.read_bytes())
            except (OSError, ValueError) as exc:
                self.renewal_error = f"cannot read {self.settings.cert_file}: {exc}"
                due = time.time() + RENEW_RECHECK
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(min(delay, RENEW_RECHECK))  # re-read: the file may be replaced meanwhile
                continue
            try:
                not_after = await renew(self.settings)
            except EnrollError as exc:
                self.renewal_error = str(exc)
                log.warning("certificate renewal failed (retrying in %.0fs): %s", RENEW_RETRY, exc)
                await asyncio.sleep(RENEW_RETRY)
                continue
            self.renewals += 1
            self.renewal_error = ""
            log.info("certificate renewed; valid until %s",
                     time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after)))

    def _certificate(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self.settings.cert_file.read_bytes())
        except (OSError, ValueError):
            return None

    def certificate_not_after(self) -> float | None:
        cert = self._certificate()
        return cert.not_valid_after_utc.timestamp() if cert is not None else None

    def _site_name(self) -> str:
        """This site's name (the certificate's CN), for the commands in a refusal's hint."""
        cert = self._certificate()
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if cert is not None else []
        return str(names[0].value) if names else "NAME"

    # --- the local DICOM listener ---------------------------------------------------------------------

    async def _on_caller(self, pipe: Pipe) -> None:
        await serve_caller(pipe, limits=self.ingress_limits, decide=self._route_caller, tracker=self.tracker,
                           direction="site-to-cloud")

    async def _route_caller(self, req: AssociateRequest, assoc: Association) -> TunnelStream | RejectReason:
        session = self.session
        if session is None or session.draining:
            return RejectReason.SITE_OFFLINE
        try:
            return await session.open_stream(OpenPayload(TargetKind.CALLED_AE, req.called_ae, req.calling_ae))
        except StreamLimitReached:
            return RejectReason.CAPACITY
        except (ConnectionDraining, LinkError):
            return RejectReason.SITE_OFFLINE

    # --- status -----------------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        session = self.session
        return {
            "version": __version__,
            "state": self.state.value,
            "relay_url": self.settings.relay_url,
            "connected_since": session.connected_at if session else None,
            "rtt_ms": round(session.rtt * 1000, 3) if session and session.rtt is not None else None,
            "active_streams": session.active_streams if session else 0,
            "connects": self.connects,
            "reconnects": max(0, self.connects - 1),
            "last_error": self.last_error,
            "next_attempt": self.next_attempt if self.state.waiting else None,
            "certificate_not_after": self.certificate_not_after(),
            "renewals": self.renewals,
            "renewal_error": self.renewal_error,
            "routes": sorted(self.routes),
            "listener": "{}:{}".format(*self.bound["listener"]) if "listener" in self.bound else None,
            "associations": [a.as_dict() for a in self.tracker.active.values()],
            "outcomes": dict(self.tracker.outcomes),
            "process": process_stats(),
            "health": self.health.latest.as_dict() if self.health.latest else None,
            **(self.wireguard.status() if self.wireguard else {"transport": "websocket", "transport_reason": ""}),
        }

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        """Ready while the tunnel to the relay is up (``tunnel_core.health.agent_readiness``)."""
        ready = agent_readiness(state=self.state, last_error=self.last_error)
        return web.json_response({"ready": ready.ready, "reason": ready.reason}, status=200 if ready.ready else 503)


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced (enrollment renames a new one into place)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _describe(exc: BaseException) -> str:
    """A one-line, secret-free reason for ops."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]

