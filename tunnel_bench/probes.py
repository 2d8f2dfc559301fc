"""Association probes: raw-socket clients that do A-ASSOCIATE-RQ -> AC, then A-RELEASE-RQ -> RP.

- :func:`probe` (blocking) times one association set-up + release, TCP connect included: the latency
  measurement, run 200 times in sequence.
- :func:`hold_idle` (asyncio) opens many associations and keeps them open (idle-association memory).
- :func:`churn` (asyncio) starts associations at a fixed rate, each released at once.

Every socket sets TCP_NODELAY and every wait has a timeout; a failure is counted, never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

from devkit.ports import LOOPBACK
from tunnel_bench.paths import Endpoint
from tunnel_bench.pdus import A_ASSOCIATE_AC, A_RELEASE_RP, RELEASE_RQ, PduBuffer, PduError, associate_rq
from tunnel_bench.peers import CALLING_AE

__all__ = ["ChurnResult", "Held", "churn", "hold_idle", "probe", "probe_series", "release_all"]

PROBE_TIMEOUT_S = 10.0


@cache
def _rq(called_ae: str) -> bytes:
    return associate_rq(called_ae, CALLING_AE)


def _recv_pdu(sock: socket.socket) -> bytes:
    buffer = PduBuffer()
    for _ in range(1024):
        data = sock.recv(65536)
        if not data:
            raise PduError("peer closed the connection")
        if pdus := buffer.feed(data):
            return pdus[0]
    raise PduError("no whole PDU after 1024 reads")


def _expect(pdu: bytes, kind: int) -> None:
    if pdu[0] != kind:
        raise PduError(f"expected PDU type 0x{kind:02x}, got 0x{pdu[0]:02x}")


def probe(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT_S) -> float:
    """Seconds for connect + A-ASSOCIATE-RQ/AC + A-RELEASE-RQ/RP against ``endpoint``."""
    rq = _rq(endpoint.called_ae)
    start = time.perf_counter()
    with socket.create_connection((LOOPBACK, endpoint.port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(rq)
        _expect(_recv_pdu(sock), A_ASSOCIATE_AC)
        sock.sendall(RELEASE_RQ)
        _expect(_recv_pdu(sock), A_RELEASE_RP)
        return time.perf_counter() - start


def probe_series(endpoint: Endpoint, count: int, *, between: Callable[[], None] | None = None
                 ) -> tuple[list[float], list[str]]:
    """``count`` sequential probes; returns the successful durations and the errors of the failed ones."""
    times: list[float] = []
    errors: list[str] = []
    for _ in range(count):
        try:
            times.append(probe(endpoint))
        except (OSError, PduError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        if between is not None:
            between()
    return times, errors


# --- asyncio: many associations ------------------------------------------------------------------------


@dataclass
class Held:
    """Associations kept open by :func:`hold_idle`."""

    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _read_pdu(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(6)
    return header + await reader.readexactly(int.from_bytes(header[2:6], "big"))


async def _open(endpoint: Endpoint) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(LOOPBACK, endpoint.port)
    try:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(_rq(endpoint.called_ae))
        _expect(await _read_pdu(reader), A_ASSOCIATE_AC)
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _release(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(RELEASE_RQ)
        _expect(await _read_pdu(reader), A_RELEASE_RP)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


_FAILURES = (OSError, PduError, asyncio.IncompleteReadError, TimeoutError)


async def hold_idle(endpoints: Sequence[Endpoint], count: int, *, concurrency: int = 50,
                    timeout: float = PROBE_TIMEOUT_S) -> Held:
    """Open ``count`` associations, alternating over ``endpoints``, ``concurrency`` at a time; keep them."""
    held = Held()
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with gate:
            try:
                async with asyncio.timeout(timeout):
                    held.streams.append(await _open(endpoints[index % len(endpoints)]))
            except _FAILURES as exc:
                held.errors.append(f"{type(exc).__name__}: {exc}")

    async with asyncio.TaskGroup() as group:
        for index in range(count):
            group.create_task(one(index))
    return held


async def release_all(held: Held, *, concurrency: int = 50, timeout: float = PROBE_TIMEOUT_S) -> int:
    """Release every held association; returns how many did not release cleanly."""
    gate = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal failed
        async with gate:
            try:
                async with asyncio.timeout(timeout):
                    await _release(reader, writer)
            except _FAILURES:
                failed += 1

    async with asyncio.TaskGroup() as group:
        for reader, writer in held.streams:
            group.create_task(one(reader, writer))
    held.streams.clear()
    return failed


@dataclass
class ChurnResult:
    attempted: int = 0
    completed: int = 0
    skipped: int = 0  # the in-flight cap was reached at a tick: that association was not started
    elapsed_s: float = 0.0
    durations: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def churn(endpoints: Sequence[Endpoint], rate: float, seconds: float, *, max_in_flight: int = 200,
                timeout: float = PROBE_TIMEOUT_S, on_second: Callable[[int], None] | None = None) -> ChurnResult:
    """Start one association every 1/``rate`` s for ``seconds`` (alternating endpoints); each is released
    right after its A-ASSOCIATE-AC. ``on_second(n)`` is called once per elapsed second (for sampling)."""
    loop = asyncio.get_running_loop()
    result = ChurnResult()
    in_flight = asyncio.Semaphore(max_in_flight)
    start = loop.time()

    async def one(index: int) -> None:
        async with in_flight:
            began = loop.time()
            try:
                async with asyncio.timeout(timeout):
                    await _release(*await _open(endpoints[index % len(endpoints)]))
                result.completed += 1
                result.durations.append(loop.time() - began)
            except _FAILURES as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")

    async with asyncio.TaskGroup() as group:
        for index in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + index / rate - loop.time()))
            if on_second is not None and index % int(rate) == 0:
                on_second(index // int(rate))
            if in_flight.locked():
                result.skipped += 1
                continue
            result.attempted += 1
            group.create_task(one(index))
    result.elapsed_s = loop.time() - start
    return result
