"""One TCP connection of a DICOM peer, as the splice needs it: bounded reads that coalesce, writes that
wait for the kernel, half-close both ways.

Why not asyncio's StreamReader/StreamWriter: they copy every chunk into a buffer and out again, and hand
out one chunk per call. ``Pipe.read()`` returns everything that arrived since the last call as one bytes
object (usually the very object the socket produced), so a busy pipeline moves fewer, larger frames.
The inbound queue is bounded: past ``high_water`` bytes the transport stops reading, and the peer's TCP
window closes — that is how backpressure reaches the sending socket.

``PipeServer`` starts a connection's handler from ``connection_made``, not from the protocol factory: a
handler only ever sees a pipe that has its transport, so ``peer`` names the caller from the first line it
logs (a task started by the factory ran before the transport existed and logged ``peer=None``).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Protocol

from tunnel_link.sockets import tune

HIGH_WATER = 512 * 1024


class Pipe(asyncio.Protocol):
    """``on_connected`` is called with the pipe once its transport is in place (``PipeServer`` uses it to
    start the connection's handler)."""

    def __init__(self, high_water: int = HIGH_WATER, *,
                 on_connected: Callable[[Pipe], None] | None = None) -> None:
        self._high = high_water
        self._on_connected = on_connected
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._lost: BaseException | None = None
        self._closed = False
        self._reading_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._consumer: PipeConsumer | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "-"  # the remote "host:port", once connected

    # --- protocol callbacks -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's class
        self.peer = format_address(transport.get_extra_info("peername"))
        tune(transport)
        if self._on_connected is not None:
            self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        if self._consumer is not None:
            self._consumer.socket_data(data)
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= self._high and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        if self._consumer is not None:
            self._consumer.socket_eof()
        return True  # keep the transport open for writing: DICOM peers half-close after release

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = True
        self._eof = True
        self._lost = exc
        self._wake_reader()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            if exc is None:
                self._drain_waiter.set_result(None)
            else:
                self._drain_waiter.set_exception(ConnectionResetError(str(exc)))
        if self._consumer is not None:
            self._consumer.socket_lost(exc)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self._consumer is not None:
            self._consumer.socket_writable()

    # --- callback mode -------------------------------------------------------------------------------------

    def attach(self, consumer: PipeConsumer) -> None:
        """From now on, hand what arrives to ``consumer`` as it arrives (what ``read()`` left is first)."""
        self._consumer = consumer
        if self._chunks:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            consumer.socket_data(data)
        self.resume()
        if self._closed:
            consumer.socket_lost(self._lost)
        elif self._eof:
            consumer.socket_eof()

    def pause(self) -> None:
        """Stop reading from the socket (the peer's TCP window then closes)."""
        if not self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = False
            self.transport.resume_reading()

    @property
    def write_congested(self) -> bool:
        """The transport is over its high-water mark; ``socket_writable`` follows when it drains."""
        return self._writing_paused

    # --- reading -----------------------------------------------------------------------------------------

    async def read(self) -> bytes:
        """Everything received so far (at least one byte), or b"" at end of stream.

        Raises ConnectionResetError if the connection broke before its end of stream.
        """
        while not self._chunks:
            if self._eof:
                if self._lost is not None:
                    raise ConnectionResetError(str(self._lost))
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    # --- writing -----------------------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the kernel's send buffer and the transport's are full."""
        if self._closed:
            raise ConnectionResetError("connection closed")
        if not self._writing_paused:
            return
        self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    def write_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and self.transport.can_write_eof():
            self.transport.write_eof()

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def peername(self) -> object:
        return self.transport.get_extra_info("peername") if self.transport else None


def format_address(address: object) -> str:
    """A socket address as ops read it: ``127.0.0.1:5555``, ``[::1]:5555``; ``-`` when there is none."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) if address else "-"


class PipeConsumer(Protocol):
    def socket_data(self, data: bytes) -> None: ...
    def socket_eof(self) -> None: ...
    def socket_lost(self, exc: BaseException | None) -> None: ...
    def socket_writable(self) -> None: ...


PipeHandler = Callable[[Pipe], Awaitable[None]]


class PipeServer:
    """A TCP listener whose connections are Pipes, each served by ``handler`` in a task owned here."""

    def __init__(self, handler: PipeHandler) -> None:
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._make_pipe, host, port)
        return self.server.sockets[0].getsockname()[:2]

    def _make_pipe(self) -> Pipe:
        return Pipe(on_connected=self._start)

    def _start(self, pipe: Pipe) -> None:
        """From ``connection_made``: the pipe has its transport and its peer address."""
        if self._closing:
            pipe.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(pipe))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, pipe: Pipe) -> None:
        try:
            await self._handler(pipe)
        finally:
            pipe.close()

    @property
    def active(self) -> int:
        """Connections being served now."""
        return len(self._tasks)

    def stop_accepting(self) -> None:
        """Close the listening socket; the connections being served go on (``close()`` ends them)."""
        self._closing = True  # one accepted in the same turn is closed unserved
        if self.server is not None:
            self.server.close()

    async def close(self) -> None:
        self._closing = True
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def dial(host: str, port: int) -> Pipe:
    _transport, pipe = await asyncio.get_running_loop().create_connection(Pipe, host, port)
    return pipe
