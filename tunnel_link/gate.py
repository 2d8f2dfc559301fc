"""A TLS listener for an aiohttp app whose connections must prove who they are, soon and few at a time.

Why: with ``web.TCPSite`` a TLS handshake may take asyncio's default minute, and a connection that never
sends a request is held for aiohttp's keep-alive default (an hour), so 400 idle sockets cost 20 MB and
nothing stops 40,000. Here:

- every accepted TCP connection is counted against ``tunnel_core.admission`` caps (per source address
  and in total) *before* any TLS work, and refused (closed at once) beyond them;
- the TLS handshake runs under ``handshake_timeout`` (``loop.connect_accepted_socket``), then the connection goes to
  the app's aiohttp request handler, whose ``keepalive_timeout`` (set on the runner) bounds the wait for
  the first request and between requests;
- the app calls :meth:`GatedTlsServer.authenticated` with ``request.transport`` once the peer proved its
  identity (a tunnel that the registry accepted); from then on the connection no longer counts.

The handler sees an ordinary TLS transport, through a forwarding protocol that only notices when the
connection is made and ends.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass

from aiohttp import web

from tunnel_core.admission import Admission, AdmissionLimits

log = logging.getLogger("tunnel.gate")

LISTEN_BACKLOG = 1024
ACCEPT_RETRY = 0.1  # seconds to wait after a failed accept (EMFILE) before the next

__all__ = ["GatedTlsServer"]


@dataclass(slots=True)
class _Pending:
    """One admitted connection while it counts as unauthenticated."""

    source: str
    released: bool = False


class GatedTlsServer:
    """Serve ``runner``'s app on ``host:port`` with TLS, under admission caps and a handshake deadline.

    ``await start()``, then ``authenticated(transport)`` from handlers; ``await close()`` stops accepting
    (the runner's cleanup closes the connections it handed out).

    Connections are accepted here, counted, and only then given to asyncio with
    ``loop.connect_accepted_socket`` (its TLS handshake bounded by ``handshake_timeout``): no byte of a
    refused connection is ever read.
    """

    def __init__(self, runner: web.BaseRunner, ssl_ctx: ssl.SSLContext, *, limits: AdmissionLimits,
                 handshake_timeout: float) -> None:
        self._runner = runner
        self._ssl = ssl_ctx
        self._handshake_timeout = handshake_timeout
        self.admission = Admission(limits)
        self.handshake_failures = 0
        self._entries: dict[asyncio.BaseTransport, _Pending] = {}
        self._handshakes: set[asyncio.Task[None]] = set()
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)
        family, _type, _proto, _name, address = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._acceptor = asyncio.get_running_loop().create_task(self._accept_forever(listener))
        return listener.getsockname()[:2]

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.gather(self._acceptor, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)

    @property
    def unauthenticated(self) -> int:
        return self.admission.total

    def authenticated(self, transport: asyncio.BaseTransport | None) -> None:
        """The peer on ``transport`` (a handler's ``request.transport``) proved who it is: stop counting it."""
        entry = self._entries.get(transport) if transport is not None else None
        if entry is not None:
            self._release(entry)

    # --- internals ---------------------------------------------------------------------------------------

    async def _accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors, say: back off rather than spin
                log.warning("accept failed: %r", exc)
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            source = str(peer[0]) if peer else "?"
            if not self.admission.admit(source):
                log.debug("refused a connection from %s: unauthenticated connection limit", source)
                conn.close()
                continue
            _tune(conn)
            entry = _Pending(source)
            task = loop.create_task(self._handshake(conn, entry))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, entry: _Pending) -> None:
        handler = self._runner.server()
        assert handler is not None, "the runner is not set up"
        connection = _Connection(handler, self, entry)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: connection, conn, ssl=self._ssl, ssl_handshake_timeout=self._handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # The peer's fault (a scan, a wrong protocol, a client that went silent): counted, not logged
            # per connection, so a flood of them cannot flood the log.
            self.handshake_failures += 1
            log.debug("TLS handshake with %s failed: %r", entry.source, exc)
            conn.close()
            self._release(entry)

    def _made(self, transport: asyncio.BaseTransport, entry: _Pending) -> None:
        self._entries[transport] = entry

    def _ended(self, transport: asyncio.BaseTransport, entry: _Pending) -> None:
        self._entries.pop(transport, None)
        self._release(entry)

    def _release(self, entry: _Pending) -> None:
        if not entry.released:
            entry.released = True
            self.admission.release(entry.source)


class _Connection(asyncio.Protocol):
    """The app's request handler behind the TLS transport; tells the gate when the connection ends."""

    def __init__(self, handler: asyncio.Protocol, gate: GatedTlsServer, entry: _Pending) -> None:
        self._handler = handler
        self._gate = gate
        self._entry = entry
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._gate._made(transport, self._entry)
        self._handler.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:  # the handshake failed; the gate's handshake task cleans up
            return
        try:
            self._gate._ended(self._transport, self._entry)
        finally:
            self._handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()


def _tune(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
