"""An in-memory MessageTransport pair, for running two MuxSessions against each other in one process."""

from __future__ import annotations

import asyncio

from tunnel_link.transport import Closed

__all__ = ["MemoryTransport", "memory_pair"]


class MemoryTransport:
    """One end of an in-memory message pipe; ``congested`` is set by the test."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes | Closed] = asyncio.Queue()
        self.peer: MemoryTransport | None = None
        self.congested = False
        self.room = asyncio.Event()
        self.room.set()
        self.ended = False
        self.sent = 0

    def send(self, message: bytearray) -> None:
        if self.ended:
            raise ConnectionResetError("ended")
        assert self.peer is not None
        self.sent += 1
        self.peer.inbox.put_nowait(bytes(message))

    async def drained(self) -> None:
        while self.congested:
            self.room.clear()
            await self.room.wait()

    def set_congested(self, value: bool) -> None:
        self.congested = value
        if not value:
            self.room.set()

    async def receive(self) -> bytes | Closed:
        return await self.inbox.get()

    async def close(self) -> None:
        self.abort()

    def abort(self) -> bool:
        if not self.ended:
            self.ended = True
            assert self.peer is not None
            self.peer.inbox.put_nowait(Closed("peer closed the tunnel"))
            self.inbox.put_nowait(Closed("closed"))
        return True

    async def pump(self) -> None:
        return None


def memory_pair() -> tuple[MemoryTransport, MemoryTransport]:
    a, b = MemoryTransport(), MemoryTransport()
    a.peer, b.peer = b, a
    return a, b
