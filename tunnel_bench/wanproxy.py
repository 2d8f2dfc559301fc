"""A userspace TCP proxy that emulates a WAN link: one-way delay and a bandwidth limit, both directions.

``tc netem`` is not available in this kernel, so the emulated link lives in a process between the two
ends. Theory of operation, per direction: a receiver reads what the sender wrote, asks the
:class:`Link` when those bytes arrive at the far end (the token bucket says when they have been
serialized onto the link at ``rate``; propagation adds ``delay``), and queues them; a deliverer writes
each chunk out when its time has come. Each direction is one link shared by every connection through
the proxy: they share its bandwidth and its queue, as flows share a real link. A new connection's
first bytes are read one round trip after it was accepted, as if its TCP handshake had crossed the
link (the local handshake with the proxy is free). The queue is bounded in bytes (:class:`ByteBudget`):
when it is full the receivers stop reading, so TCP back-pressure reaches the senders, as a full router
buffer would. The bound must hold
at least the bytes in flight (rate x delay) for the link to run at full rate; the
default is twice the bandwidth-delay product of the round trip plus 256 KiB.

:class:`TokenBucket` and :class:`Link` are pure (time is a parameter) and unit-tested without sockets.
Run as its own process: ``python -m tunnel_bench.wanproxy --listen-port A --target-port B
--delay-ms 40 --rate-mbit 200`` (40 ms one way = 80 ms RTT).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from collections import deque
from collections.abc import Sequence

__all__ = ["ByteBudget", "Link", "TokenBucket", "WanProxy", "default_buffer_bytes", "main"]

READ_CHUNK = 64 * 1024
MIN_BUFFER = 256 * 1024


class TokenBucket:
    """Tokens (bytes) accrue at ``rate`` per second up to ``burst``; a reservation may run into debt.

    ``reserve(now, n)`` takes ``n`` tokens and returns the time at which they will have been paid for,
    i.e. when the last of the ``n`` bytes leaves the bottleneck. ``rate`` None means unlimited.
    Reservation times never go backwards, so bytes leave in the order they were reserved.
    """

    def __init__(self, rate: float | None, burst: float, now: float = 0.0) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (or None for unlimited)")
        if burst < 0:
            raise ValueError("burst must not be negative")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def reserve(self, now: float, nbytes: int) -> float:
        now = max(now, self.updated)
        if self.rate is None:
            return now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= nbytes
        return now if self.tokens >= 0 else now + -self.tokens / self.rate


class Link:
    """One direction of the emulated link: ``arrival(now, n)`` is when ``n`` bytes sent at ``now`` arrive."""

    def __init__(self, delay: float, rate: float | None, burst: float = READ_CHUNK, now: float = 0.0) -> None:
        if delay < 0:
            raise ValueError("delay must not be negative")
        self.delay = delay
        self.bucket = TokenBucket(rate, burst, now)

    def arrival(self, now: float, nbytes: int) -> float:
        return self.bucket.reserve(now, nbytes) + self.delay


def default_buffer_bytes(delay: float, rate: float | None) -> int:
    """Queue bound per direction: 2 x the round trip's bandwidth-delay product + 256 KiB (4 MiB unlimited)."""
    if rate is None:
        return 4 * 1024 * 1024
    return int(2 * rate * 2 * delay) + MIN_BUFFER


class ByteBudget:
    """At most ``limit`` bytes queued; ``acquire(n)`` waits for room (one oversized chunk may pass alone)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1 byte")
        self.limit = limit
        self.used = 0
        self._room = asyncio.Condition()

    async def acquire(self, nbytes: int) -> None:
        async with self._room:
            await self._room.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.limit)
            self.used += nbytes

    async def release(self, nbytes: int) -> None:
        async with self._room:
            self.used -= nbytes
            self._room.notify_all()


class _Direction:
    """Carries one direction of one connection over a link (and queue) shared by all connections.

    ``not_before``: no byte is read before this time (the connection's emulated TCP handshake)."""

    def __init__(self, link: Link, budget: ByteBudget, not_before: float = 0.0) -> None:
        self.link = link
        self.budget = budget
        self.not_before = not_before
        self.queue: deque[tuple[float, bytes]] = deque()
        self.ready = asyncio.Event()

    async def receive(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        if (wait := self.not_before - loop.time()) > 0:
            await asyncio.sleep(wait)  # meanwhile the sender's bytes wait in its socket, as before SYN-ACK
        while data := await reader.read(READ_CHUNK):
            await self.budget.acquire(len(data))
            self.queue.append((self.link.arrival(loop.time(), len(data)), data))
            self.ready.set()
        self.queue.append((self.link.arrival(loop.time(), 0), b""))  # end of stream, after the data
        self.ready.set()

    async def deliver(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            due, data = self.queue.popleft()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            await self.budget.release(len(data))


class WanProxy:
    """Listens on 127.0.0.1:``listen_port``; each connection is carried to 127.0.0.1:``target_port``."""

    def __init__(self, listen_port: int, target_port: int, *, delay: float, rate: float | None,
                 buffer_bytes: int | None = None) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.delay = delay
        self.rate = rate
        self.buffer_bytes = buffer_bytes or default_buffer_bytes(delay, rate)
        # One link per direction, shared by every connection: flows share its bandwidth and its queue.
        self._links = {"out": Link(delay, rate), "in": Link(delay, rate)}
        self._budgets = {"out": ByteBudget(self.buffer_bytes), "in": ByteBudget(self.buffer_bytes)}
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen_port, backlog=512)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            down_writer.close()
            return
        for writer in (down_writer, up_writer):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._carry(down_reader, down_writer, up_reader, up_writer)
        finally:
            for writer in (down_writer, up_writer):
                writer.close()

    async def _carry(self, down_reader, down_writer, up_reader, up_writer) -> None:
        # The caller's TCP handshake completed locally; on the emulated link its first byte could only
        # leave after SYN and SYN-ACK, one round trip after it connected.
        handshake_done = asyncio.get_running_loop().time() + 2 * self.delay
        outbound = _Direction(self._links["out"], self._budgets["out"], handshake_done)
        inbound = _Direction(self._links["in"], self._budgets["in"])
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(outbound.receive(down_reader))
                group.create_task(outbound.deliver(up_writer))
                group.create_task(inbound.receive(up_reader))
                group.create_task(inbound.deliver(down_writer))
        except* (ConnectionError, OSError):
            pass  # either end went away: both sides are closed by the caller


async def _run(args: argparse.Namespace) -> None:
    rate = args.rate_mbit * 1e6 / 8 if args.rate_mbit > 0 else None
    proxy = WanProxy(args.listen_port, args.target_port, delay=args.delay_ms / 1000, rate=rate,
                     buffer_bytes=args.buffer_bytes or None)
    port = await proxy.start()
    print(f"wanproxy 127.0.0.1:{port} -> 127.0.0.1:{args.target_port} delay={args.delay_ms}ms "
          f"rate={args.rate_mbit}Mbit/s buffer={proxy.buffer_bytes}B", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    proxy.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunnel_bench.wanproxy", description=__doc__.split("\n")[0])
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay (RTT is twice this)")
    parser.add_argument("--rate-mbit", type=float, default=0, help="bandwidth per direction; 0 = unlimited")
    parser.add_argument("--buffer-bytes", type=int, default=0, help="queue bound per direction; 0 = default")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
