"""One byte channel over a TCP connection or a tunnel stream, for code that speaks DICOM itself.

The splice moves bytes between a socket and a stream from callbacks and never looks at them. The
DICOM-aware parts of the agent (the spool's ingest, the forwarder) instead read what the peer sent,
feed it to the sans-IO association (``tunnel_core.dicom.association``) and write what it produced. They
do it through :class:`ByteChannel`, whichever the peer is on:

- :class:`PipeChannel`: a DICOM peer's TCP connection (``tunnel_link.pipe.Pipe``);
- :class:`StreamChannel`: a stream of the tunnel (``tunnel_link.session.TunnelStream``).

``read()`` returns what arrived since the last call, b"" once the peer ended its side, and raises
:class:`ChannelClosed` when the connection broke or the stream was reset. ``write()`` returns when all of
``data`` was taken, waiting for the socket to drain or for the stream's credit. Neither has a deadline of
its own: the caller wraps each await on the peer in the deadline its protocol gives it (ARTIM, DIMSE).

A stream's received bytes are acknowledged (their credit returned to the sender) when ``read()`` hands
them out: the caller processes them before it reads again, so credit follows consumption, and what a
stream channel can hold is bounded by the stream's window.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

from tunnel_core.codes import ErrorCode
from tunnel_link.errors import LinkError
from tunnel_link.pipe import Pipe
from tunnel_link.session import TunnelStream

__all__ = ["ByteChannel", "ChannelClosed", "PipeChannel", "StreamChannel"]


class ChannelClosed(LinkError):
    """The connection broke, or the stream was reset (``code`` then says why; else None)."""

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ByteChannel(Protocol):
    async def read(self) -> bytes: ...
    async def write(self, data: bytes | memoryview) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class PipeChannel:
    """A DICOM peer's TCP connection. ``close()`` half-closes after what was written, then closes."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.peer = pipe.peer

    async def read(self) -> bytes:
        try:
            return await self.pipe.read()
        except ConnectionError as exc:
            raise ChannelClosed(f"connection from {self.peer} broke") from exc

    async def write(self, data: bytes | memoryview) -> None:
        try:
            self.pipe.write(data)
            await self.pipe.drain()
        except ConnectionError as exc:
            raise ChannelClosed(f"connection from {self.peer} broke") from exc

    def close(self) -> None:
        self.pipe.write_eof()
        self.pipe.close()

    def abort(self) -> None:
        if self.pipe.transport is not None:
            self.pipe.transport.abort()


class StreamChannel:
    """A tunnel stream as a byte channel. Build it before the stream's first byte is read: it attaches
    itself as the stream's listener. ``release()`` when done (the stream is reset if still open)."""

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        self._inbound: collections.deque[bytes | memoryview] = collections.deque()
        self._eof = False
        self._reset: ErrorCode | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        stream.attach(self)

    async def read(self) -> bytes:
        while not self._inbound:
            if self._reset is not None:
                raise ChannelClosed(f"stream reset: {self._reset.name}", self._reset)
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunks = [self._inbound.popleft() for _ in range(len(self._inbound))]
        data = bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)
        self.stream.consumed(len(data))
        return data

    async def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._reset is not None:
                raise ChannelClosed(f"stream reset: {self._reset.name}", self._reset)
            self._writable.clear()
            n = self.stream.send(view)
            view = view[n:]
            if view or not self.stream.writable:
                await self._writable.wait()  # stream_writable() or stream_reset() sets it

    def close(self) -> None:
        self.stream.end()

    def abort(self) -> None:
        self.stream.reset_nowait(ErrorCode.ABORTED)

    async def release(self) -> None:
        await self.stream.release()

    # --- StreamListener ---------------------------------------------------------------------------------

    def stream_data(self, data: bytes | memoryview) -> None:
        self._inbound.append(data)
        self._readable.set()

    def stream_eof(self) -> None:
        self._eof = True
        self._readable.set()

    def stream_reset(self, code: ErrorCode) -> None:
        self._reset = code
        self._inbound.clear()  # the stream settled their credit when it was reset
        self._readable.set()
        self._writable.set()

    def stream_writable(self) -> None:
        self._writable.set()

