"""The message transport a mux session runs over, and the adapters that make one of a WebSocket.

Theory of operation. :class:`tunnel_link.session.MuxSession` needs little from the connection under it:
ordered binary messages both ways, a way to know its send buffer is full and to wait until it is not,
and two ways to end it (politely, or at once). That is :class:`MessageTransport`. ``send`` is
synchronous and takes the message at once, as an asyncio transport's ``write`` does, so a splice callback
can move bytes from a socket into the tunnel without a task hop; ``congested`` and ``drained`` are its
backpressure. Two adapters serve every WebSocket the programs use:

- :class:`WebSocketTransport`, an aiohttp WebSocket whose binary messages are written straight to the
  TCP/TLS transport under it (masked in place on the client side): one copy fewer per layer than
  ``send_bytes``. It needs aiohttp internals, so :func:`as_transport` uses it only when the run-time
  feature checks of :mod:`tunnel_link.private_api` pass.
- :class:`QueuedTransport`, anything with ``send_bytes``/``receive``/``close`` (an aiohttp WebSocket
  through its public API, the inner-TLS session of :mod:`tunnel_link.innertls`): ``send`` queues, and
  ``pump`` — run in the session's task group — awaits ``send_bytes`` for each message in order. The
  queue counts as the send buffer: over ``high_water`` bytes it is congested.

A new transport (QUIC, a raw TLS stream) implements :class:`MessageTransport` and is handed to
``MuxSession`` as it is. WebSocket version negotiation (docs/protocol.md §1.1): the agent offers
:data:`SUBPROTOCOLS`, the relay accepts them, and :func:`negotiated_version` reads the outcome.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import struct
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import aiohttp
from aiohttp import web

from tunnel_core.errors import ProtocolError
from tunnel_core.versions import negotiated_version as _version_of
from tunnel_core.versions import offered_subprotocols
from tunnel_link import private_api

__all__ = [
    "HIGH_WATER",
    "SUBPROTOCOLS",
    "Closed",
    "MessageTransport",
    "QueuedTransport",
    "WebSocketTransport",
    "as_transport",
    "frame_header",
    "negotiated_version",
    "selected_subprotocol",
]

log = logging.getLogger(__name__)

HIGH_WATER = 1024 * 1024  # bytes in the send buffer above which a transport is congested
# The WebSocket subprotocols the agent offers (newest first) and the relay accepts: ``protocols=`` of
# aiohttp's ``ws_connect`` and ``WebSocketResponse``.
SUBPROTOCOLS: tuple[str, ...] = offered_subprotocols()
_ERRORS = (ConnectionError, RuntimeError, aiohttp.ClientError)  # what a dependency raises for a dead link
_ENDED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
_OP_BINARY_FIN = 0x82
_LEN16 = struct.Struct("!BBH")
_LEN64 = struct.Struct("!BBQ")


@dataclass(frozen=True, slots=True)
class Closed:
    """What ``receive`` returns once the connection has ended; ``reason`` is for the tunnel's log line."""

    reason: str


@runtime_checkable
class MessageTransport(Protocol):
    """Ordered binary messages to and from the peer. Every method raises ``ConnectionError`` (and only
    that) when the connection is gone."""

    def send(self, message: bytearray) -> None:
        """Take ``message`` (ownership: it may be changed in place) to send after every earlier one."""

    @property
    def congested(self) -> bool:
        """The send buffer is above its high-water mark: stop producing until ``drained``."""

    async def drained(self) -> None:
        """Return once the transport is not congested (at once if it is not)."""

    async def receive(self) -> bytes | Closed:
        """The next binary message, or ``Closed`` at the end. Non-binary messages are not returned."""

    async def close(self) -> None:
        """Send what is queued and end the connection politely; the caller bounds how long that may take."""

    def abort(self) -> bool:
        """End the connection at once, sending nothing more; False if it could not be reached."""

    async def pump(self) -> None:
        """The transport's own background work, run by the session's task group until the session ends
        (a writer, for a transport that can only send asynchronously); returns at once if there is none."""


