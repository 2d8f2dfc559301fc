"""The relay's tunnel endpoints: the WebSocket each site's agent connects to, and the streams it carries.

- ``[tunnel] path`` accepts one WebSocket per site over mutual TLS. The site is the CN of the client
  certificate the TLS handshake verified against the relay CA, if the registry agrees (``relay.identity``)
  — never anything the agent says. A refused agent hears why (``Tunnel-Refused``, docs/protocol.md §1).
- ``inner_path`` is the same for agents behind a TLS-inspecting proxy: the agent's identity comes from a
  second mutual-TLS session run inside the WebSocket, checked before READY.
- With ``[wireguard]``, plain WebSockets come through the WireGuard interface; the site is the peer
  whose tunnel address the connection comes from.
- Each accepted WebSocket becomes the site's :class:`~tunnel_link.session.MuxSession` (replacing an
  older one). Streams the agent opens name a called AE and are dialed only to that site's
  ``[[sites.destinations]]``; REPORT frames become the site's health report.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from relay.identity import Admission, Identity, RegistryDown
from relay.sites import SiteState, SiteTable
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.dicom import AssociateRequest
from tunnel_core.discovery import AGENT_HEADER, AGENT_NAME, FLEET_HEADER
from tunnel_core.limits import MuxLimits
from tunnel_core.mux import Mux, Role
from tunnel_core.refusal import REFUSED_HEADER, close_message
from tunnel_core.routing import Destination, decide_destination
from tunnel_link.associations import AssociationTracker, IngressLimits, serve_stream
from tunnel_link.innertls import InnerTlsError, InnerTlsFailure, InnerTlsWebSocket, inner_tls_server
from tunnel_link.session import MAX_MESSAGE_IN, MuxSession, TunnelStream
from tunnel_link.sockets import tune
from tunnel_link.transport import SUBPROTOCOLS

__all__ = ["CONNECT_TIMEOUT", "INNER_HANDSHAKE_TIMEOUT", "PeerAddresses", "TunnelEndpoints", "accept_websocket"]

log = logging.getLogger("relay")

CONNECT_TIMEOUT = 5.0  # seconds to reach a cloud destination for a stream the agent opened
INNER_HANDSHAKE_TIMEOUT = 10.0
# What an agent is told while its certificate cannot be checked (no token in it: it retries with backoff).
REGISTRY_DOWN = "registry unavailable, retry later"



class PeerAddresses(Protocol):
    """Which site a WireGuard tunnel address belongs to (``relay.wgtransport.RelayWireGuard``)."""

    def site_of(self, remote: str | None) -> str | None: ...


class TunnelEndpoints:
    """Build with the site table, the admission check and the tracker; route :meth:`websocket` and
    :meth:`inner_websocket` on the tunnel port and :meth:`wireguard_websocket` on the WireGuard one.

    ``authenticated(transport)`` is told of every connection that proved who it is (the tunnel port's
    gate then stops counting it as unauthenticated)."""

    def __init__(self, sites: SiteTable, admission: Admission, tracker: AssociationTracker, *, limits: MuxLimits,
                 heartbeat_interval: float, inner_context: ssl.SSLContext,
                 authenticated: Callable[[asyncio.BaseTransport | None], None],
                 wireguard: PeerAddresses | None = None,
                 fleet_header: Callable[[], str | None] = lambda: None) -> None:
        self.sites = sites
        self.admission = admission
        self.tracker = tracker
        self.limits = limits
        self.heartbeat_interval = heartbeat_interval
        self._inner_context = inner_context
        self._authenticated = authenticated
        self._wireguard = wireguard
        self._fleet_header = fleet_header
        self.draining = False  # the relay drains: a tunnel accepted now is told to go elsewhere at once

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        identity = await self.admission.admit_request(request)
        if isinstance(identity, RegistryDown):  # no Tunnel-Refused header: the agent retries with backoff
            raise web.HTTPServiceUnavailable(text=f"{REGISTRY_DOWN}\n")
        if not isinstance(identity, Identity):  # the header tells the agent why (docs/protocol.md §1)
            raise web.HTTPForbidden(text="a valid, unrevoked site certificate is required\n",
                                    headers={REFUSED_HEADER: identity.value})
        self._authenticated(request.transport)
        ws = await accept_websocket(request, self._fleet_header())
        await self.serve_session(identity, ws, f"{request.remote}", "websocket", agent_name(request))
        return ws

    async def fleet_list(self, request: web.Request) -> web.StreamResponse:
        """``GET /fleet/v1/relays``: the ``Tunnel-Fleet`` list as a JSON body, for an agent that holds fewer
        tunnels than it wants and whose lists went stale (docs/protocol.md §1.3). A site certificate the
        registry lets in is required, as for the tunnel; 404 when this relay gives agents no list."""
        identity = await self.admission.admit_request(request)
        if isinstance(identity, RegistryDown):
            raise web.HTTPServiceUnavailable(text=f"{REGISTRY_DOWN}\n")
        if not isinstance(identity, Identity):
            raise web.HTTPForbidden(text="a valid, unrevoked site certificate is required\n",
                                    headers={REFUSED_HEADER: identity.value})
        self._authenticated(request.transport)
        listed = self._fleet_header()
        if listed is None:
            raise web.HTTPNotFound(text="this relay lists no fleet\n")
        return web.Response(text=listed, content_type="application/json", headers={"Cache-Control": "no-store"})

    async def wireguard_websocket(self, request: web.Request) -> web.StreamResponse:
        """The WireGuard transport: the site is the peer whose tunnel address the connection comes from."""
        site = self._wireguard.site_of(request.remote) if self._wireguard is not None else None
        if site is None:
            log.warning("refused wireguard tunnel from %s: no peer has that address", request.remote)
            raise web.HTTPForbidden(text="unknown WireGuard peer\n")
        ws = await accept_websocket(request, self._fleet_header())
        await self.serve_session(Identity(site, None, None), ws, f"{request.remote} (wireguard)", "wireguard",
                                 agent_name(request))
        return ws

    async def inner_websocket(self, request: web.Request) -> web.StreamResponse:
        """Inner-TLS mode, for agents behind a TLS-inspecting proxy: the outer TLS may end at the proxy,
        so the agent's identity comes from a second mutual-TLS session run inside the WebSocket."""
        ws = await accept_websocket(request)
        admitted: list[Identity] = []

        async def admit(conn: InnerTlsWebSocket) -> bytes | None:
            # Before READY (docs/protocol.md §1): a refused agent never sees a session, only the close
            # (1008, "<token>: ...") that tells it why; a close without a token is an ordinary failure.
            der = conn.getpeercert(binary_form=True)
            identity = await self.admission.admit_der(der, request.remote, request.path)
            if isinstance(identity, Identity):
                admitted.append(identity)
                return None
            if isinstance(identity, RegistryDown):
                return REGISTRY_DOWN.encode()
            return close_message(identity)

        try:
            inner = await inner_tls_server(ws, self._inner_context, INNER_HANDSHAKE_TIMEOUT, admit=admit)
        except InnerTlsError as exc:
            if exc.failure is not InnerTlsFailure.NOT_ADMITTED:  # admit() logged that refusal
                log.warning("refused inner-TLS tunnel from %s: %s", request.remote, exc)
            return ws
        self._authenticated(request.transport)
        await self.serve_session(admitted[0], inner, f"{request.remote} (inner TLS)", "websocket, inner TLS",
                                 agent_name(request))
        return ws

    async def serve_session(self, identity: Identity, ws, peer: str, transport: str, agent: str = "") -> None:
        """Serve ``ws`` as ``identity``'s tunnel from ``agent`` until it ends; it replaces that agent's older
        tunnel, if any (the site's other agents keep theirs)."""
        site = self.sites.site(identity.site)

        async def on_stream(stream: TunnelStream) -> None:
            await self._agent_stream(site, stream)

        def on_report(payload: bytes) -> None:
            site.take_report(session, payload, time.time(), time.monotonic())

        session = MuxSession(ws, Mux(Role.RELAY, self.limits), heartbeat_interval=self.heartbeat_interval,
                             on_stream=on_stream, label=site.name, on_report=on_report)
        previous = site.connected(session, identity, peer, transport, agent)
        log.info("tunnel=%s connected from %s (agent %s)", site.name, peer, agent or "-",
                 extra={"tunnel": site.name, "peer": peer, "agent": agent})
        if self.draining:
            session.go_away(ErrorCode.GOING_AWAY, "relay draining")
        if previous is not None:
            # The agent's older tunnel takes no new stream from now on and closes once its associations have
            # finished (an agent whose second tunnel landed here through a balancer moves that one, and
            # nothing in flight is cut). Not awaited: the old connection may be a peer that stopped
            # reading, and the new tunnel is served from this moment; a dead one ends at its heartbeat.
            previous.go_away(ErrorCode.GOING_AWAY, "replaced by a newer connection from the agent")
        try:
            await session.run()
        finally:
            site.disconnected(session, time.time())
            log.info("tunnel=%s disconnected: %s", site.name, site.last_disconnect_reason,
                     extra={"tunnel": site.name, "reason": site.last_disconnect_reason})

    async def _agent_stream(self, site: SiteState, stream: TunnelStream) -> None:
        """A stream the site's agent opened: only this site's cloud destinations are reachable."""
        def choose(req: AssociateRequest) -> Destination | ErrorCode:
            if stream.open.kind is not TargetKind.CALLED_AE or stream.open.target != req.called_ae:
                return ErrorCode.PROTOCOL_ERROR
            return decide_destination(site.destinations, req.called_ae, req.calling_ae)

        await serve_stream(stream, limits=IngressLimits(), choose=choose, connect_timeout=CONNECT_TIMEOUT,
                           tracker=self.tracker, direction="site-to-cloud", site=site.name)


def agent_name(request: web.Request) -> str:
    """The agent's name from its ``Tunnel-Agent`` header (which of a site's agents this is), or "" when it
    sends none or one that is not a name: it then counts as the site's one unnamed agent."""
    name = request.headers.get(AGENT_HEADER, "")
    return name if AGENT_NAME.fullmatch(name) else ""


async def accept_websocket(request: web.Request, fleet: str | None = None) -> web.WebSocketResponse:
    """Upgrade to the tunnel's WebSocket: no compression, the mux's message bound, pings answered; with
    ``fleet``, the 101 carries it as ``Tunnel-Fleet`` (the relays an agent may dial, docs/protocol.md §1.3)."""
    tune(request.transport)
    ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_MESSAGE_IN, autoping=True, protocols=SUBPROTOCOLS)
    if fleet is not None:
        ws.headers[FLEET_HEADER] = fleet
    await ws.prepare(request)
    return ws
