"""tunnel_link.hop: one association carried from a peer relay's stream to a site's stream, in memory.

Three MuxSessions over in-memory transports, as in a fleet: the dialing relay's (``caller``), the relay
holding the tunnel (which serves the peer connection and the site's tunnel), and the site's agent. What is
checked: bytes arrive intact both ways and both ends finish; a reset on either side reaches the other, and
a refusal becomes the RESET the first relay turns into the same A-ASSOCIATE-RJ; a receiver that stops
reading stalls the sender within the two streams' windows (no buffer grows at the hop); and every byte of
credit is back on both connections afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.support.memorylink import memory_pair
from tests.support.rawdicom import associate_rq
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.dicom import AssociateRequest, RejectReason
from tunnel_core.frames import OpenPayload
from tunnel_core.limits import KIB, MuxLimits
from tunnel_core.mux import Mux, Role
from tunnel_core.routing import reject_for_reset
from tunnel_link.associations import Association, AssociationTracker, IngressLimits
from tunnel_link.errors import StreamResetError
from tunnel_link.hop import serve_hop
from tunnel_link.session import MuxSession, TunnelStream

GUARD = 10.0
WINDOW = 256 * KIB
LIMITS = MuxLimits(stream_window=WINDOW, connection_window=4 * WINDOW)
RQ = associate_rq("SM_PACS", "CLOUDAI")
HOP = OpenPayload(TargetKind.LISTENER, "cloud", "CLOUDAI")

Site = Callable[[TunnelStream], Awaitable[None]]


class Fleet:
    """The four session ends (caller, holder's peer side, holder's tunnel side, agent) and the hop's tracker."""

    def __init__(self, sessions: tuple[MuxSession, ...], tracker: AssociationTracker) -> None:
        self.sessions = sessions
        self.caller = sessions[0]
        self.tracker = tracker

    async def finished(self) -> None:
        while self.tracker.active:
            await asyncio.sleep(0.001)
        for _ in range(50):  # the last acknowledgements are a few event-loop turns behind the outcome
            await asyncio.sleep(0)

    def credit_back(self) -> bool:
        """Every byte any side received was consumed and nothing is held: the peer's whole window is back,
        granted or due in the next WINDOW."""
        return all(s.mux.bytes_held == 0
                   and s.mux.connection_recv_window + s.mux.connection_unreturned == LIMITS.connection_window
                   for s in self.sessions)


@contextlib.asynccontextmanager
async def fleet(site: Site, decide_reject: RejectReason | None = None) -> AsyncIterator[Fleet]:
    tracker = AssociationTracker("t")
    c, h = memory_pair()
    hs, s = memory_pair()
    holder_to_site = MuxSession(hs, Mux(Role.RELAY, LIMITS), heartbeat_interval=30.0, on_stream=_refuse,
                                label="site-tunnel")
    agent = MuxSession(s, Mux(Role.AGENT, LIMITS), heartbeat_interval=30.0, on_stream=site, label="agent")

    async def decide(req: AssociateRequest, assoc: Association) -> TunnelStream | RejectReason:
        if decide_reject is not None:
            return decide_reject
        return await holder_to_site.open_stream(OpenPayload(TargetKind.ROUTE, "pacs", req.calling_ae))

    async def on_hop(stream: TunnelStream) -> None:
        await serve_hop(stream, limits=IngressLimits(), decide=decide, tracker=tracker, direction="peer-to-site")

    caller = MuxSession(c, Mux(Role.AGENT, LIMITS), heartbeat_interval=30.0, on_stream=_refuse, label="caller")
    holder = MuxSession(h, Mux(Role.RELAY, LIMITS), heartbeat_interval=30.0, on_stream=on_hop, label="peer")
    sessions = (caller, holder, holder_to_site, agent)
    async with asyncio.timeout(GUARD), asyncio.TaskGroup() as tasks:
        runs = [tasks.create_task(session.run()) for session in sessions]
        for session in sessions:
            await session.up.wait()
        try:
            yield Fleet(sessions, tracker)
        finally:
            for session in sessions:
                await session.close()
            await asyncio.gather(*runs)


async def _refuse(stream: TunnelStream) -> None:
    await stream.reset(ErrorCode.PROTOCOL_ERROR)


async def _read_all(stream: TunnelStream) -> bytes:
    data = bytearray()
    while chunk := await stream.read():
        data += chunk
        stream.consumed(len(chunk))
    return bytes(data)


async def _send_all(stream: TunnelStream, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = stream.send(view)
        view = view[n:]
        if view:
            await asyncio.sleep(0.001)


async def test_bytes_cross_the_hop_intact_both_ways_and_both_ends_finish() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB: four stream windows, so credit must come back on the way
    seen: dict[str, bytes] = {}

    async def site(stream: TunnelStream) -> None:
        seen["from caller"] = await _read_all(stream)
        await _send_all(stream, payload[::-1])
        stream.end()

    async with fleet(site) as f:
        stream = await f.caller.open_stream(HOP)
        await _send_all(stream, RQ + payload)
        stream.end()
        back = await _read_all(stream)
        await f.finished()
        assert f.credit_back()
    assert seen["from caller"] == RQ + payload
    assert back == payload[::-1]
    assert f.tracker.outcomes == {"completed": 1}
    assert f.tracker.totals == {("peer-to-site", "completed"): 1}


@pytest.mark.parametrize("code", [ErrorCode.UNKNOWN_ROUTE, ErrorCode.CALLING_AE_REFUSED, ErrorCode.ABORTED])
async def test_a_reset_from_the_site_reaches_the_caller_with_its_code(code: ErrorCode) -> None:
    async def site(stream: TunnelStream) -> None:
        await stream.read()
        await stream.reset(code)

    async with fleet(site) as f:
        stream = await f.caller.open_stream(HOP)
        stream.send(RQ)
        with pytest.raises(StreamResetError) as info:
            await _read_all(stream)
        assert info.value.code is code


@pytest.mark.parametrize("reason", list(RejectReason))
async def test_a_refusal_at_the_holder_becomes_the_same_reject_for_the_caller(reason: RejectReason) -> None:
    async def site(stream: TunnelStream) -> None:  # never reached
        raise AssertionError("the hop was refused")

    async with fleet(site, decide_reject=reason) as f:
        stream = await f.caller.open_stream(HOP)
        stream.send(RQ)
        with pytest.raises(StreamResetError) as info:
            await _read_all(stream)
        assert reject_for_reset(info.value.code) is reason


async def test_a_site_that_stops_reading_stalls_the_caller_within_the_windows() -> None:
    release = asyncio.Event()

    async def site(stream: TunnelStream) -> None:  # reads nothing until told: credit stops at the site
        await release.wait()
        await _read_all(stream)
        stream.end()

    async with fleet(site) as f:
        stream = await f.caller.open_stream(HOP)
        sent = stream.send(RQ)
        for _ in range(200):  # bounded: 200 attempts, each a few event-loop turns
            sent += stream.send(b"x" * 32 * KIB)
            await asyncio.sleep(0.001)
        # What left the caller sits in at most the two streams' windows: the site's and the hop's.
        assert sent <= 2 * WINDOW + len(RQ)
        assert stream.send(b"x") == 0
        release.set()
        stream.end()
        await _read_all(stream)
        await f.finished()
        assert f.credit_back()