def as_transport(ws: Any, *, client: bool) -> MessageTransport:
    """``ws`` as a :class:`MessageTransport`: itself if it is one, else an adapter. ``client``: this side
    opened the WebSocket, and masks what it sends (RFC 6455 §5.3)."""
    if isinstance(ws, MessageTransport):
        return ws
    fast = WebSocketTransport.attach(ws, client=client)
    if fast is not None:
        return fast
    global _fallback_logged
    if isinstance(ws, aiohttp.ClientWebSocketResponse | web.WebSocketResponse) and not _fallback_logged:
        _fallback_logged = True
        log.info("aiohttp's WebSocket writer internals are not available: tunnel messages go through "
                 "send_bytes")
    return QueuedTransport(ws)


_fallback_logged = False


def selected_subprotocol(ws: Any) -> str | None:
    """The subprotocol a WebSocket's handshake selected: aiohttp's server side calls it ``ws_protocol``, its
    client side ``protocol``."""
    for name in ("ws_protocol", "protocol"):
        value = getattr(ws, name, None)
        if isinstance(value, str):
            return value
    return None


def negotiated_version(ws: Any) -> int:
    """The mux protocol version a WebSocket's handshake agreed on (no subprotocol: version 1, an older peer).
    Raises ``ProtocolError`` for a subprotocol this side does not speak."""
    return _version_of(selected_subprotocol(ws))


async def _receive(ws: Any) -> bytes | Closed:
    """The next binary message of an aiohttp-style WebSocket; text, ping and pong are not the protocol's."""
    while True:
        try:
            msg = await ws.receive()
        except _ERRORS as exc:
            raise ConnectionResetError(f"tunnel read failed: {exc!r}") from exc
        if msg.type is aiohttp.WSMsgType.BINARY:
            return msg.data
        if msg.type in _ENDED:
            return Closed("peer closed the tunnel")
        if msg.type is aiohttp.WSMsgType.ERROR:
            exception = getattr(ws, "exception", None)
            return Closed(f"websocket error: {exception() if callable(exception) else None!r}")


async def _close(ws: Any) -> None:
    try:
        await ws.close()
    except _ERRORS as exc:
        raise ConnectionResetError(f"tunnel close failed: {exc!r}") from exc


def frame_header(length: int, mask_key: bytes | None) -> bytes:
    """The RFC 6455 header of one final binary frame of ``length`` bytes (with the mask key, if any)."""
    mask_bit = 0x80 if mask_key is not None else 0
    if length < 126:
        header = bytes((_OP_BINARY_FIN, length | mask_bit))
    elif length < 1 << 16:
        header = _LEN16.pack(_OP_BINARY_FIN, 126 | mask_bit, length)
    else:
        header = _LEN64.pack(_OP_BINARY_FIN, 127 | mask_bit, length)
    return header + mask_key if mask_key is not None else header


