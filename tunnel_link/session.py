"""The mux over a WebSocket: the asyncio adapter around :class:`tunnel_core.mux.Mux`.

Read → feed the core → act on its events → send what it produced. One reader loop per connection, one
heartbeat timer, and one handler task per remotely opened stream, all owned by the session's TaskGroup.
Writers send inline (aiohttp writes a WebSocket message to the transport synchronously and only then
waits for drain), so frames leave in the order the core queued them and a small frame is never parked
behind a deep application queue.

Nothing here waits on the peer without a deadline. The heartbeat timer never awaits a write: it queues
its PING and moves on, so it keeps judging the peer while our send buffer is full. Every wait for that
buffer to drain starts the heartbeat's stall clock (``Heartbeat.on_send_blocked``); a peer that neither
sends for three intervals nor drains our buffer for three intervals is dead, and the timer aborts the
transport, which ends every pending write and read at once. Closing sends GOAWAY if the buffer has room,
then gives the WebSocket close handshake a short, fixed time before aborting: a peer that stopped reading
can never hold a close (or whoever asked for it) hostage.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp

from tunnel_core import mux as m
from tunnel_core.codes import ErrorCode
from tunnel_core.errors import ProtocolError
from tunnel_core.frames import OpenPayload
from tunnel_core.heartbeat import Heartbeat, PeerDead, PeerNotReading, SendPing
from tunnel_link.errors import LinkError, StreamResetError
from tunnel_link.wswrite import FastBinaryWriter, abort_websocket

log = logging.getLogger(__name__)

MAX_MESSAGE = 2 * 1024 * 1024  # bytes per WebSocket message we send (whole frames)
MAX_MESSAGE_IN = 4 * 1024 * 1024  # aiohttp's receive limit; above our own send size
CLOSE_TIMEOUT = 1.0  # seconds the WebSocket close handshake may take before the transport is aborted
READ_BURST = 64  # messages the read loop handles before it lets other connections run


class WebSocketLike(Protocol):
    async def send_bytes(self, data: bytes) -> None: ...
    async def receive(self) -> aiohttp.WSMessage: ...
    async def close(self, *, code: int = ..., message: bytes = ...) -> Any: ...


class TunnelStream:
    """One stream as its handler sees it.

    First ``read()`` chunks (b"" at the peer's half-close; a reset raises ``StreamResetError``) until the
    A-ASSOCIATE-RQ is in, then ``attach`` a listener (``tunnel_link.splice.Splice``) that carries the rest
    from callbacks and acknowledges what it consumed. ``release()`` when done.
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

    async def read(self) -> bytes:
        while not self._inbound:
            if self.reset_code is not None:
                raise StreamResetError(self.reset_code)
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        return self._inbound.popleft()

    async def reset(self, code: ErrorCode) -> None:
        self.reset_nowait(code)
        await self.session.flush()

    def reset_nowait(self, code: ErrorCode) -> None:
        """Reset the stream now (for callbacks); the RESET frame is written at once."""
        if self.reset_code is None:
            self.session.mux.reset_stream(self.id, code)
            self._on_reset(code)
            self.session.flush_nowait()

    async def release(self) -> None:
        """The handler is done with the stream: reset it if it is still open, and drop it."""
        if self.reset_code is None and self.session.mux.stream_state(self.id) is not m.StreamState.CLOSED:
            try:
                await self.reset(ErrorCode.INTERNAL_ERROR)
            except LinkError:
                pass
        self.session._forget(self)

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

    # --- called by the session ----------------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
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

    def _on_reset(self, code: ErrorCode) -> None:
        if self.reset_code is not None:
            return
        self.reset_code = code
        # Nothing is delivered after a reset; give the discarded bytes' credit back to the connection.
        dropped = sum(map(len, self._inbound))
        self._inbound.clear()
        if dropped:
            self.session.mux.acknowledge(self.id, dropped)
        self._readable.set()
        self.session._forget(self)
        if self._listener is not None:
            self._listener.stream_reset(code)

    def _on_credit(self) -> None:
        if self._listener is not None:
            self._listener.stream_credit()


class StreamListener(Protocol):
    """Receives an attached stream's events synchronously (see ``TunnelStream.attach``)."""

    def stream_data(self, data: bytes | memoryview) -> None: ...
    def stream_eof(self) -> None: ...
    def stream_reset(self, code: ErrorCode) -> None: ...
    def stream_credit(self) -> None: ...


StreamHandler = Callable[[TunnelStream], Awaitable[None]]


class MuxSession:
    """Run one tunnel connection until it closes. Create, then ``await run()``; streams via ``open_stream``."""

    def __init__(self, ws: WebSocketLike, mux: m.Mux, *, heartbeat_interval: float,
                 on_stream: StreamHandler, label: str,
                 on_report: Callable[[bytes], None] | None = None) -> None:
        self.ws = ws
        self.mux = mux
        # The agent is the WebSocket client, which must mask what it sends (RFC 6455 §5.3).
        self._fast = FastBinaryWriter.attach(ws, mask=mux.role is m.Role.AGENT)
        self.label = label
        self._on_stream = on_stream
        self._on_report = on_report
        self._streams: dict[int, TunnelStream] = {}
        self._heartbeat = Heartbeat(heartbeat_interval, time.monotonic())
        self._tasks: asyncio.TaskGroup | None = None
        self._closing = False
        self.connected_at = time.time()
        self.close_reason = ""
        self.goaway_code: ErrorCode | None = None  # the code of the peer's GOAWAY, once one arrived
        self.ended = asyncio.Event()  # set when run() has returned (or raised)
        self._drain_callbacks: list[Callable[[], None]] = []
        self._drain_task: asyncio.Task[None] | None = None

    @property
    def rtt(self) -> float | None:
        return self._heartbeat.rtt

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
        """Serve until the WebSocket closes, the peer goes silent, or ``close()``. Then reset every stream."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                await self.flush()
                beat = tasks.create_task(self._beat())
                try:
                    await self._read_loop()
                finally:
                    beat.cancel()
                    self._abort_streams()
        except* (aiohttp.ClientError, ConnectionError, LinkError) as group:
            self.close_reason = self.close_reason or f"transport error: {group.exceptions[0]!r}"
        finally:
            self._tasks = None
            self._abort_streams()
            try:
                await self._close_ws()
            finally:
                self.ended.set()

    async def open_stream(self, open_payload: OpenPayload) -> TunnelStream:
        """Open a stream; its OPEN frame goes out with the next write (``write``/``flush``)."""
        if self._tasks is None or self._closing:
            raise LinkError("tunnel is not connected")
        sid = self.mux.open_stream(open_payload)
        stream = TunnelStream(self, sid, open_payload)
        self._streams[sid] = stream
        # Not flushed here: the caller's first bytes follow at once and leave in the same message,
        # so the far side sees OPEN and the A-ASSOCIATE-RQ in one read.
        return stream

    async def flush(self) -> None:
        """Send what the core queued, waiting while the send buffer is full. Raises ``LinkError`` once the
        connection is gone (including when the heartbeat gave up on a peer that stopped reading)."""
        while self.mux.has_data_to_send():
            data = self.mux.data_to_send(MAX_MESSAGE)
            try:
                if self._fast is not None:
                    self._fast.write(data)
                    if self._fast.congested:
                        await self._wait_writable()
                else:
                    self._heartbeat.on_send_blocked(time.monotonic())
                    try:
                        await self.ws.send_bytes(bytes(data))
                    finally:
                        self._heartbeat.on_send_drained()
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                self._closing = True
                raise LinkError(f"tunnel write failed: {exc!r}") from exc

    async def _wait_writable(self) -> None:
        """Wait for the fast writer's buffer to drain, with the heartbeat's stall clock running."""
        assert self._fast is not None
        self._heartbeat.on_send_blocked(time.monotonic())
        await self._fast.drained()
        self._heartbeat.on_send_drained()

    def flush_nowait(self) -> None:
        """Send what the core queued without waiting: for callbacks. See ``congested`` for backpressure."""
        if self._fast is None:
            if self.mux.has_data_to_send() and self._tasks is not None:
                self._tasks.create_task(self._flush_quietly())
            return
        while self.mux.has_data_to_send():
            try:
                self._fast.write(self.mux.data_to_send(MAX_MESSAGE))
            except (ConnectionError, RuntimeError) as exc:
                self._closing = True
                log.info("tunnel=%s write failed: %r", self.label, exc)
                return

    async def _flush_quietly(self) -> None:
        try:
            await self.flush()
        except LinkError:
            pass

    @property
    def congested(self) -> bool:
        """The WebSocket's send buffer is over its high-water mark: sources should pause."""
        return self._fast is not None and self._fast.congested

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the WebSocket's send buffer has drained (or the session ended)."""
        self._drain_callbacks.append(callback)
        if self._drain_task is None and self._tasks is not None:
            self._drain_task = self._tasks.create_task(self._wait_drained())

    async def _wait_drained(self) -> None:
        try:
            if self._fast is not None:
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
        self.flush_nowait()

    def close_nowait(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "closed") -> None:
        """Start closing and return at once: GOAWAY is written if the send buffer has room, then the
        WebSocket is closed within ``CLOSE_TIMEOUT`` or its transport aborted; ``run()`` returns soon after.
        For sweeps and callbacks, which must never wait on one peer."""
        if self._closing:
            return
        self._closing = True
        self.close_reason = self.close_reason or reason
        self.mux.go_away(code)
        if not self.congested:
            self.flush_nowait()
        if self._tasks is not None:
            self._tasks.create_task(self._close_ws())
        elif not abort_websocket(self.ws):
            log.info("tunnel=%s closed before it ran; nothing to abort", self.label)

    async def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "closed") -> None:
        """``close_nowait``, then wait until the WebSocket is closed (at most ``CLOSE_TIMEOUT``)."""
        self.close_nowait(code, reason)
        await self._close_ws()

    # --- internals ----------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        burst = 0
        while True:
            burst += 1
            if burst >= READ_BURST:
                # aiohttp returns queued messages without suspending: a peer that sends tiny messages
                # would otherwise hold the event loop for a whole socket read's worth of them.
                burst = 0
                await asyncio.sleep(0)
            msg = await self.ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                self._heartbeat.on_activity(time.monotonic())
                try:
                    events = self.mux.receive_data(msg.data)
                except ProtocolError as exc:
                    log.warning("tunnel=%s protocol error from peer: %s", self.label, exc)
                    await self.close(exc.code, f"protocol error: {exc}")
                    return
                for event in events:
                    self._dispatch(event)
                await self.flush()
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                self.close_reason = self.close_reason or "peer closed the tunnel"
                return
            elif msg.type is aiohttp.WSMsgType.ERROR:
                self.close_reason = self.close_reason or f"websocket error: {self.ws_exception()!r}"
                return
            # TEXT and others: not part of the protocol; ignored.

    def ws_exception(self) -> BaseException | None:
        exc = getattr(self.ws, "exception", None)
        return exc() if callable(exc) else None

    def _dispatch(self, event: m.Event) -> None:
        match event:
            case m.DataReceived(sid, data):
                stream = self._streams.get(sid)
                if stream is None:  # handler gone; return the credit
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
                for stream in self._streams.values():
                    stream._on_credit()
            case m.WindowUpdated(sid):
                if (stream := self._streams.get(sid)) is not None:
                    stream._on_credit()
            case m.PongReceived(opaque):
                self._heartbeat.on_pong(opaque, time.monotonic())
            case m.GoAwayReceived(_, code):
                self.goaway_code = code
                log.info("tunnel=%s peer is going away (%s)", self.label, code.name)
            case m.PingReceived():
                pass
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

    def _abort_streams(self) -> None:
        """The connection is gone: every stream ends as ABORTED (no credit to return any more)."""
        for stream in list(self._streams.values()):
            stream._inbound.clear()
            stream._on_reset(ErrorCode.ABORTED)
        self._streams.clear()
        callbacks, self._drain_callbacks = self._drain_callbacks, []
        for callback in callbacks:
            callback()

    async def _beat(self) -> None:
        """The heartbeat's timer. It never awaits a write, so a full send buffer cannot blind it."""
        loop = asyncio.get_running_loop()
        while True:
            delay = self._heartbeat.next_deadline() - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
            action = self._heartbeat.poll(time.monotonic())
            if isinstance(action, SendPing):
                self.mux.ping(action.opaque)
                self.flush_nowait()
            elif isinstance(action, (PeerDead, PeerNotReading)):
                self.close_reason = action.describe()
                self._closing = True
                log.warning("tunnel=%s %s; closing", self.label, self.close_reason)
                loop.call_soon(self._abort_streams)
                if not abort_websocket(self.ws):  # nothing more is sent to a dead peer
                    await self._close_ws()
                return

    async def _close_ws(self) -> None:
        """Close the WebSocket within ``CLOSE_TIMEOUT``; abort its transport if the handshake does not
        finish by then, or at once when the send buffer is full (a close frame would wait behind it)."""
        self._closing = True
        if self.congested:
            abort_websocket(self.ws)
            return
        try:
            await asyncio.wait_for(self.ws.close(), timeout=CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
            abort_websocket(self.ws)
