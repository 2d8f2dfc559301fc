"""Relay-to-relay peering: a cloud caller that lands on a relay without its site's tunnel, carried one hop.

Theory of operation. Every relay announces which sites' tunnels it holds and where its peers reach it
(``[fleet] address``, ``relay.presence``); the presence keeper reads the others' announcements back into
a :class:`FleetView` every second. A caller whose site is not connected here, but is on another relay,
is carried to it (``relay.listeners.route_caller``):

- :class:`PeerLinks` keeps one connection per peer relay, opened on first need and kept: a mutual-TLS
  WebSocket to the peer's tunnel port at :data:`PEER_PATH`, running the same mux as a site's tunnel. This
  relay shows ``peer.crt`` (``relay.pki.issue_peer_cert``, from the fleet's shared CA; re-issued here when
  half its life is gone) and checks the peer's server certificate against the CA and the fleet's server
  name: the first name of ``relay.crt``, which every relay of the fleet shares. So a peer's address may be
  any address it is reached at (a pod IP, say) without being in the certificate.
- The caller's association is one stream on it, opened with the listener's name (``TargetKind.LISTENER``)
  and carrying the A-ASSOCIATE-RQ. :class:`PeerEndpoint`, on the peer, admits only relay certificates
  (``relay.pki.relay_from_certificate``: a site's certificate never passes), routes the request within
  that listener's table itself, to a tunnel *it* holds — never onward: one hop at most — and bridges the
  two streams (``tunnel_link.hop``). A refusal there is a RESET the first relay turns into the caller's
  A-ASSOCIATE-RJ, with the same codes as a local refusal.

Nothing waits on a peer without a deadline: the connect has :data:`CONNECT_TIMEOUT`, the session its
heartbeat, and a peer that cannot be reached is skipped for the next holder of the site's tunnel.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from relay import pki
from relay.fleetrows import Holder, RelayRecord
from relay.sites import SiteTable
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.dicom import AssociateRequest, RejectReason
from tunnel_core.discovery import DRAINING, MAX_ENTRIES, SERVING, DiscoveryError, FleetEntry, encode_fleet
from tunnel_core.frames import OpenPayload
from tunnel_core.limits import MuxLimits
from tunnel_core.mux import ConnectionDraining, Mux, Role, StreamLimitReached
from tunnel_link.aio import cancel_and_wait
from tunnel_link.associations import Association, AssociationTracker, IngressLimits
from tunnel_link.errors import LinkError
from tunnel_link.hop import serve_hop
from tunnel_link.session import MAX_MESSAGE_IN, MuxSession, TunnelStream
from tunnel_link.tls import client_context
from tunnel_link.transport import SUBPROTOCOLS

__all__ = ["CONNECT_TIMEOUT", "HOP_DIRECTION", "PEER_PATH", "FleetView", "PeerEndpoint", "PeerLinks", "run_token"]

log = logging.getLogger("relay")

PEER_PATH = "/fleet/v1/peer"  # on the tunnel port; relay certificates only
CONNECT_TIMEOUT = 5.0  # seconds for TCP, TLS and the WebSocket upgrade to a peer relay
HOP_DIRECTION = "peer-to-site"  # the tracker's direction for associations a peer relay carried here

# A decision the listener's routing makes for an association it carries to this relay's own tunnels.
RouteHere = Callable[[str, AssociateRequest, Association], Awaitable[TunnelStream | RejectReason]]


class FleetView:
    """Which *other* relays hold which sites' tunnels and take hops, and which relays agents may dial, as
    the registry said last. ``me`` is this relay's own entry for agents (None: it gives agents no list)."""

    def __init__(self, name: str, me: FleetEntry | None = None) -> None:
        self.name = name
        self.me = me
        self._holders: dict[str, list[Holder]] = {}
        self._dialable: list[FleetEntry] = []
        self._header: str | None = None
        self.draining = False

    def update(self, holders: dict[str, list[Holder]], relays: Iterable[RelayRecord] = ()) -> None:
        self._holders = {site: peers for site, relays in holders.items()
                         if (peers := [h for h in relays if h.relay != self.name and h.address])}
        self._dialable = [FleetEntry(r.name, r.zone, r.tunnel_url, r.state, run_token(r.started_at)) for r in relays
                          if r.name != self.name and r.tunnel_url and r.state in (SERVING, DRAINING)]
        self._header = None

    def fleet_header(self) -> str | None:
        """``Tunnel-Fleet`` for an agent's upgrade: this relay first, then the others agents may dial
        (docs/protocol.md §1.3); None when this relay has no ``[fleet] tunnel_url``."""
        if self.me is None:
            return None
        if self._header is None:
            me = FleetEntry(self.me.name, self.me.zone, self.me.url, DRAINING if self.draining else SERVING,
                            self.me.since)
            try:
                self._header = encode_fleet([me, *self._dialable[:MAX_ENTRIES - 1]])
            except DiscoveryError as exc:  # too long a list: this relay alone still tells the agent who it is
                log.warning("fleet list for agents cut to this relay: %s", exc)
                self._header = encode_fleet([me])
        return self._header

    def set_draining(self) -> None:
        self.draining, self._header = True, None

    def sites(self) -> set[str]:
        return set(self._holders)

    def holders_of(self, site: str) -> list[Holder]:
        """Serving relays first (the registry's order), then draining ones."""
        return list(self._holders.get(site, ()))