class WebSocketTransport:
    """An aiohttp WebSocket whose binary messages go straight to its TCP/TLS transport.

    aiohttp's ``send_bytes`` copies the payload to mask it and again to join header and payload; here the
    message is masked in place (client side, a fresh random key per message) and written as header and
    payload in one ``writelines``. Control frames (ping, pong, close) stay with aiohttp; every write here
    is a whole frame made synchronously, so the two never interleave inside a frame. Make one with
    :meth:`attach`, which returns None when the private paths it needs are missing.
    """

    def __init__(self, ws: Any, raw: private_api.RawWriter, mask: private_api.Mask | None) -> None:
        self._ws = ws
        self._transport = raw.transport
        self._drain = raw.drain
        self._mask = mask

    @classmethod
    def attach(cls, ws: Any, *, client: bool) -> WebSocketTransport | None:
        raw = private_api.raw_writer(ws)
        mask = private_api.websocket_mask() if client else None
        if raw is None or (client and mask is None):
            return None
        return cls(ws, raw, mask)

    def send(self, message: bytearray) -> None:
        if self._transport.is_closing():
            raise ConnectionResetError("tunnel transport is closing")
        key = None
        if self._mask is not None:
            key = os.urandom(4)
            self._mask(key, message)
        # One call, so a TLS transport sends both in one syscall (two TLS records, one header-sized).
        self._transport.writelines((frame_header(len(message), key), message))

    @property
    def congested(self) -> bool:
        return self._transport.get_write_buffer_size() > HIGH_WATER

    async def drained(self) -> None:
        try:
            await self._drain()
        except _ERRORS as exc:
            raise ConnectionResetError(f"tunnel transport lost: {exc!r}") from exc

    async def receive(self) -> bytes | Closed:
        return await _receive(self._ws)

    async def close(self) -> None:
        await _close(self._ws)

    def abort(self) -> bool:
        """Nothing buffered is sent; pending drains end with ConnectionError."""
        self._transport.abort()
        return True

    async def pump(self) -> None:
        return None


class QueuedTransport:
    """Any WebSocket-like object with ``send_bytes``, ``receive`` and ``close`` (and optionally ``abort``),
    through those alone: ``send`` queues, ``pump`` sends in order. Bounded by backpressure: a sender that
    respects ``congested`` keeps the queue near ``high_water``."""

    def __init__(self, ws: Any, *, high_water: int = HIGH_WATER) -> None:
        self._ws = ws
        self._high = high_water
        self._queue: collections.deque[bytearray] = collections.deque()
        self._queued = 0  # bytes in the queue
        self._sending = 0  # bytes of the message being sent
        self._wake = asyncio.Event()  # the queue is not empty
        self._room = asyncio.Event()  # not congested
        self._room.set()
        self._lock = asyncio.Lock()  # one sender at a time: pump, or close sending the rest
        self._ended: BaseException | None = None

    def send(self, message: bytearray) -> None:
        if self._ended is not None:
            raise ConnectionResetError(f"tunnel transport is closing: {self._ended!r}")
        self._queue.append(message)
        self._queued += len(message)
        self._wake.set()
        if self.congested:
            self._room.clear()

    @property
    def congested(self) -> bool:
        return self._queued + self._sending > self._high

    async def drained(self) -> None:
        while self.congested and self._ended is None:
            await self._room.wait()
        if self._ended is not None:
            raise ConnectionResetError(f"tunnel transport is closing: {self._ended!r}")

    async def receive(self) -> bytes | Closed:
        return await _receive(self._ws)

    async def pump(self) -> None:
        """Send each queued message in order until cancelled; a failed send ends the connection."""
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            async with self._lock:
                if self._queue:
                    await self._send_next()

    async def close(self) -> None:
        async with self._lock:  # after the message the pump is sending, if any; then nothing else sends
            while self._queue and self._ended is None:
                await self._send_next()
            self._end(ConnectionResetError("closed"))
        await _close(self._ws)

    def abort(self) -> bool:
        self._end(ConnectionResetError("aborted"))
        return private_api.abort_websocket(self._ws)

    async def _send_next(self) -> None:
        message = self._queue.popleft()  # taken first: if this send is cancelled it is lost, never doubled
        self._queued -= len(message)
        self._sending = len(message)
        try:
            await self._ws.send_bytes(message)
        except _ERRORS as exc:
            self._end(exc)
            raise ConnectionResetError(f"tunnel write failed: {exc!r}") from exc
        finally:
            self._sending = 0
            if not self.congested:
                self._room.set()

    def _end(self, why: BaseException) -> None:
        if self._ended is None:
            self._ended = why
        self._queue.clear()
        self._queued = 0
        self._room.set()


def unsupported_version(ws: Any) -> str | None:
    """Why the WebSocket's negotiated subprotocol cannot be spoken, or None if it can."""
    try:
        negotiated_version(ws)
    except ProtocolError as exc:
        return str(exc)
    return None
