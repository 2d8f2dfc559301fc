"""tunnel_link.session over the transport seam: two MuxSessions joined by an in-memory MessageTransport.

What is checked here is the stream object's contract (docs/protocol.md §6.3, §6.4): credit goes back only
when the application says bytes were consumed, and whatever a stream still holds when it ends goes back
to the connection then — so no way of ending a stream leaks connection credit. Also: a transport other
than a WebSocket needs nothing but the MessageTransport interface; a side out of stream ids reconnects
once idle; a subprotocol this side does not speak ends the session at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.support.memorylink import MemoryTransport, memory_pair
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.errors import UsageError
from tunnel_core.frames import OpenPayload
from tunnel_core.limits import KIB, MuxLimits
from tunnel_core.mux import Mux, Role, StreamIdsExhausted
from tunnel_link.errors import StreamResetError
from tunnel_link.session import MuxSession, TunnelStream
from tunnel_link.transport import MessageTransport, as_transport

GUARD = 10.0
LIMITS = MuxLimits(stream_window=256 * KIB, connection_window=512 * KIB)
CALLED = OpenPayload(TargetKind.CALLED_AE, "STORE", "CT1")


class Listener:
    def __init__(self, stream: TunnelStream, *, consume: bool) -> None:
        self.stream = stream
        self.consume = consume
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.writable = asyncio.Event()
        self.reset: ErrorCode | None = None

    def stream_data(self, data: bytes | memoryview) -> None:
        self.data += data
        if self.consume:
            self.stream.consumed(len(data))

    def stream_eof(self) -> None:
        self.eof.set()

    def stream_reset(self, code: ErrorCode) -> None:
        self.reset = code
        self.eof.set()

    def stream_writable(self) -> None:
        self.writable.set()


Handler = Callable[[TunnelStream], Awaitable[None]]


@contextlib.asynccontextmanager
async def sessions(on_stream: Handler, *, agent_mux: Mux | None = None,
                   relay_mux: Mux | None = None) -> AsyncIterator[tuple[MuxSession, MuxSession]]:
    a, r = memory_pair()
    agent = MuxSession(a, agent_mux or Mux(Role.AGENT, LIMITS), heartbeat_interval=30.0,
                       on_stream=_refuse, label="agent")
    relay = MuxSession(r, relay_mux or Mux(Role.RELAY, LIMITS), heartbeat_interval=30.0,
                       on_stream=on_stream, label="relay")
    async with asyncio.timeout(GUARD), asyncio.TaskGroup() as tasks:
        runs = [tasks.create_task(agent.run()), tasks.create_task(relay.run())]
        while agent._tasks is None or relay._tasks is None:
            await asyncio.sleep(0)
        try:
            yield agent, relay
        finally:
            await agent.close()
            await relay.close()
            await asyncio.gather(*runs)


async def _refuse(stream: TunnelStream) -> None:
    await stream.reset(ErrorCode.UNKNOWN_ROUTE)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_an_in_memory_transport_is_taken_as_it_is() -> None:
    a, _ = memory_pair()
    assert isinstance(a, MessageTransport)
    assert as_transport(a, client=True) is a


async def test_a_stream_delivers_returns_credit_when_consumed_and_half_closes() -> None:
    got: dict[str, Listener] = {}
    done = asyncio.Event()

    async def serve(stream: TunnelStream) -> None:
        listener = got["relay"] = Listener(stream, consume=True)
        stream.attach(listener)
        await listener.eof.wait()
        assert stream.send(b"pong") == 4
        assert stream.end()
        await done.wait()

    async with sessions(serve) as (agent, relay):
        stream = await agent.open_stream(CALLED)
        listener = Listener(stream, consume=True)
        stream.attach(listener)
        payload = bytes(range(256)) * 1024  # the whole initial window and more: it needs returned credit
        view = memoryview(payload)
        while view:
            listener.writable.clear()
            view = view[stream.send(view):]
            if view:
                await listener.writable.wait()
        assert stream.end()
        await listener.eof.wait()
        assert bytes(got["relay"].data) == payload and bytes(listener.data) == b"pong"
        assert listener.reset is None
        done.set()
        await settle()
        # everything consumed: nothing held on either side, and the bulk direction's credit is back
        assert relay.mux.bytes_held == agent.mux.bytes_held == 0
        assert relay.mux.connection_recv_window == LIMITS.connection_window


@pytest.mark.parametrize("how", ["peer-reset", "local-reset", "release"])
async def test_bytes_held_when_a_stream_ends_go_back_to_the_connection(how: str) -> None:
    """Regression: bytes delivered to the splice but not yet consumed (its socket congested) when the
    stream was reset used to keep their connection credit forever."""
    arrived, end_it = asyncio.Event(), asyncio.Event()

    async def serve(stream: TunnelStream) -> None:
        listener = Listener(stream, consume=False)  # a destination that never takes the bytes
        stream.attach(listener)
        while len(listener.data) < 100 * KIB:
            await asyncio.sleep(0)
        arrived.set()
        await end_it.wait()
        if how == "local-reset":
            stream.reset_nowait(ErrorCode.ABORTED)
            assert stream.consumed(100 * KIB) is None  # after the end: a no-op, not an error
        elif how == "release":
            await stream.release()
        await listener.eof.wait()  # reset (by either side, or ABORTED when the tunnel closes)

    async with sessions(serve) as (agent, relay):
        stream = await agent.open_stream(CALLED)
        listener = Listener(stream, consume=True)
        stream.attach(listener)
        assert stream.send(bytes(100 * KIB)) == 100 * KIB
        await arrived.wait()
        assert relay.mux.bytes_held == 100 * KIB
        if how == "peer-reset":
            stream.reset_nowait(ErrorCode.ABORTED)
        end_it.set()
        await settle()
        assert relay.mux.bytes_held == 0
        assert relay.active_streams == 0
        if how != "peer-reset":
            await listener.eof.wait()
            assert listener.reset is (ErrorCode.ABORTED if how == "local-reset" else ErrorCode.INTERNAL_ERROR)


async def test_bytes_read_while_sniffing_then_refused_go_back_to_the_connection() -> None:
    """Regression: the bytes a handler read() and then refused (RESET) were never given back."""
    refused = asyncio.Event()

    async def serve(stream: TunnelStream) -> None:
        first = await stream.read()
        assert len(first) == 64 * KIB
        with pytest.raises(UsageError):
            stream.consumed(64 * KIB + 1)
        await stream.reset(ErrorCode.PROTOCOL_ERROR)
        refused.set()

    async with sessions(serve) as (agent, relay):
        stream = await agent.open_stream(CALLED)
        listener = Listener(stream, consume=True)
        stream.attach(listener)
        stream.send(bytes(64 * KIB))
        await refused.wait()
        await listener.eof.wait()
        assert listener.reset is ErrorCode.PROTOCOL_ERROR
        await settle()
        assert relay.mux.bytes_held == 0
        with pytest.raises(StreamResetError):
            await stream.read()


async def test_a_congested_transport_pauses_the_stream_until_it_drains() -> None:
    async def serve(stream: TunnelStream) -> None:
        listener = Listener(stream, consume=True)
        stream.attach(listener)
        await listener.eof.wait()

    async with sessions(serve) as (agent, relay):
        stream = await agent.open_stream(CALLED)
        listener = Listener(stream, consume=True)
        stream.attach(listener)
        transport = agent.transport
        assert isinstance(transport, MemoryTransport)
        transport.set_congested(True)
        assert stream.send(b"x" * 10) == 10  # taken, and written: congestion is advice to the source
        assert not stream.writable and not listener.writable.is_set()
        await settle()
        assert not listener.writable.is_set()
        transport.set_congested(False)
        await asyncio.wait_for(listener.writable.wait(), 1.0)
        assert stream.writable


async def test_a_side_out_of_stream_ids_goes_away_and_ends_the_connection_once_idle() -> None:
    async def serve(stream: TunnelStream) -> None:
        listener = Listener(stream, consume=True)
        stream.attach(listener)
        await listener.eof.wait()

    async with sessions(serve, agent_mux=Mux(Role.AGENT, LIMITS, max_stream_id=4)) as (agent, relay):
        first = await agent.open_stream(CALLED)
        second = await agent.open_stream(CALLED)
        assert (first.id, second.id) == (1, 3)
        with pytest.raises(StreamIdsExhausted):
            await agent.open_stream(CALLED)
        await settle()
        assert agent.draining and relay.mux.goaway_received and not agent.closing  # streams still open
        await first.release()
        await settle()
        assert not agent.closing
        await second.release()
        await asyncio.wait_for(agent.ended.wait(), 2.0)
        assert agent.close_reason == "stream ids exhausted: reconnecting for fresh ones"


async def test_an_unknown_subprotocol_ends_the_session_before_any_frame() -> None:
    class Selected(MemoryTransport):
        protocol = "dicom-tunnel.9"

    a, b = Selected(), MemoryTransport()
    a.peer, b.peer = b, a
    session = MuxSession(a, Mux(Role.AGENT), heartbeat_interval=30.0, on_stream=_refuse, label="agent")
    assert session.protocol_version is None
    async with asyncio.timeout(GUARD):
        await session.run()
    assert "dicom-tunnel.9" in session.close_reason
    assert a.sent == 0  # not even the opening WINDOW


async def test_go_away_lets_the_streams_in_flight_finish_then_closes_when_idle() -> None:
    """A drain's first word (``MuxSession.go_away``): the peer opens nothing new, what is open carries on,
    and the connection closes once it is idle; a peer relay's link instead stays up, saying it drains."""
    done = asyncio.Event()

    async def serve(stream: TunnelStream) -> None:
        listener = Listener(stream, consume=True)
        stream.attach(listener)
        await listener.eof.wait()
        stream.send(b"answer")
        stream.end()
        done.set()

    async with sessions(serve) as (agent, relay):
        stream = await agent.open_stream(CALLED)
        stream.send(b"question")
        await settle()
        relay.go_away(ErrorCode.GOING_AWAY, "relay draining")
        await settle()
        assert agent.goaway_code is ErrorCode.GOING_AWAY and agent.draining and not relay.closing
        stream.end()
        assert await stream.read() == b"answer"  # the stream in flight finished after the GOAWAY
        await done.wait()
        await asyncio.wait_for(relay.ended.wait(), GUARD)  # idle: closed by itself
        assert relay.close_reason == "relay draining"

    async with sessions(_refuse) as (agent, relay):
        relay.go_away(ErrorCode.GOING_AWAY, "relay draining", close_when_idle=False)
        await settle()
        assert agent.draining and not relay.closing and not relay.ended.is_set()
