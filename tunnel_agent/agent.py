"""The agent: keeps outbound tunnels to the relays up, and carries associations both ways.

Theory of operation: :class:`Agent` is the composition root. It builds, from the typed settings, the
tunnels' supervisor (``tunnel_agent.fleet``: the primary tunnel to ``relay_url`` and, with ``[fleet]
tunnels`` above 1, tunnels to other relays of the fleet; each a ``tunnel_agent.tunnel``: connect,
backoff, refusals), the DICOM edges
(``tunnel_agent.carrier``: streams the relay opens reach only this config's ``[[routes]]``; the local
listener carries callers out), the certificate's renewal (``tunnel_agent.renewal``), the health monitor
(``tunnel_agent.health``) and, with ``transport = "wireguard"``, the WireGuard transport; it serves the
status port (``/api/status``, ``/metrics``, ``/healthz``, ``/readyz``) from one snapshot of them all
(``tunnel_agent.status``). Each part gets the narrow collaborator it uses, never the agent.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
from collections.abc import Callable
from contextlib import AsyncExitStack

from aiohttp import web

from tunnel_agent import metrics
from tunnel_agent.carrier import Carrier
from tunnel_agent.config import AgentSettings
from tunnel_agent.enroll import relay_url_mismatch, with_enrollment
from tunnel_agent.fleet import Fleet
from tunnel_agent.health import HealthMonitor
from tunnel_agent.renewal import Renewal
from tunnel_agent.spool.service import SpoolService
from tunnel_agent.status import AgentStatus, TransportStatus
from tunnel_agent.tunnel import Tunnel
from tunnel_agent.version import __version__
from tunnel_agent.wgtransport import WireGuardTransport
from tunnel_core.frames import OpenPayload
from tunnel_core.health import AgentState, agent_readiness
from tunnel_link.aio import cancel_and_wait
from tunnel_link.associations import AssociationTracker
from tunnel_link.errors import LinkError
from tunnel_link.httpserver import serve_tcp
from tunnel_link.pipe import PipeServer
from tunnel_link.session import MuxSession, TunnelStream
from tunnel_runtime.procstats import process_stats

log = logging.getLogger("agent")


class Agent:
    """Build with settings, then ``await run()``; ``stop()`` ends it cleanly. In tests: ``await start(stack)``
    binds the ports, then ``connect_forever()`` keeps the tunnel up."""

    def __init__(self, settings: AgentSettings, *, rand: Callable[[], float] = random.random) -> None:
        settings = with_enrollment(settings)
        self.settings = settings
        self.bound: dict[str, tuple[str, int]] = {}
        self.tracker = AssociationTracker("a")
        self._stopping = asyncio.Event()
        self.renewal = Renewal(settings)
        self.wireguard = (WireGuardTransport(settings, session=lambda: self.tunnel.session)
                          if settings.transport == "wireguard" else None)
        self.spool = SpoolService(settings, open_stream=self._open_stream) if settings.spooled() else None
        self.carrier = Carrier(settings, self.tracker, session=lambda: self.fleet.pick(),
                               ingest=lambda: self.spool.ingest if self.spool else None)
        self.fleet = Fleet(settings, on_stream=self.carrier.relay_stream, site_name=self.renewal.site_name,
                           stopping=self._stopping, wireguard=self.wireguard, rand=rand)
        self.tunnel: Tunnel = self.fleet.primary
        self.health = HealthMonitor(self.tunnel, self.renewal, settings.health, settings.routes,
                                    state_dir=settings.state_dir, version=__version__,
                                    spool=self.spool.report if self.spool is not None else tuple,
                                    sessions=self.fleet.sessions)

    @property
    def state(self) -> AgentState:
        return self.tunnel.state

    @property
    def session(self) -> MuxSession | None:
        return self.tunnel.session

    # --- lifecycle --------------------------------------------------------------------------------------

    async def run(self) -> None:
        async with AsyncExitStack() as stack:
            await self.start(stack)
            jobs = [self.fleet.run(), self.renewal.run(), self.health.run()]
            if self.spool is not None:
                jobs.append(self.spool.run())
            for job in jobs:
                stack.push_async_callback(cancel_and_wait, asyncio.create_task(job))
            await self._stopping.wait()
            await self.fleet.close("agent shutting down")

    async def start(self, stack: AsyncExitStack) -> None:
        """Bind the status endpoint and the local DICOM listener; torn down with ``stack``."""
        s = self.settings
        if self.wireguard is not None:
            stack.push_async_callback(self.wireguard.close)  # the interface goes last, after the tunnel
        if self.spool is not None:
            await self.spool.start()  # replay before the listener takes a new instance
            stack.callback(self.spool.close)
        self.bound["status"] = await serve_tcp(stack, self._status_app(), s.status.host, s.status.port,
                                               request_timeout=s.heartbeat_interval, logger_name="agent.http")
        if s.listener.enabled:
            server = PipeServer(self.carrier.local_caller)
            self.bound["listener"] = await server.start(s.listener.host, s.listener.port)
            stack.push_async_callback(server.close)
        log.info("agent up: %s; relay %s", ", ".join(f"{k}={h}:{p}" for k, (h, p) in self.bound.items()),
                 s.relay_url)
        if (mismatch := relay_url_mismatch(s)) is not None:
            log.warning("%s", mismatch)

    async def connect_forever(self) -> None:
        """The tunnels' supervisor alone (``run()`` starts it with the renewal and the health monitor)."""
        await self.fleet.run()

    def stop(self) -> None:
        self._stopping.set()

    async def _open_stream(self, open_payload: OpenPayload) -> TunnelStream:
        """A stream to the relay for the spool's forwarders, on the live tunnel with the fewest streams;
        LinkError when there is none."""
        session = self.fleet.pick()
        if session is None or session.draining:
            raise LinkError("no tunnel to the relay")
        return await session.open_stream(open_payload)

    # --- status -----------------------------------------------------------------------------------------

    def snapshot(self) -> AgentStatus:
        """One consistent view of every part, for ``/api/status`` and ``/metrics``."""
        tunnel, session = self.tunnel, self.tunnel.session
        rtt = session.rtt if session is not None else None
        return AgentStatus(
            version=__version__,
            state=tunnel.state,
            relay_url=self.settings.relay_url,
            connected_since=session.connected_at if session else None,
            rtt_ms=round(rtt * 1000, 3) if rtt is not None else None,
            active_streams=session.active_streams if session else 0,
            connects=tunnel.connects,
            last_error=tunnel.last_error,
            next_attempt=tunnel.next_attempt if tunnel.state.waiting else None,
            certificate_not_after=self.renewal.certificate_not_after(),
            renewals=self.renewal.renewals,
            renewal_error=self.renewal.renewal_error,
            routes=tuple(sorted(self.carrier.routes)),
            listener="{}:{}".format(*self.bound["listener"]) if "listener" in self.bound else None,
            associations=tuple(copy.copy(a) for a in self.tracker.active.values()),
            outcomes=dict(self.tracker.outcomes),
            process=process_stats(),
            health=self.health.latest,
            transport=self.wireguard.status() if self.wireguard else TransportStatus(),
            spool=self.spool.snapshot() if self.spool is not None and self.spool.ingest is not None else (),
            tunnels=self.fleet.status(),
        )

    def status(self) -> dict[str, object]:
        """``GET /api/status`` (docs/api.md)."""
        return self.snapshot().as_dict()

    def _status_app(self) -> web.Application:
        async def status(request: web.Request) -> web.Response:
            return web.json_response(self.status())

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async def readyz(request: web.Request) -> web.Response:
            """Ready while a tunnel to a relay is up (``tunnel_core.health.agent_readiness``): the primary, or
            while it reconnects, another relay's."""
            state = AgentState.CONNECTED if self.fleet.connected else self.tunnel.state
            ready = agent_readiness(state=state, last_error=self.tunnel.last_error)
            return web.json_response({"ready": ready.ready, "reason": ready.reason},
                                     status=200 if ready.ready else 503)

        app = web.Application()
        app.router.add_get("/api/status", status)
        app.router.add_get("/metrics", metrics.handler(self.snapshot, self.tracker))  # tunnel_agent.metrics
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app
