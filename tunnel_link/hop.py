"""Carrying one association from one tunnel stream to another: the relay-to-relay hop of a fleet.

A cloud caller that lands on a relay without the site's tunnel is carried to a relay that holds it over
a peer connection (``relay.peering``): the first relay opens a stream to the second, which reads the
A-ASSOCIATE-RQ off that stream (``serve_hop``), routes it itself (``decide``: its own tables, its own
tunnels; never the first relay's word), opens a stream to the site's agent and bridges the two
(:class:`Bridge`). A refusal is the RESET the first relay turns into the caller's A-ASSOCIATE-RJ
(``tunnel_core.routing.reset_for_reject``); a reset on either stream later resets the other, which
becomes the caller's A-ABORT.

:class:`Bridge` copies from callbacks, like ``tunnel_link.splice``, with the same credit contract
(docs/protocol.md §6.3): bytes from one stream are acknowledged once the other stream took them and its
tunnel's send buffer has room; what the other stream's credit does not take waits, bounded by the
window the first stream's sender has.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tunnel_core.codes import ErrorCode
from tunnel_core.dicom import AssociateRequest, RejectReason
from tunnel_core.routing import reset_for_reject
from tunnel_link.associations import Association, AssociationTracker, IngressLimits, sniff_stream
from tunnel_link.errors import StreamResetError
from tunnel_link.session import TunnelStream

__all__ = ["Bridge", "HopDecide", "serve_hop"]

HopDecide = Callable[[AssociateRequest, Association], Awaitable[TunnelStream | RejectReason]]


class _Direction:
    """One way through the bridge: bytes arriving on ``src`` are sent on ``dst``."""

    def __init__(self, bridge: Bridge, src: TunnelStream, dst: TunnelStream) -> None:
        self.bridge = bridge
        self.src = src
        self.dst = dst
        self.bytes = 0
        self._pending = b""  # taken from src, not yet by dst (its credit ran out)
        self._owed = 0  # taken by dst, not yet acknowledged to src (dst's tunnel is congested)
        self._eof = False  # src ended; FIN on dst once _pending is out
        self.finished = False  # FIN sent on dst

    def data(self, data: bytes | memoryview) -> None:
        self.bytes += len(data)
        if self._pending:
            self._pending += data
        else:
            self._push(data)

    def _push(self, data: bytes | memoryview) -> None:
        n = self.dst.send(data)
        if n < len(data):
            self._pending = bytes(memoryview(data)[n:])
        self._acknowledge(n)

    def _acknowledge(self, n: int) -> None:
        self._owed += n
        if self._owed and self.dst.writable:
            owed, self._owed = self._owed, 0
            self.src.consumed(owed)

    def writable(self) -> None:
        """``dst`` has credit or room again."""
        if self._pending:
            data, self._pending = self._pending, b""
            self._push(data)
        else:
            self._acknowledge(0)
        if self._eof and not self._pending:
            self._fin()

    def eof(self) -> None:
        self._eof = True
        if not self._pending:
            self._fin()

    def _fin(self) -> None:
        if not self.finished:
            self.finished = True
            self.dst.end()
            self.bridge.maybe_complete()


class _Listener:
    """The events of one stream: its data and end go one way, its credit serves the other."""

    def __init__(self, bridge: Bridge, out: _Direction, into: _Direction) -> None:
        self.bridge = bridge
        self.out = out  # bytes arriving on this stream
        self.into = into  # bytes sent on this stream

    def stream_data(self, data: bytes | memoryview) -> None:
        if self.bridge.done:
            self.out.src.consumed(len(data))  # dropped
            return
        self.out.data(data)

    def stream_eof(self) -> None:
        if not self.bridge.done:
            self.out.eof()

    def stream_reset(self, code: ErrorCode) -> None:
        if not self.bridge.done:
            self.out.dst.reset_nowait(code)
            self.bridge.finish(f"reset:{code.name.lower()}")

    def stream_writable(self) -> None:
        if not self.bridge.done:
            self.into.writable()


class Bridge:
    """Create with the stream that brought the association (``near``) and the one it goes on to
    (``far``), then ``await run(first, first_credit)``; returns the outcome for the association's log."""

    def __init__(self, near: TunnelStream, far: TunnelStream) -> None:
        self.near = near
        self.far = far
        self.onward = _Direction(self, near, far)
        self.back = _Direction(self, far, near)
        self._done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def done(self) -> bool:
        return self._done.done()

    async def run(self, first: bytes, first_credit: int) -> str:
        """``first``: the A-ASSOCIATE-RQ (and what followed it) read off ``near``, ``first_credit`` bytes
        of it still held there; they go to ``far`` before anything else."""
        self.onward.bytes = first_credit
        n = self.far.send(first)
        if n < len(first):
            self.onward._pending = first[n:]
        self.onward._acknowledge(min(n, first_credit))
        self.far.attach(_Listener(self, self.back, self.onward))
        self.near.attach(_Listener(self, self.onward, self.back))
        return await self._done

    def maybe_complete(self) -> None:
        if self.onward.finished and self.back.finished:
            self.finish("completed")

    def finish(self, outcome: str) -> None:
        if not self._done.done():
            self._done.set_result(outcome)


async def serve_hop(stream: TunnelStream, *, limits: IngressLimits, decide: HopDecide,
                    tracker: AssociationTracker, direction: str) -> None:
    """Handle one stream a peer relay opened: read the request, let ``decide`` open the stream it goes on
    to (or reject it), and bridge the two until both ends finish. Never raises for peer faults."""
    sniffed = await sniff_stream(stream, limits, tracker, direction)
    if sniffed is None:
        return
    req, rest, consumed = sniffed
    assoc = tracker.start(direction, req)
    assoc.stream = stream.id
    outcome = "internal-error"
    try:
        decision = await decide(req, assoc)
        if isinstance(decision, RejectReason):
            outcome = f"rejected:{decision.name.lower()}"
            await stream.reset(reset_for_reject(decision))
            return
        bridge = Bridge(stream, decision)
        try:
            outcome = await bridge.run(req.pdu + rest, consumed)
        finally:
            assoc.bytes_from_caller, assoc.bytes_to_caller = bridge.onward.bytes, bridge.back.bytes
            await decision.release()
    except StreamResetError as exc:
        outcome = f"reset:{exc.code.name.lower()}"
    finally:
        tracker.finish(assoc, outcome)
