"""The mux over a message transport: the asyncio adapter around :class:`tunnel_core.mux.Mux`.

Read → feed the core → act on its events → send what it produced. One reader loop per connection, one
timer (the mux's keepalive deadline), the transport's pump, and one handler task per remotely opened
stream, all owned by the session's TaskGroup. The session runs over a
:class:`tunnel_link.transport.MessageTransport`; the aiohttp WebSocket or inner-TLS session it is given
is adapted by :func:`tunnel_link.transport.as_transport`. Writes are synchronous (the transport takes a
message at once and reports congestion), so frames leave in the order the core queued them and a small
frame is never parked behind a deep application queue.

A stream is one object, :class:`TunnelStream`: its handler and the splice talk to it alone — ``send``,
``end``, ``consumed``, ``reset`` — and it keeps the credit contract of docs/protocol.md §6.3 in one
place: every byte it delivered is held until the application says it was consumed (written onward), and
whatever is still held when the stream ends is given back to the connection then.

Nothing here waits on the peer without a deadline. The timer never awaits a write: it queues its PING and
moves on, so it keeps judging the peer while our send buffer is full. Every wait for that buffer to drain
starts the mux's stall clock (``Mux.send_blocked``); a peer that neither sends for three intervals nor
drains our buffer for three intervals is dead, and the timer aborts the transport, which ends every
pending write and read at once. Closing sends GOAWAY if the buffer has room, then gives the close a
short, fixed time before aborting: a peer that stopped reading can never hold a close (or whoever asked
for it) hostage.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from tunnel_core import mux as m
from tunnel_core.codes import ErrorCode
from tunnel_core.errors import ProtocolError, UsageError
from tunnel_core.frames import OpenPayload
from tunnel_link.errors import LinkError, StreamResetError
from tunnel_link.transport import Closed, MessageTransport, as_transport, negotiated_version

log = logging.getLogger(__name__)

MAX_MESSAGE = 2 * 1024 * 1024  # bytes per transport message we send (whole frames)
MAX_MESSAGE_IN = 4 * 1024 * 1024  # aiohttp's receive limit; above our own send size
CLOSE_TIMEOUT = 1.0  # seconds the WebSocket close handshake may take before the transport is aborted
READ_BURST = 64  # messages the read loop handles before it lets other connections run


class TunnelStream:
    """One stream as its handler sees it: the one object that sends, ends, resets and returns credit.

    First ``read()`` chunks (b"" at the peer's half-close; a reset raises ``StreamResetError``) until the
    A-ASSOCIATE-RQ is in, then ``attach`` a listener (``tunnel_link.splice.Splice``) that carries the rest
    from callbacks. Every byte delivered — by ``read()`` or to the listener — is *held* until
    ``consumed(n)`` says it was written onward or dropped; only then does its credit go back to the peer.
    ``send`` and ``end`` write to the tunnel at once. ``release()`` when done: whatever is still held is
    given back to the connection, and a stream still open is reset.
    """

    def __init__(self, session: MuxSession, stream_id: int, open_payload: OpenPayload) -> None:
        self.session = session
        self.id = stream_id
        self.open = open_payload
        self._inbound: collections.deque[bytes] = collections.deque()
        self._eof = False
        self.reset_code: ErrorCode | None = None
        self._readable = asyncio.Event()
        self._listener: StreamListener | None = None
        self._held = 0  # delivered, not yet consumed: the credit this stream still owes the peer
        self._settled = False  # the stream ended and its held credit was settled
        self._blocked = False  # a send fell short: tell the listener when it may send again
        self._awaiting_drain = False

    # --- receiving -----------------------------------------------------------------------------------------

    async def read(self) -> bytes:
        while not self._inbound:
            if self.reset_code is not None:
                raise StreamResetError(self.reset_code)
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        return self._inbound.popleft()

    def attach(self, listener: StreamListener) -> None:
        """From now on, deliver this stream's events to ``listener`` as they happen, from the session's
        read loop, with no task switch (what ``read()`` left queued is delivered first)."""
        self._listener = listener
        while self._inbound and self.reset_code is None:
            listener.stream_data(self._inbound.popleft())
        if self.reset_code is not None:
            listener.stream_reset(self.reset_code)
        elif self._eof:
            listener.stream_eof()
        elif self._blocked:
            self._wake_when_writable()  # a send before the listener came fell short: it may try again

    def consumed(self, n: int) -> None:
        """``n`` delivered bytes were written onward (or dropped): return their credit to the peer.

        Call it after the bytes left — into the destination socket's transport, below its high-water mark —
        never when they arrived (docs/protocol.md §6.3). After the stream ended it is a no-op: its credit
        was settled then. Raises ``UsageError`` for more than is held.
        """
        if self._settled:
            return
        if not 0 <= n <= self._held:
            raise UsageError(f"stream {self.id}: consumed {n} bytes but holds {self._held}")
        if n:
            self._held -= n
            self.session.mux.acknowledge(self.id, n)
            self.session._write_now()

    # --- sending -----------------------------------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> int:
        """Send as much of ``data`` as the stream's and the connection's credit allow, now; return how many
        bytes were taken (0 once the stream is gone: its reset is being delivered).

        When fewer than ``len(data)`` were taken, or ``writable`` is False afterwards, the source should
        pause: the listener's ``stream_writable()`` is called when more credit arrives or the transport
        drains.
        """
        if self.reset_code is not None:
            return 0
        session = self.session
        try:
            n = session.mux.send_data(self.id, data)
        except m.StreamGone:
            return 0
        session._write_now()
        if n < len(data) or session._congested:
            self._blocked = True
            if session._congested and not self._awaiting_drain:
                self._awaiting_drain = True
                session._when_drained(self._on_drained)
        return n

    @property
    def writable(self) -> bool:
        """The tunnel's send buffer has room (credit is another matter: ``send`` takes what it allows)."""
        return not self.session._congested

    def end(self) -> bool:
        """Half-close: we send no more. Written at once; False (nothing sent) if the stream is gone."""
        if self.reset_code is not None:
            return False
        try:
            self.session.mux.end_stream(self.id)
        except m.StreamGone:
            return False
        self.session._write_now()
        return True

    async def reset(self, code: ErrorCode) -> None:
        self.reset_nowait(code)
        await self.session.flush()

    def reset_nowait(self, code: ErrorCode) -> None:
        """Reset the stream now (for callbacks); the RESET frame is written at once."""
        if self.reset_code is None:
            self.session.mux.reset_stream(self.id, code)
            self._on_reset(code)
            self.session._write_now()

    async def release(self) -> None:
        """The handler is done with the stream: reset it if it is still open, settle its credit, drop it."""
        if self.reset_code is None and self.session.mux.stream_state(self.id) is not m.StreamState.CLOSED:
            try:
                await self.reset(ErrorCode.INTERNAL_ERROR)
            except LinkError:
                pass
        self._settle(give_back=True)
        self.session._forget(self)

    # --- called by the session ----------------------------------------------------------------------------

    def _on_data(self, data: bytes | memoryview) -> None:
        self._held += len(data)
        if self._listener is not None:
            self._listener.stream_data(data)
            return
        self._inbound.append(data)
        self._readable.set()

    def _on_eof(self) -> None:
        self._eof = True
        if self._listener is not None:
            self._listener.stream_eof()
            return
        self._readable.set()

    def _on_reset(self, code: ErrorCode, *, connection_gone: bool = False) -> None:
        if self.reset_code is not None:
            return
        self.reset_code = code
        # Nothing is delivered after a reset: what it still holds (queued, or with the listener) is
        # dropped, and its credit goes back to the connection at once (docs/protocol.md §6.4).
        self._settle(give_back=not connection_gone)
        self._readable.set()
        self.session._forget(self)
        if self._listener is not None:
            self._listener.stream_reset(code)

    def _settle(self, *, give_back: bool) -> None:
        if self._settled:
            return
        self._settled = True
        held, self._held = self._held, 0
        self._inbound.clear()
        if held and give_back:
            self.session.mux.acknowledge(self.id, held)
            self.session._write_now()

    def _on_credit(self) -> None:
        if self._blocked and self._listener is not None:
            self._wake_when_writable()

    def _on_drained(self) -> None:
        self._awaiting_drain = False
        if self._blocked and self._listener is not None:
            self._wake_when_writable()

    def _wake_when_writable(self) -> None:
        """Tell the listener it may send again — now, or once the congested transport has drained."""
        if not self.session._congested:
            self._notify_writable()
        elif not self._awaiting_drain:
            self._awaiting_drain = True
            self.session._when_drained(self._on_drained)

    def _notify_writable(self) -> None:
        self._blocked = False
        assert self._listener is not None
        self._listener.stream_writable()


class StreamListener(Protocol):
    """Receives an attached stream's events synchronously (see ``TunnelStream.attach``)."""

    def stream_data(self, data: bytes | memoryview) -> None: ...
    def stream_eof(self) -> None: ...
    def stream_reset(self, code: ErrorCode) -> None: ...
    def stream_writable(self) -> None: ...


StreamHandler = Callable[[TunnelStream], Awaitable[None]]


class MuxSession:
    """Run one tunnel connection until it closes. Create, then ``await run()``; streams via ``open_stream``.

    ``ws``: an aiohttp WebSocket (client or prepared server side), an
    :class:`tunnel_link.innertls.InnerTlsWebSocket`, or any :class:`tunnel_link.transport.MessageTransport`.
    """

    def __init__(self, ws: Any, mux: m.Mux, *, heartbeat_interval: float,
                 on_stream: StreamHandler, label: str,
                 on_report: Callable[[bytes], None] | None = None) -> None:
        self.ws = ws
        self.mux = mux
        # The agent is the WebSocket client, which must mask what it sends (RFC 6455 §5.3).
        self.transport: MessageTransport = as_transport(ws, client=mux.role is m.Role.AGENT)
        self.label = label
        self._on_stream = on_stream
        self._on_report = on_report
        self._streams: dict[int, TunnelStream] = {}
        mux.start_keepalive(heartbeat_interval, time.monotonic())
        self._tasks: asyncio.TaskGroup | None = None
        self._closing = False
        self._close_when_idle = False  # our stream ids ran out: end the connection once streams finish
        self.connected_at = time.time()
        self.close_reason = ""
        self.goaway_code: ErrorCode | None = None  # the code of the peer's GOAWAY, once one arrived
        self.up = asyncio.Event()  # set once run() serves: streams may be opened from then on
        self.ended = asyncio.Event()  # set when run() has returned (or raised)
        self._drain_callbacks: list[Callable[[], None]] = []
        self._drain_task: asyncio.Task[None] | None = None
        try:
            self.protocol_version: int | None = negotiated_version(ws)
            self._version_error = ""
        except ProtocolError as exc:
            self.protocol_version, self._version_error = None, str(exc)

    @property
    def rtt(self) -> float | None:
        return self.mux.rtt

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def closing(self) -> bool:
        """``close``/``close_nowait`` was called, or the connection failed: it is ending."""
        return self._closing

    @property
    def draining(self) -> bool:
        return self._closing or self.mux.goaway_received or self.mux.goaway_sent

    async def run(self) -> None:
        """Serve until the transport closes, the peer goes silent, or ``close()``. Then reset every stream."""
        if self.protocol_version is None:
            self.close_reason = self._version_error
            log.warning("tunnel=%s %s; closing", self.label, self._version_error)
        try:
            if self.protocol_version is not None:
                await self._serve()
        except* (ConnectionError, LinkError) as group:
            self.close_reason = self.close_reason or f"transport error: {group.exceptions[0]!r}"
        finally:
            self._tasks = None
            self._abort_streams()
            try:
                await self._close_ws()
            finally:
                self.ended.set()

    async def _serve(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            self.up.set()
            await self.flush()
            self._close_if_idle()  # told to go away before it ran
            helpers = [tasks.create_task(self._timer()), tasks.create_task(self.transport.pump())]
            try:
                await self._read_loop()
            finally:
                for task in helpers:
                    task.cancel()
                self._abort_streams()

    async def open_stream(self, open_payload: OpenPayload) -> TunnelStream:
        """Open a stream; its OPEN frame goes out with its first bytes (``TunnelStream.send``).

        Raises ``LinkError`` when the tunnel is not up, and the mux's ``ConnectionDraining`` (or its
        ``StreamIdsExhausted``: the session then ends the connection once its streams have finished, so
        that the next one starts with fresh ids) and ``StreamLimitReached``."""
        if self._tasks is None or self._closing:
            raise LinkError("tunnel is not connected")
        try:
            sid = self.mux.open_stream(open_payload)
        except m.StreamIdsExhausted:
            log.warning("tunnel=%s used its last stream id: going away, to reconnect once idle", self.label)
            self._write_now()  # the GOAWAY the mux queued
            self._close_when_idle = True
            self._close_if_idle()
            raise
        stream = TunnelStream(self, sid, open_payload)
        self._streams[sid] = stream
        # Not written here: the caller's first bytes follow at once and leave in the same message,
        # so the far side sees OPEN and the A-ASSOCIATE-RQ in one read.
        return stream

    async def flush(self) -> None:
        """Send what the core queued, waiting while the send buffer is full. Raises ``LinkError`` once the
        connection is gone (including when the timer gave up on a peer that stopped reading)."""
        while self.mux.has_data_to_send():
            try:
                self.transport.send(self.mux.data_to_send(MAX_MESSAGE))
                if self.transport.congested:
                    await self._wait_writable()
            except ConnectionError as exc:
                self._closing = True
                raise LinkError(f"tunnel write failed: {exc!r}") from exc

    async def _wait_writable(self) -> None:
        """Wait for the transport's send buffer to drain, with the mux's stall clock running."""
        self.mux.send_blocked(time.monotonic())
        await self.transport.drained()
        self.mux.send_drained()

    def _write_now(self) -> None:
        """Send what the core queued without waiting: for callbacks. See ``_congested`` for backpressure."""
        while self.mux.has_data_to_send():
            try:
                self.transport.send(self.mux.data_to_send(MAX_MESSAGE))
            except ConnectionError as exc:
                self._closing = True
                log.info("tunnel=%s write failed: %r", self.label, exc)
                return

    @property
    def _congested(self) -> bool:
        """The transport's send buffer is over its high-water mark: sources should pause."""
        return self.transport.congested

    def _when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the transport's send buffer has drained (or the session ended)."""
        self._drain_callbacks.append(callback)
        if self._drain_task is None and self._tasks is not None:
            self._drain_task = self._tasks.create_task(self._wait_drained())

    async def _wait_drained(self) -> None:
        try:
            await self._wait_writable()
        except ConnectionError:
            pass
        finally:
            self._drain_task = None
            callbacks, self._drain_callbacks = self._drain_callbacks, []
            for callback in callbacks:
                callback()

    def send_report(self, payload: bytes) -> None:
        """Send the agent's health report (agent side); written at once, like other control frames."""
        self.mux.send_report(payload)
        self._write_now()

    def go_away(self, code: ErrorCode = ErrorCode.GOING_AWAY, reason: str = "going away", *,
                close_when_idle: bool = True) -> None:
        """Tell the peer to open no more streams here (GOAWAY ``code``); the streams in flight carry on.
        With ``close_when_idle`` the connection closes once they have finished (a drain's first word to
        each agent); without, it stays up, saying so, until closed (to a peer relay, which then keeps
        knowing this one drains)."""
        if self._closing or self.mux.goaway_sent:
            return
        self.close_reason = self.close_reason or reason
        self.mux.go_away(code)  # before run(): it leaves with the first flush
        if self._tasks is not None:
            self._write_now()
        if close_when_idle:
            self._close_when_idle = True
            self._close_if_idle()

    def close_nowait(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "closed") -> None:
        """Start closing and return at once: GOAWAY is written if the send buffer has room, then the
        transport is closed within ``CLOSE_TIMEOUT`` or aborted; ``run()`` returns soon after.
        For sweeps and callbacks, which must never wait on one peer."""
        if self._closing:
            return
        self._closing = True
        self.close_reason = self.close_reason or reason
        self.mux.go_away(code)
        if not self._congested:
            self._write_now()
        if self._tasks is not None:
            self._tasks.create_task(self._close_ws())
        elif not self.transport.abort():
            log.info("tunnel=%s closed before it ran; nothing to abort", self.label)

    async def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "closed") -> None:
        """``close_nowait``, then wait until the transport is closed (at most ``CLOSE_TIMEOUT``)."""
        self.close_nowait(code, reason)
        await self._close_ws()

    # --- internals ----------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        burst = 0
        while True:
            burst += 1
            if burst >= READ_BURST:
                # A transport may return queued messages without suspending: a peer that sends tiny
                # messages would otherwise hold the event loop for a whole socket read's worth of them.
                burst = 0
                await asyncio.sleep(0)
            message = await self.transport.receive()
            if isinstance(message, Closed):
                self.close_reason = self.close_reason or message.reason
                return
            try:
                events = self.mux.receive_data(message, time.monotonic())
            except ProtocolError as exc:
                log.warning("tunnel=%s protocol error from peer: %s", self.label, exc)
                await self.close(exc.code, f"protocol error: {exc}")
                return
            for event in events:
                self._dispatch(event)
            await self.flush()

    def _dispatch(self, event: m.Event) -> None:
        match event:
            case m.DataReceived(sid, data):
                stream = self._streams.get(sid)
                if stream is None:  # nobody holds the stream any more: consumed at once
                    self.mux.acknowledge(sid, len(data))
                else:
                    stream._on_data(data)
            case m.StreamOpened(sid, open_payload):
                self._accept(sid, open_payload)
            case m.StreamEnded(sid):
                if (stream := self._streams.get(sid)) is not None:
                    stream._on_eof()
            case m.StreamReset(sid, code):
                if (stream := self._streams.get(sid)) is not None:
                    stream._on_reset(code)
            case m.WindowUpdated(0):
                for stream in list(self._streams.values()):
                    stream._on_credit()
            case m.WindowUpdated(sid):
                if (stream := self._streams.get(sid)) is not None:
                    stream._on_credit()
            case m.GoAwayReceived(_, code):
                self.goaway_code = code
                log.info("tunnel=%s peer is going away (%s)", self.label, code.name)
            case m.PongReceived() | m.PingReceived():
                pass  # the mux answered the ping and took the pong's RTT
            case m.ReportReceived(payload):
                if self._on_report is not None:
                    self._on_report(payload)

    def _accept(self, sid: int, open_payload: OpenPayload) -> None:
        stream = TunnelStream(self, sid, open_payload)
        self._streams[sid] = stream
        assert self._tasks is not None
        self._tasks.create_task(self._run_handler(stream))

    async def _run_handler(self, stream: TunnelStream) -> None:
        try:
            await self._on_stream(stream)
        except (StreamResetError, LinkError):
            pass
        except Exception:
            log.exception("tunnel=%s stream=%d handler failed", self.label, stream.id)
        finally:
            await stream.release()

    def _forget(self, stream: TunnelStream) -> None:
        self._streams.pop(stream.id, None)
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self._close_when_idle and not self._streams and self._tasks is not None:
            self.close_nowait(ErrorCode.NO_ERROR, "stream ids exhausted: reconnecting for fresh ones")

    def _abort_streams(self) -> None:
        """The connection is gone: every stream ends as ABORTED (no credit to return any more)."""
        for stream in list(self._streams.values()):
            stream._on_reset(ErrorCode.ABORTED, connection_gone=True)
        self._streams.clear()
        callbacks, self._drain_callbacks = self._drain_callbacks, []
        for callback in callbacks:
            callback()

    async def _timer(self) -> None:
        """The mux's one timer (keepalive). It never awaits a write, so a full send buffer cannot blind it."""
        loop = asyncio.get_running_loop()
        while True:
            deadline = self.mux.next_deadline()
            assert deadline is not None  # keepalive was started in __init__
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            for verdict in self.mux.handle_timer(time.monotonic()):
                assert isinstance(verdict, (m.PeerDead, m.PeerNotReading))
                self.close_reason = verdict.describe()
                self._closing = True
                log.warning("tunnel=%s %s; closing", self.label, self.close_reason)
                loop.call_soon(self._abort_streams)
                if not self.transport.abort():  # nothing more is sent to a dead peer
                    await self._close_ws()
                return
            self._write_now()  # the PING, if one was due

    async def _close_ws(self) -> None:
        """Close the transport within ``CLOSE_TIMEOUT``; abort it if the close does not finish by then, or
        at once when the send buffer is full (a close would wait behind it)."""
        self._closing = True
        if self._congested:
            self.transport.abort()
            return
        try:
            await asyncio.wait_for(self.transport.close(), timeout=CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError):
            self.transport.abort()