def run_token(started_at: float) -> str:
    """``FleetEntry.since`` for a relay whose run began at ``started_at``: the same on every relay's list."""
    return f"{started_at:.3f}"


@dataclass(slots=True)
class _Link:
    address: str
    session: MuxSession


class PeerLinks:
    """The connections this relay opened to its peers; build once, ``await close()`` at the end."""

    def __init__(self, view: FleetView, *, state_dir: Path, ca_path: Path, name: str, limits: MuxLimits,
                 heartbeat_interval: float, look_again: Callable[[], Awaitable[None]] | None = None) -> None:
        self.view = view
        self._look_again = look_again
        self.state_dir = state_dir
        self.ca_path = ca_path
        self.name = name
        self.limits = limits
        self.heartbeat_interval = heartbeat_interval
        self._links: dict[str, _Link] = {}
        self._connecting: dict[str, asyncio.Task[MuxSession]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._context: ssl.SSLContext | None = None
        self._context_until: dt.datetime | None = None
        self._server_name = ""

    @property
    def connected(self) -> list[str]:
        return sorted(self._links)

    def elsewhere(self) -> set[str]:
        """The sites whose tunnels another relay holds and would take a hop for."""
        return self.view.sites()

    async def look_again(self) -> None:
        """Read the fleet's presence again now (rate-bounded by the presence keeper)."""
        if self._look_again is not None:
            await self._look_again()

    async def carry(self, site: str, listener: str, req: AssociateRequest) -> TunnelStream | None:
        """A stream for ``listener`` to the first relay holding ``site``'s tunnel that can take it (serving
        ones first, never one whose connection here says it is draining); if none can, the fleet's
        presence is read again and the relays not yet tried are. None if still none can."""
        tried: set[str] = set()
        for attempt in range(2):
            if attempt:
                await self.look_again()
            for holder in self.view.holders_of(site):
                if holder.relay in tried:
                    continue
                tried.add(holder.relay)
                link = self._links.get(holder.relay)
                if link is not None and link.address == holder.address and link.session.draining:
                    continue  # it drains: its tunnels take no new association either
                try:
                    session = await self._session(holder)
                    return await session.open_stream(OpenPayload(TargetKind.LISTENER, listener, req.calling_ae))
                except (LinkError, ConnectionDraining, StreamLimitReached) as exc:
                    log.warning("relay %s (%s) cannot take a hop now: %s", holder.relay, holder.address, exc)
        return None

    async def _session(self, holder: Holder) -> MuxSession:
        link = self._links.get(holder.relay)
        if link is not None and link.address == holder.address and not link.session.draining:
            return link.session
        task = self._connecting.get(holder.relay)
        if task is None:
            task = self._connecting[holder.relay] = asyncio.create_task(self._connect(holder))
            task.add_done_callback(lambda _t, name=holder.relay: self._connecting.pop(name, None))
        return await asyncio.shield(task)

    async def _connect(self, holder: Holder) -> MuxSession:
        context, server_name = self._ssl()
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, use_dns_cache=False),
                                     trust_env=False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                ws = await http.ws_connect(f"wss://{holder.address}{PEER_PATH}", protocols=SUBPROTOCOLS, compress=0,
                                           max_msg_size=MAX_MESSAGE_IN, autoping=True, server_hostname=server_name)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await http.close()
            raise LinkError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]) from exc
        except BaseException:
            await http.close()
            raise
        session = MuxSession(ws, Mux(Role.AGENT, self.limits), heartbeat_interval=self.heartbeat_interval,
                             on_stream=_refuse, label=f"peer:{holder.relay}")
        running = asyncio.create_task(self._run(holder, http, session))
        self._running.add(running)
        running.add_done_callback(self._running.discard)
        waits = [asyncio.create_task(session.up.wait()), asyncio.create_task(session.ended.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if session.ended.is_set() or not session.up.is_set():
            raise LinkError(session.close_reason or "the peer closed the connection")
        self._links[holder.relay] = _Link(holder.address, session)
        log.info("peer relay %s connected at %s", holder.relay, holder.address)
        return session

    async def _run(self, holder: Holder, http: aiohttp.ClientSession, session: MuxSession) -> None:
        try:
            await session.run()
        finally:
            link = self._links.get(holder.relay)
            if link is not None and link.session is session:
                del self._links[holder.relay]
            await http.close()
            log.info("peer relay %s disconnected: %s", holder.relay, session.close_reason or "closed")

    def _ssl(self) -> tuple[ssl.SSLContext, str]:
        """The client context with this relay's peer certificate (issued anew once half its life is gone),
        and the server name every relay of the fleet answers to."""
        now = dt.datetime.now(dt.UTC)
        if self._context is None or self._context_until is None or now >= self._context_until:
            cert = self.state_dir / pki.PEER_CERT
            try:
                not_after = pki.certificate_not_after(cert.read_bytes())
            except (OSError, pki.PkiError):
                not_after = now
            if not_after - now < dt.timedelta(days=pki.PEER_CERT_DAYS / 2):
                try:
                    not_after = pki.issue_peer_cert(self.state_dir, self.name).not_after
                except pki.PkiError as exc:
                    raise LinkError(f"no peer certificate for this relay: {exc}") from exc
            try:
                names = pki.relay_hostnames(self.state_dir)
            except pki.PkiError as exc:
                raise LinkError(f"cannot read this relay's server certificate: {exc}") from exc
            if not names:
                raise LinkError("this relay's server certificate names no host")
            self._context = client_context(cert, self.state_dir / pki.PEER_KEY, self.ca_path)
            self._context_until = not_after - dt.timedelta(days=pki.PEER_CERT_DAYS / 2)
            self._server_name = names[0]
        return self._context, self._server_name

    async def close(self) -> None:
        for task in list(self._connecting.values()):
            await cancel_and_wait(task)
        for link in list(self._links.values()):
            link.session.close_nowait(ErrorCode.GOING_AWAY, "relay shutting down")
        for task in list(self._running):
            try:
                async with asyncio.timeout(2.0):
                    await asyncio.shield(task)
            except TimeoutError:
                await cancel_and_wait(task)


async def _refuse(stream: TunnelStream) -> None:
    """A peer never opens streams on a connection this relay dialed: hops go one way on each."""
    await stream.reset(ErrorCode.PROTOCOL_ERROR)


class PeerEndpoint:
    """``PEER_PATH`` on the tunnel port: peer relays' connections, each stream one association for a site
    whose tunnel this relay holds. ``route_here(listener, req, assoc)`` is the listener's own routing,
    restricted to this relay's tunnels."""

    def __init__(self, sites: SiteTable, tracker: AssociationTracker, route_here: RouteHere, *, limits: MuxLimits,
                 heartbeat_interval: float, authenticated: Callable[[asyncio.BaseTransport | None], None],
                 accept: Callable[[web.Request], Awaitable[web.WebSocketResponse]]) -> None:
        self.sites = sites
        self.tracker = tracker
        self.route_here = route_here
        self.limits = limits
        self.heartbeat_interval = heartbeat_interval
        self._authenticated = authenticated
        self._accept = accept
        self.active = 0  # associations carried here by peers, in flight
        self.draining = False  # the relay drains: peers are told to carry no new association here
        self.peers: dict[str, int] = {}  # peer relay -> its connections here
        self._sessions: set[MuxSession] = set()

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        try:
            if not der:
                raise pki.CertificateIdentityError("no client certificate")
            peer = pki.relay_from_certificate(der)
        except pki.CertificateIdentityError as exc:
            log.warning("refused %s from %s: %s", request.path, request.remote, exc)
            raise web.HTTPForbidden(text="a relay certificate of this fleet is required\n") from None
        self._authenticated(request.transport)
        ws = await self._accept(request)
        session = MuxSession(ws, Mux(Role.RELAY, self.limits), heartbeat_interval=self.heartbeat_interval,
                             on_stream=self._hop, label=f"peer:{peer}")
        self.peers[peer] = self.peers.get(peer, 0) + 1
        self._sessions.add(session)
        if self.draining:
            session.go_away(ErrorCode.GOING_AWAY, "relay draining", close_when_idle=False)
        log.info("peer relay %s connected from %s", peer, request.remote)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            self.peers[peer] -= 1
            if not self.peers[peer]:
                del self.peers[peer]
            log.info("peer relay %s disconnected: %s", peer, session.close_reason or "closed")
        return ws

    def go_away_all(self) -> None:
        """The relay drains: every peer hears GOAWAY (it carries nothing new here; what it carries finishes)."""
        self.draining = True
        for session in list(self._sessions):  # kept up, so the peer goes on knowing this relay drains
            session.go_away(ErrorCode.GOING_AWAY, "relay draining", close_when_idle=False)

    def close_all(self, reason: str) -> None:
        """GOAWAY on every peer's connection (the relay stops); their associations here end with it."""
        for session in list(self._sessions):
            session.close_nowait(ErrorCode.GOING_AWAY, reason)

    async def _hop(self, stream: TunnelStream) -> None:
        listener = stream.open.target
        if stream.open.kind is not TargetKind.LISTENER or listener not in self.sites.tables:
            await stream.reset(ErrorCode.UNKNOWN_ROUTE if stream.open.kind is TargetKind.LISTENER
                               else ErrorCode.PROTOCOL_ERROR)
            return

        async def decide(req: AssociateRequest, assoc: Association) -> TunnelStream | RejectReason:
            return await self.route_here(listener, req, assoc)

        self.active += 1
        try:
            await serve_hop(stream, limits=IngressLimits(), decide=decide, tracker=self.tracker,
                            direction=HOP_DIRECTION)
        finally:
            self.active -= 1
