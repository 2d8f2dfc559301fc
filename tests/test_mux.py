"""tunnel_core.mux: handshake, streams, flow control, faults — two Mux instances wired back to back.

Where a test needs a misbehaving peer it writes raw frames with ``tunnel_core.frames.encode``.
"""

from __future__ import annotations

import pytest

from tests import protocol_doc
from tunnel_core import frames as fr
from tunnel_core import mux as m
from tunnel_core.codes import ErrorCode, FrameFlag, FrameType, TargetKind
from tunnel_core.dicom import AssociateSniffer
from tunnel_core.errors import FlowControlError, ProtocolError, UsageError
from tunnel_core.limits import INITIAL_WINDOW, KIB, MAX_FRAME_PAYLOAD, MAX_REPORT, MIB, MuxLimits

ROUTE = fr.OpenPayload(TargetKind.ROUTE, "pacs", "CLOUD")
CALLED = fr.OpenPayload(TargetKind.CALLED_AE, "STORE", "CT1")
# The smallest legal windows: everything fits in a few hundred KiB, so the tests stay fast.
SMALL = MuxLimits(max_frame_payload=64 * KIB, stream_window=256 * KIB, connection_window=1 * MIB)


def frames_in(wire: bytes) -> list[fr.Frame]:
    return fr.FrameParser(MAX_FRAME_PAYLOAD).feed(wire)


def fresh_pair(agent_limits: MuxLimits | None = None,
               relay_limits: MuxLimits | None = None) -> tuple[m.Mux, m.Mux]:
    """An agent and a relay that have exchanged their opening WINDOW frames."""
    agent, relay = m.Mux(m.Role.AGENT, agent_limits), m.Mux(m.Role.RELAY, relay_limits)
    assert relay.receive_data(agent.data_to_send()) in ([], [m.WindowUpdated(0)])
    assert agent.receive_data(relay.data_to_send()) in ([], [m.WindowUpdated(0)])
    return agent, relay


def pump(a: m.Mux, b: m.Mux, rounds: int = 10) -> tuple[list[m.Event], list[m.Event]]:
    """Carry bytes both ways until neither side has anything to send; return (a's events, b's events)."""
    a_events: list[m.Event] = []
    b_events: list[m.Event] = []
    for _ in range(rounds):
        if not (a.has_data_to_send() or b.has_data_to_send()):
            return a_events, b_events
        b_events += b.receive_data(a.data_to_send())
        a_events += a.receive_data(b.data_to_send())
    raise AssertionError("the two sides kept talking")


def received(events: list[m.Event], stream_id: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, m.DataReceived) and e.stream_id == stream_id)


def without_window_updates(events: list[m.Event]) -> list[m.Event]:
    return [e for e in events if not isinstance(e, m.WindowUpdated)]


def acknowledge_all(mux: m.Mux, events: list[m.Event]) -> None:
    for e in events:
        if isinstance(e, m.DataReceived):
            mux.acknowledge(e.stream_id, len(e.data))


def raw(ftype: FrameType, sid: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return fr.encode(ftype, sid, payload, flags)


# --- handshake ------------------------------------------------------------------------------------------


def test_new_mux_announces_its_connection_window_first() -> None:
    agent = m.Mux(m.Role.AGENT)
    # WINDOW on stream 0 raising the 256 KiB protocol initial window to the 64 MiB default.
    assert agent.data_to_send() == bytes.fromhex("01 02 00 00 00000000 00000004 03fc0000")
    assert agent.data_to_send() == b""
    assert not agent.has_data_to_send()


def test_minimum_windows_send_nothing_at_start() -> None:
    tight = MuxLimits(stream_window=INITIAL_WINDOW, connection_window=INITIAL_WINDOW)
    agent = m.Mux(m.Role.AGENT, tight)
    assert agent.data_to_send() == b""
    sid = agent.open_stream(ROUTE)
    assert [f.type for f in frames_in(agent.data_to_send())] == [FrameType.OPEN]  # no stream WINDOW
    assert sid == 1


def test_handshake_ends_with_the_configured_windows() -> None:
    agent_limits = MuxLimits(stream_window=1 * MIB, connection_window=8 * MIB)
    relay_limits = MuxLimits(stream_window=2 * MIB, connection_window=16 * MIB)
    agent, relay = m.Mux(m.Role.AGENT, agent_limits), m.Mux(m.Role.RELAY, relay_limits)
    assert agent.connection_send_window == relay.connection_send_window == INITIAL_WINDOW
    pump(agent, relay)
    # Each side may send what the *other* side configured for receiving.
    assert agent.connection_send_window == 16 * MIB
    assert relay.connection_send_window == 8 * MIB
    assert agent.connection_recv_window == 8 * MIB
    assert relay.connection_recv_window == 16 * MIB
    sid = agent.open_stream(ROUTE)
    pump(agent, relay)
    # The configured stream window above INITIAL_WINDOW is owed, not sent, until the peer has used half
    # the initial window: a short request/response exchange never costs a WINDOW frame.
    assert agent.send_window(sid) == relay.send_window(sid) == INITIAL_WINDOW
    used = INITIAL_WINDOW // 2 + 1
    for sender, receiver in ((agent, relay), (relay, agent)):
        assert sender.send_data(sid, bytes(used)) == used
        _, events = pump(sender, receiver)
        receiver.acknowledge(sid, len(received(events, sid)))
        pump(receiver, sender)
    assert agent.send_window(sid) == 2 * MIB
    assert relay.send_window(sid) == 1 * MIB


def test_a_short_exchange_sends_no_stream_window() -> None:
    agent, relay = fresh_pair()
    sid = agent.open_stream(ROUTE)
    agent.send_data(sid, bytes(300))  # an A-ASSOCIATE-RQ
    _, events = pump(agent, relay)
    assert len(received(events, sid)) == 300
    relay.acknowledge(sid, 300)
    assert [f.type for f in frames_in(relay.data_to_send())] == []


def test_stream_ids_by_parity_and_strictly_increasing() -> None:
    agent, relay = fresh_pair()
    assert [agent.open_stream(CALLED) for _ in range(3)] == [1, 3, 5]
    assert [relay.open_stream(ROUTE) for _ in range(3)] == [2, 4, 6]
    pump(agent, relay)
    assert sorted(agent.stream_ids()) == [1, 2, 3, 4, 5, 6]
    assert sorted(relay.stream_ids()) == [1, 2, 3, 4, 5, 6]


def test_open_is_announced_with_its_payload() -> None:
    agent, relay = fresh_pair()
    sid = relay.open_stream(ROUTE)
    agent_events, _ = pump(agent, relay)
    assert without_window_updates(agent_events) == [m.StreamOpened(sid, ROUTE)]
    assert agent.stream_state(sid) is relay.stream_state(sid) is m.StreamState.OPEN


def test_open_and_data_within_the_initial_window_without_waiting() -> None:
    """0-RTT: OPEN and the first INITIAL_WINDOW bytes leave together, before any reply."""
    agent, relay = m.Mux(m.Role.AGENT), m.Mux(m.Role.RELAY)  # not even the connection WINDOWs exchanged
    agent.data_to_send()
    sid = agent.open_stream(CALLED)
    payload = bytes(range(256)) * (INITIAL_WINDOW // 256)
    assert agent.send_data(sid, payload) == INITIAL_WINDOW
    assert agent.send_data(sid, b"x") == 0  # the initial window is the limit until the peer answers
    wire = agent.data_to_send()
    kinds = [f.type for f in frames_in(wire)]
    assert kinds[0] is FrameType.OPEN and set(kinds[1:]) == {FrameType.DATA}
    events = relay.receive_data(wire)
    assert events[0] == m.StreamOpened(sid, CALLED)
    assert received(events, sid) == payload
    assert not any(isinstance(e, m.StreamReset) for e in events)


def test_data_is_split_at_max_frame_payload() -> None:
    agent, relay = fresh_pair(SMALL, SMALL)
    sid = agent.open_stream(CALLED)
    agent.data_to_send()
    assert agent.send_data(sid, bytes(150 * KIB)) == 150 * KIB
    sizes = [len(f.payload) for f in frames_in(agent.data_to_send())]
    assert sizes == [64 * KIB, 64 * KIB, 22 * KIB]


def test_data_to_send_in_bounded_messages_of_whole_frames() -> None:
    agent, relay = fresh_pair(SMALL, SMALL)
    sid = agent.open_stream(CALLED)
    agent.send_data(sid, bytes(200 * KIB))  # OPEN, then DATA frames of 64 KiB + 12 bytes of header
    everything = []
    messages = []
    while agent.has_data_to_send():
        message = agent.data_to_send(100 * KIB)
        messages.append(message)
        parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
        frames = parser.feed(message)
        assert frames and parser.buffered == 0  # whole frames only, at least one
        everything += frames
        assert len(messages) < 10
    assert all(len(message) <= 100 * KIB for message in messages)
    assert [f.type for f in everything] == [FrameType.OPEN] + [FrameType.DATA] * 4
    assert b"".join(f.payload for f in everything[1:]) == bytes(200 * KIB)
    # a frame bigger than the bound still goes out, alone
    agent.ping(bytes(8))
    assert len(agent.data_to_send(1)) == fr.HEADER_SIZE + 8


# --- flow control ---------------------------------------------------------------------------------------


def test_sender_is_blocked_at_the_stream_window() -> None:
    agent, relay = fresh_pair(SMALL, SMALL)
    sid = agent.open_stream(CALLED)
    pump(agent, relay)
    assert agent.send_data(sid, bytes(300 * KIB)) == 256 * KIB
    assert agent.send_window(sid) == 0
    assert agent.send_data(sid, b"more") == 0
    assert {f.type for f in frames_in(agent.data_to_send())} == {FrameType.DATA}


def test_credit_is_not_returned_on_arrival() -> None:
    agent, relay = fresh_pair(SMALL, SMALL)
    sid = agent.open_stream(CALLED)
    pump(agent, relay)
    agent.send_data(sid, bytes(256 * KIB))
    events = relay.receive_data(agent.data_to_send())
    assert len(received(events, sid)) == 256 * KIB
    assert relay.data_to_send() == b""  # no WINDOW until the adapter acknowledges
    assert agent.send_window(sid) == 0


def test_acknowledge_returns_stream_credit_with_half_window_hysteresis() -> None:
    agent, relay = fresh_pair(SMALL, SMALL)
    sid = agent.open_stream(CALLED)
    pump(agent, relay)
    agent.send_data(sid, bytes(256 * KIB))
    relay.receive_data(agent.data_to_send())
    relay.acknowledge(sid, 128 * KIB - 1)
    assert relay.data_to_send() == b""  # below half the stream window: nothing yet
    relay.acknowledge(sid, 1)
    # exactly half: one WINDOW for the whole 128 KiB
    assert relay.data_to_send() == bytes.fromhex("01 02 00 00 00000001 00000004 00020000")
    agent.receive_data(bytes.fromhex("01 02 00 00 00000001 00000004 00020000"))
    assert agent.send_window(sid) == 128 * KIB


def test_acknowledge_returns_connection_credit_at_half_the_connection_window() -> None:
    limits = MuxLimits(stream_window=256 * KIB, connection_window=512 * KIB)
    agent, relay = fresh_pair(limits, limits)
    s1, s3 = agent.open_stream(CALLED), agent.open_stream(CALLED)
    pump(agent, relay)

    def connection_windows() -> list[int]:
        return [fr.decode_window(f.payload) for f in frames_in(relay.data_to_send()) if f.stream_id == 0]

    agent.send_data(s1, bytes(200 * KIB))
    agent.send_data(s3, bytes(56 * KIB - 1))
    relay.receive_data(agent.data_to_send())
    relay.acknowledge(s1, 200 * KIB)
    relay.acknowledge(s3, 56 * KIB - 1)
    assert connection_windows() == []  # one byte short of half the connection window
    agent.send_data(s3, b"!")
    relay.receive_data(agent.data_to_send())
    relay.acknowledge(s3, 1)
    assert connection_windows() == [256 * KIB]  # all of it in one WINDOW


def test_connection_window_is_shared_across_streams() -> None:
    limits = MuxLimits(stream_window=256 * KIB, connection_window=256 * KIB)
    agent, relay = fresh_pair(limits, limits)
    s1, s3 = agent.open_stream(CALLED), agent.open_stream(CALLED)
    pump(agent, relay)
    assert agent.send_data(s1, bytes(200 * KIB)) == 200 * KIB
    assert agent.send_window(s3) == 56 * KIB
    assert agent.send_data(s3, bytes(200 * KIB)) == 56 * KIB
    assert agent.connection_send_window == 0
    assert agent.send_data(s1, b"x") == 0


def test_receiver_that_stops_reading_bounds_one_stream() -> None:
    """The receiver never acknowledges: the sender stalls after the initial window (the configured
    window above it is only granted as the receiver consumes)."""
    agent, relay = fresh_pair()  # default limits: 4 MiB per stream
    sid = agent.open_stream(CALLED)
    pump(agent, relay)
    chunk = bytes(1 * MIB + 17)
    taken = delivered = 0
    for _ in range(20):
        taken += agent.send_data(sid, chunk)
        events, _ = pump(relay, agent)
        delivered += len(received(events, sid))
        assert delivered <= taken <= relay.limits.stream_window
    assert taken == delivered == INITIAL_WINDOW
    assert agent.send_data(sid, chunk) == 0


def test_receiver_that_stops_reading_bounds_the_connection() -> None:
    agent, relay = fresh_pair(SMALL, SMALL)
    streams = [agent.open_stream(CALLED) for _ in range(8)]
    pump(agent, relay)
    taken = delivered = 0
    for _ in range(5):
        for sid in streams:
            taken += agent.send_data(sid, bytes(100 * KIB))
        events, _ = pump(relay, agent)
        delivered += sum(len(e.data) for e in events if isinstance(e, m.DataReceived))
        assert delivered <= taken <= SMALL.connection_window
    assert taken == delivered == SMALL.connection_window
    assert all(agent.send_data(sid, b"x") == 0 for sid in streams)


def test_steady_transfer_keeps_flowing_when_the_receiver_acknowledges() -> None:
    agent, relay = fresh_pair(SMALL, SMALL)
    sid = agent.open_stream(CALLED)
    pump(agent, relay)
    total = 0
    for _ in range(40):
        total += agent.send_data(sid, bytes(100 * KIB))
        events, _ = pump(relay, agent)
        acknowledge_all(relay, events)
        pump(relay, agent)
    assert total == 40 * 100 * KIB  # never blocked, and well past the connection window


def test_live_stream_keeps_flowing_while_other_receivers_stall() -> None:
    """Regression: with credit returned only at half the connection window, stalled streams holding more
    than half of it (receivers that stopped reading) kept the live streams' acknowledgements below the
    threshold, and every stream on the tunnel stopped — a C-ECHO waiting forever behind slow C-STOREs.
    """
    agent, relay = fresh_pair(SMALL, SMALL)  # 256 KiB per stream, 1 MiB per connection
    stalled = [agent.open_stream(CALLED) for _ in range(3)]
    live = agent.open_stream(CALLED)
    pump(agent, relay)
    for sid in stalled:
        assert agent.send_data(sid, bytes(256 * KIB)) == 256 * KIB  # 768 KiB held, never acknowledged
    pump(agent, relay)
    moved = 0
    for _ in range(20):
        moved += agent.send_data(live, bytes(64 * KIB))
        events, _ = pump(relay, agent)
        for e in events:
            if isinstance(e, m.DataReceived) and e.stream_id == live:
                relay.acknowledge(live, len(e.data))
        pump(relay, agent)
    assert moved >= 1 * MIB


def test_credit_for_a_stream_that_half_closed_is_not_returned() -> None:
    agent, relay = fresh_pair(SMALL, SMALL)
    sid = agent.open_stream(CALLED)
    pump(agent, relay)
    agent.send_data(sid, bytes(200 * KIB))
    agent.end_stream(sid)
    events, _ = pump(relay, agent)
    assert events[-1] == m.StreamEnded(sid)
    relay.acknowledge(sid, 200 * KIB)
    assert relay.data_to_send() == b""  # no stream WINDOW (the peer sends no more) and < half conn window


def test_acknowledge_more_than_delivered_is_a_usage_error() -> None:
    agent, relay = fresh_pair(SMALL, SMALL)
    sid = agent.open_stream(CALLED)
    agent.send_data(sid, b"abc")
    pump(agent, relay)
    with pytest.raises(UsageError):
        relay.acknowledge(sid, 4)
    with pytest.raises(UsageError):
        relay.acknowledge(sid, -1)
    relay.acknowledge(sid, 3)


def test_failed_acknowledge_changes_nothing() -> None:
    """Regression: an over-acknowledgement on one stream must raise before it consumes other streams'
    outstanding bytes from the connection counters."""
    agent, relay = fresh_pair(SMALL, SMALL)
    s1, s3 = agent.open_stream(CALLED), agent.open_stream(CALLED)
    agent.send_data(s1, b"abc")
    agent.send_data(s3, b"defgh")
    pump(agent, relay)
    with pytest.raises(UsageError):
        relay.acknowledge(s1, 5)  # s1 has only 3 outstanding, the connection 8
    relay.acknowledge(s3, 5)
    relay.acknowledge(s1, 3)  # must still be possible: the failed call consumed nothing


# --- half-close -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["opener", "acceptor"])
def test_half_close_in_either_order(first: str) -> None:
    agent, relay = fresh_pair()
    sid = relay.open_stream(ROUTE)
    pump(agent, relay)
    one, other = (relay, agent) if first == "opener" else (agent, relay)
    one.end_stream(sid)
    assert one.stream_state(sid) is m.StreamState.HALF_CLOSED_LOCAL
    one_events, other_events = pump(one, other)
    assert other_events == [m.StreamEnded(sid)]
    assert other.stream_state(sid) is m.StreamState.HALF_CLOSED_REMOTE
    # the other direction still carries data
    assert other.send_data(sid, b"still talking") == 13
    one_events, _ = pump(one, other)
    assert one_events == [m.DataReceived(sid, b"still talking")]
    with pytest.raises(m.StreamStateError):
        one.send_data(sid, b"after my FIN")
    other.end_stream(sid)
    one_events, _ = pump(one, other)
    assert one_events == [m.StreamEnded(sid)]
    for side in (one, other):
        assert side.stream_state(sid) is m.StreamState.CLOSED
        assert side.stream_count == 0


def test_fin_crossing_on_the_wire() -> None:
    agent, relay = fresh_pair()
    sid = agent.open_stream(CALLED)
    pump(agent, relay)
    agent.end_stream(sid)
    relay.end_stream(sid)
    agent_events, relay_events = pump(agent, relay)
    assert agent_events == [m.StreamEnded(sid)] and relay_events == [m.StreamEnded(sid)]
    assert agent.stream_count == relay.stream_count == 0


def test_ending_twice_is_a_usage_error_and_sends_nothing() -> None:
    """Regression: a refused second end_stream must not queue a second FIN (the peer would reset the
    stream with PROTOCOL_ERROR)."""
    agent, relay = fresh_pair()
    sid = agent.open_stream(CALLED)
    agent.end_stream(sid)
    agent.data_to_send()
    with pytest.raises(m.StreamStateError):
        agent.end_stream(sid)
    assert agent.data_to_send() == b""


def test_data_after_the_peers_fin_resets_the_stream() -> None:
    relay = m.Mux(m.Role.RELAY, SMALL)
    relay.receive_data(raw(FrameType.OPEN, 1, fr.encode_open(CALLED)) + raw(FrameType.FIN, 1))
    relay.data_to_send()
    events = relay.receive_data(raw(FrameType.DATA, 1, b"late"))
    assert events == [m.StreamReset(1, ErrorCode.PROTOCOL_ERROR, by_peer=False)]
    assert frames_in(relay.data_to_send()) == [fr.Frame(FrameType.RESET, 1, fr.encode_reset(ErrorCode.PROTOCOL_ERROR))]


def test_second_fin_from_the_peer_resets_the_stream() -> None:
    relay = m.Mux(m.Role.RELAY, SMALL)
    relay.receive_data(raw(FrameType.OPEN, 1, fr.encode_open(CALLED)) + raw(FrameType.FIN, 1))
    relay.data_to_send()
    assert relay.receive_data(raw(FrameType.FIN, 1)) == [m.StreamReset(1, ErrorCode.PROTOCOL_ERROR, False)]
    assert relay.stream_count == 0


# --- reset ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resetter", ["opener", "acceptor"])
def test_reset_in_either_direction(resetter: str) -> None:
    agent, relay = fresh_pair()
    sid = agent.open_stream(CALLED)
    pump(agent, relay)
    one, other = (agent, relay) if resetter == "opener" else (relay, agent)
    one.reset_stream(sid, ErrorCode.DESTINATION_UNREACHABLE)
    assert one.stream_state(sid) is m.StreamState.CLOSED
    one_events, other_events = pump(one, other)
    assert other_events == [m.StreamReset(sid, ErrorCode.DESTINATION_UNREACHABLE, by_peer=True)]
    assert one_events == []
    assert one.stream_count == other.stream_count == 0
    for side in (one, other):
        with pytest.raises(m.StreamGone):
            side.send_data(sid, b"x")
        with pytest.raises(m.StreamGone):
            side.end_stream(sid)
        assert side.send_window(sid) == 0
    one.reset_stream(sid, ErrorCode.ABORTED)  # already gone: a no-op
    assert not one.has_data_to_send()


def test_data_for_a_reset_stream_is_discarded_and_its_connection_credit_returned() -> None:
    limits = MuxLimits(stream_window=256 * KIB, connection_window=256 * KIB)
    agent, relay = fresh_pair(limits, limits)
    for _ in range(10):  # the connection window would be gone after the first round if it leaked
        sid = agent.open_stream(CALLED)
        pump(agent, relay)
        assert agent.send_data(sid, bytes(256 * KIB)) == 256 * KIB
        relay.reset_stream(sid, ErrorCode.ABORTED)  # crosses the data on the wire
        relay_events = relay.receive_data(agent.data_to_send())
        assert relay_events == []  # nothing delivered for a reset stream
        agent_events = agent.receive_data(relay.data_to_send())
        assert m.StreamReset(sid, ErrorCode.ABORTED) in agent_events
        assert agent.connection_send_window == 256 * KIB
        assert relay.connection_recv_window == 256 * KIB


def test_bytes_delivered_before_a_reset_still_return_connection_credit() -> None:
    limits = MuxLimits(stream_window=256 * KIB, connection_window=256 * KIB)
    agent, relay = fresh_pair(limits, limits)
    sid = agent.open_stream(CALLED)
    pump(agent, relay)
    agent.send_data(sid, bytes(200 * KIB))
    agent.reset_stream(sid, ErrorCode.ABORTED)
    _, relay_events = pump(agent, relay)
    assert len(received(relay_events, sid)) == 200 * KIB
    assert relay_events[-1] == m.StreamReset(sid, ErrorCode.ABORTED)
    relay.acknowledge(sid, 200 * KIB)  # the adapter's contract: acknowledge discarded bytes too
    pump(agent, relay)
    assert agent.connection_send_window == 256 * KIB


def test_reset_unknown_code_reads_as_internal_error() -> None:
    relay = m.Mux(m.Role.RELAY)
    relay.receive_data(raw(FrameType.OPEN, 1, fr.encode_open(CALLED)))
    assert relay.receive_data(raw(FrameType.RESET, 1, b"\x12\x34")) == [
        m.StreamReset(1, ErrorCode.INTERNAL_ERROR)]


def test_frames_for_a_stream_that_is_gone_are_ignored() -> None:
    agent, relay = fresh_pair()
    sid = agent.open_stream(CALLED)
    pump(agent, relay)
    relay.reset_stream(sid, ErrorCode.ABORTED)
    relay.data_to_send()
    late = (raw(FrameType.WINDOW, sid, fr.encode_window(10)) + raw(FrameType.FIN, sid)
            + raw(FrameType.RESET, sid, fr.encode_reset(ErrorCode.ABORTED)) + raw(FrameType.DATA, sid, b""))
    assert relay.receive_data(late) == []
    assert relay.data_to_send() == b""


# --- protocol faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ftype", [FrameType.DATA, FrameType.WINDOW, FrameType.FIN, FrameType.RESET])
@pytest.mark.parametrize("sid", [3, 4], ids=["peer-parity", "own-parity"])
def test_frames_on_never_opened_streams_are_protocol_errors(ftype: FrameType, sid: int) -> None:
    relay = m.Mux(m.Role.RELAY)
    relay.receive_data(raw(FrameType.OPEN, 1, fr.encode_open(CALLED)))
    relay.open_stream(ROUTE)  # stream 2: relay-opened ids up to 2 exist, 4 does not
    payload = {FrameType.WINDOW: fr.encode_window(1), FrameType.RESET: fr.encode_reset(ErrorCode.ABORTED),
               FrameType.DATA: b"x", FrameType.FIN: b""}[ftype]
    with pytest.raises(ProtocolError) as info:
        relay.receive_data(raw(ftype, sid, payload))
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("ftype", [FrameType.DATA, FrameType.FIN, FrameType.RESET, FrameType.OPEN])
def test_stream_frames_on_stream_zero_are_protocol_errors(ftype: FrameType) -> None:
    payload = {FrameType.RESET: fr.encode_reset(ErrorCode.ABORTED), FrameType.OPEN: fr.encode_open(CALLED),
               FrameType.DATA: b"x", FrameType.FIN: b""}[ftype]
    with pytest.raises(ProtocolError):
        m.Mux(m.Role.RELAY).receive_data(raw(ftype, 0, payload))


@pytest.mark.parametrize(("role", "sid"), [(m.Role.RELAY, 2), (m.Role.AGENT, 1), (m.Role.AGENT, 3)])
def test_open_with_the_wrong_parity_is_a_protocol_error(role: m.Role, sid: int) -> None:
    with pytest.raises(ProtocolError):
        m.Mux(role).receive_data(raw(FrameType.OPEN, sid, fr.encode_open(ROUTE)))


@pytest.mark.parametrize("second", [5, 3], ids=["duplicate", "decreasing"])
def test_open_ids_must_increase(second: int) -> None:
    relay = m.Mux(m.Role.RELAY)
    relay.receive_data(raw(FrameType.OPEN, 5, fr.encode_open(CALLED)))
    with pytest.raises(ProtocolError):
        relay.receive_data(raw(FrameType.OPEN, second, fr.encode_open(CALLED)))


def test_open_ids_may_skip() -> None:
    relay = m.Mux(m.Role.RELAY)
    assert relay.receive_data(raw(FrameType.OPEN, 1, fr.encode_open(CALLED))
                              + raw(FrameType.OPEN, 9, fr.encode_open(CALLED))) == [
        m.StreamOpened(1, CALLED), m.StreamOpened(9, CALLED)]
    # skipped ids count as opened-and-closed: their frames are ignored, not protocol errors
    assert relay.receive_data(raw(FrameType.FIN, 5)) == []


def test_malformed_open_payload_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        m.Mux(m.Role.RELAY).receive_data(raw(FrameType.OPEN, 1, b"\x01\x00\x00"))


@pytest.mark.parametrize("frame", [
    pytest.param(raw(FrameType.PING, 1, bytes(8)), id="ping-on-stream"),
    pytest.param(raw(FrameType.PING, 0, bytes(7)), id="ping-short"),
    pytest.param(raw(FrameType.GOAWAY, 1, fr.encode_goaway(0, ErrorCode.NO_ERROR)), id="goaway-on-stream"),
    pytest.param(raw(FrameType.GOAWAY, 0, bytes(5)), id="goaway-short"),
    pytest.param(raw(FrameType.WINDOW, 0, fr.encode_window(1)[:3]), id="window-short"),
    pytest.param(raw(FrameType.WINDOW, 0, bytes(4)), id="window-zero"),
])
def test_malformed_control_frames_are_protocol_errors(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.Mux(m.Role.AGENT).receive_data(frame)


def test_oversize_frame_is_refused_from_its_header() -> None:
    relay = m.Mux(m.Role.RELAY)
    header = fr.HEADER.pack(fr.VERSION, FrameType.DATA, 0, 0, 1, MAX_FRAME_PAYLOAD + 1)
    with pytest.raises(ProtocolError) as info:
        relay.receive_data(header)
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR


def test_receive_limit_is_the_protocol_constant_not_the_send_chunk() -> None:
    """A peer configured with bigger frames (up to 1 MiB) is still understood."""
    relay = m.Mux(m.Role.RELAY, SMALL)  # sends 64 KiB frames
    events = relay.receive_data(raw(FrameType.OPEN, 1, fr.encode_open(CALLED))
                                + raw(FrameType.DATA, 1, bytes(200 * KIB)))
    assert len(received(events, 1)) == 200 * KIB


def test_peer_exceeding_the_stream_window_gets_a_flow_control_reset() -> None:
    relay = m.Mux(m.Role.RELAY, SMALL)  # 256 KiB stream window: the OPEN's extra grant is zero
    relay.data_to_send()
    events = relay.receive_data(raw(FrameType.OPEN, 1, fr.encode_open(CALLED))
                                + raw(FrameType.DATA, 1, bytes(256 * KIB)) + raw(FrameType.DATA, 1, b"!"))
    assert events[1:] == [m.DataReceived(1, bytes(256 * KIB)),
                          m.StreamReset(1, ErrorCode.FLOW_CONTROL_ERROR, by_peer=False)]
    assert frames_in(relay.data_to_send()) == [
        fr.Frame(FrameType.RESET, 1, fr.encode_reset(ErrorCode.FLOW_CONTROL_ERROR))]
    # the discarded byte was accounted for: only the delivered bytes are outstanding
    relay.acknowledge(1, 256 * KIB)
    assert relay.connection_recv_window == SMALL.connection_window - 256 * KIB - 1


def test_peer_exceeding_the_connection_window_is_fatal() -> None:
    limits = MuxLimits(stream_window=256 * KIB, connection_window=256 * KIB)
    relay = m.Mux(m.Role.RELAY, limits)
    wire = (raw(FrameType.OPEN, 1, fr.encode_open(CALLED)) + raw(FrameType.OPEN, 3, fr.encode_open(CALLED))
            + raw(FrameType.DATA, 1, bytes(200 * KIB)) + raw(FrameType.DATA, 3, bytes(57 * KIB)))
    with pytest.raises(FlowControlError) as info:
        relay.receive_data(wire)
    assert info.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_window_overflow_on_a_stream_resets_it() -> None:
    agent, relay = fresh_pair()
    sid = agent.open_stream(CALLED)
    pump(agent, relay)
    events = agent.receive_data(raw(FrameType.WINDOW, sid, fr.encode_window(2**31 - 1)))
    assert events == [m.StreamReset(sid, ErrorCode.FLOW_CONTROL_ERROR, by_peer=False)]


def test_window_overflow_on_the_connection_is_fatal() -> None:
    agent, relay = fresh_pair()
    with pytest.raises(FlowControlError):
        agent.receive_data(raw(FrameType.WINDOW, 0, fr.encode_window(2**31 - 1)))


# --- capacity and drain ---------------------------------------------------------------------------------


def test_max_streams_refuses_with_reset_capacity() -> None:
    agent, relay = fresh_pair(None, MuxLimits(max_streams=2))
    s1, s3, s5 = (agent.open_stream(CALLED) for _ in range(3))
    agent_events, relay_events = pump(agent, relay)
    assert without_window_updates(relay_events) == [m.StreamOpened(s1, CALLED), m.StreamOpened(s3, CALLED)]
    assert without_window_updates(agent_events) == [m.StreamReset(s5, ErrorCode.CAPACITY, by_peer=True)]
    assert relay.stream_count == agent.stream_count == 2
    # the limit counts streams of both directions: the relay cannot open one either
    with pytest.raises(m.StreamLimitReached):
        relay.open_stream(ROUTE)
    agent.end_stream(s1)
    relay.end_stream(s1)
    pump(agent, relay)
    assert relay.open_stream(ROUTE) == 2


def test_data_following_a_refused_open_returns_its_connection_credit() -> None:
    limits = MuxLimits(stream_window=256 * KIB, connection_window=256 * KIB)
    agent, relay = fresh_pair(limits, MuxLimits(stream_window=256 * KIB, connection_window=256 * KIB,
                                                max_streams=1))
    busy = relay.open_stream(ROUTE)
    pump(agent, relay)
    refused = agent.open_stream(CALLED)  # 0-RTT: the data goes out with the OPEN
    assert agent.send_data(refused, bytes(256 * KIB)) == 256 * KIB
    agent_events, relay_events = pump(agent, relay)
    assert relay_events == []
    assert without_window_updates(agent_events) == [m.StreamReset(refused, ErrorCode.CAPACITY)]
    assert agent.connection_send_window == 256 * KIB
    assert relay.stream_ids() == [busy]


def test_local_open_over_the_limit_raises() -> None:
    agent = m.Mux(m.Role.AGENT, MuxLimits(max_streams=1))
    agent.open_stream(CALLED)
    with pytest.raises(m.StreamLimitReached):
        agent.open_stream(CALLED)


def test_goaway_stops_new_streams_on_both_sides_and_lets_open_ones_finish() -> None:
    agent, relay = fresh_pair()
    sid = relay.open_stream(ROUTE)
    pump(agent, relay)
    relay.go_away()
    relay.go_away()  # idempotent: one frame
    wire = relay.data_to_send()
    # GOAWAY: last stream id the relay processed from the agent = 0 (none), code NO_ERROR
    assert wire == bytes.fromhex("01 06 00 00 00000000 00000006 00000000 0000")
    assert agent.receive_data(wire) == [m.GoAwayReceived(0, ErrorCode.NO_ERROR)]
    assert agent.goaway_received and relay.goaway_sent
    for side in (agent, relay):
        with pytest.raises(m.ConnectionDraining):
            side.open_stream(CALLED if side is agent else ROUTE)
    relay.send_data(sid, b"finishing")
    agent_events, _ = pump(agent, relay)
    assert agent_events == [m.DataReceived(sid, b"finishing")]


def test_open_crossing_a_goaway_is_reset_going_away() -> None:
    agent, relay = fresh_pair()
    first = agent.open_stream(CALLED)
    pump(agent, relay)
    crossing = agent.open_stream(CALLED)
    relay.go_away(ErrorCode.NO_ERROR)
    agent_events, relay_events = pump(agent, relay)
    assert relay_events == []
    assert agent_events == [m.GoAwayReceived(first, ErrorCode.NO_ERROR),
                            m.StreamReset(crossing, ErrorCode.GOING_AWAY)]


# --- ping -----------------------------------------------------------------------------------------------


def test_ping_is_answered_with_a_pong() -> None:
    agent, relay = fresh_pair()
    agent.ping(b"12345678")
    assert agent.data_to_send() == bytes.fromhex("01 05 00 00 00000000 00000008") + b"12345678"
    assert relay.receive_data(raw(FrameType.PING, 0, b"12345678")) == [m.PingReceived(b"12345678")]
    pong = relay.data_to_send()
    assert frames_in(pong) == [fr.Frame(FrameType.PING, 0, b"12345678", FrameFlag.ACK)]
    assert agent.receive_data(pong) == [m.PongReceived(b"12345678")]
    assert agent.data_to_send() == b""  # a pong is not answered


def test_ping_payload_must_be_eight_bytes() -> None:
    with pytest.raises(UsageError):
        m.Mux(m.Role.AGENT).ping(b"short")


# --- report ---------------------------------------------------------------------------------------------


def test_agent_report_reaches_the_relay_byte_for_byte() -> None:
    agent, relay = fresh_pair()
    agent.send_report(b'{"v":1}')
    wire = agent.data_to_send()
    assert wire == bytes.fromhex("01 07 00 00 00000000 00000007") + b'{"v":1}'
    assert relay.receive_data(wire) == [m.ReportReceived(b'{"v":1}')]
    assert relay.data_to_send() == b""  # not answered


def test_report_rules() -> None:
    agent, relay = fresh_pair()
    with pytest.raises(UsageError):
        relay.send_report(b"{}")  # only agents report
    with pytest.raises(UsageError):
        agent.send_report(b"x" * (MAX_REPORT + 1))
    with pytest.raises(ProtocolError):
        agent.receive_data(raw(FrameType.REPORT, 0, b"{}"))  # an agent never receives one
    with pytest.raises(ProtocolError):
        fresh_pair()[1].receive_data(raw(FrameType.REPORT, 1, b"{}"))  # stream 0 only
    with pytest.raises(ProtocolError):
        fresh_pair()[1].receive_data(raw(FrameType.REPORT, 0, b"x" * (MAX_REPORT + 1)))


# --- limits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"max_frame_payload": 0},
    {"max_frame_payload": MAX_FRAME_PAYLOAD + 1},
    {"stream_window": INITIAL_WINDOW - 1},
    {"stream_window": 2**31, "connection_window": 2**31},
    {"stream_window": 1 * MIB, "connection_window": 512 * KIB},
    {"max_streams": 0},
])
def test_limits_are_validated(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        MuxLimits(**kwargs)


# --- unknown frame types (docs/protocol.md §2.2) ---------------------------------------------------------


@pytest.mark.parametrize("ftype", [8, 0x42, 0xFF])
def test_an_unknown_frame_type_is_ignored_and_the_connection_goes_on(ftype: int) -> None:
    agent, relay = fresh_pair()
    sid = agent.open_stream(CALLED)
    agent.send_data(sid, b"before")
    newer = raw(ftype, sid, b"from a newer peer") + raw(ftype, 0)
    wire = agent.data_to_send() + newer + raw(FrameType.DATA, sid, b"after")
    events = relay.receive_data(wire)
    assert events == [m.StreamOpened(sid, CALLED), m.DataReceived(sid, b"before"), m.DataReceived(sid, b"after")]
    assert relay.frames_ignored == 2
    assert relay.data_to_send() == b""  # not answered, not reset
    assert relay.stream_state(sid) is m.StreamState.OPEN


def test_an_unknown_frame_type_above_max_payload_is_still_fatal() -> None:
    relay = m.Mux(m.Role.RELAY)
    with pytest.raises(ProtocolError) as info:
        relay.receive_data(fr.HEADER.pack(fr.VERSION, 0x42, 0, 0, 0, MAX_FRAME_PAYLOAD + 1))
    assert info.value.code is ErrorCode.FRAME_SIZE_ERROR


# --- stream-id exhaustion (docs/protocol.md §4) ----------------------------------------------------------


@pytest.mark.parametrize(("role", "last"), [(m.Role.AGENT, 7), (m.Role.RELAY, 8)])
def test_a_side_that_used_its_last_id_goes_away_and_refuses_to_open(role: m.Role, last: int) -> None:
    mux = m.Mux(role, max_stream_id=last + 1)  # room for exactly four ids of this side's parity
    mux.data_to_send()
    payload = CALLED if role is m.Role.AGENT else ROUTE
    ids = [mux.open_stream(payload) for _ in range(4)]
    assert ids[-1] == last and not mux.stream_ids_exhausted
    mux.data_to_send()
    with pytest.raises(m.StreamIdsExhausted) as info:
        mux.open_stream(payload)
    assert isinstance(info.value, m.ConnectionDraining)  # callers that handle a drain need nothing new
    assert mux.stream_ids_exhausted and mux.goaway_sent
    # the GOAWAY tells the peer to open nothing more here either; the open streams go on
    assert frames_in(mux.data_to_send()) == [fr.Frame(FrameType.GOAWAY, 0, fr.encode_goaway(0, ErrorCode.NO_ERROR))]
    with pytest.raises(m.ConnectionDraining):
        mux.open_stream(payload)
    assert mux.data_to_send() == b""  # one GOAWAY only
    assert mux.send_data(ids[-1], b"still open") == 10


def test_the_default_limit_is_the_largest_u32_id_and_it_encodes() -> None:
    relay = m.Mux(m.Role.RELAY)
    agent = m.Mux(m.Role.AGENT, max_stream_id=2**32 - 1)
    relay._next_local_id = 2**32 - 2  # the last even id (not reachable in a test by opening 2**31 streams)
    agent._next_local_id = 2**32 - 1  # the last odd id
    assert relay.open_stream(ROUTE) == 2**32 - 2
    assert agent.open_stream(CALLED) == 2**32 - 1
    assert frames_in(relay.data_to_send())[-1].stream_id == 2**32 - 2
    for side, payload in ((relay, ROUTE), (agent, CALLED)):
        with pytest.raises(m.StreamIdsExhausted):
            side.open_stream(payload)


def test_max_stream_id_is_validated() -> None:
    for bad in (1, 2**32):
        with pytest.raises(ValueError):
            m.Mux(m.Role.AGENT, max_stream_id=bad)


# --- keepalive from the mux's own timer ------------------------------------------------------------------


def test_without_keepalive_there_is_no_deadline() -> None:
    agent = m.Mux(m.Role.AGENT)
    assert agent.next_deadline() is None
    assert agent.handle_timer(1e9) == []
    assert agent.rtt is None


def test_the_timer_queues_pings_and_a_pong_gives_the_rtt() -> None:
    agent, relay = fresh_pair()
    agent.start_keepalive(10.0, now=100.0)
    with pytest.raises(UsageError):
        agent.start_keepalive(10.0, now=100.0)
    assert agent.next_deadline() == 110.0
    assert agent.handle_timer(109.0) == [] and agent.data_to_send() == b""
    assert agent.handle_timer(110.0) == []
    ping = agent.data_to_send()
    assert ping == raw(FrameType.PING, 0, (1).to_bytes(8, "big"))  # the payload is a u64 sequence number
    assert relay.receive_data(ping) == [m.PingReceived((1).to_bytes(8, "big"))]
    assert agent.receive_data(relay.data_to_send(), now=110.25) == [m.PongReceived((1).to_bytes(8, "big"))]
    assert agent.rtt == pytest.approx(0.25)
    assert agent.next_deadline() == 120.0


def test_a_silent_peer_is_dead_after_three_intervals_and_anything_received_postpones_it() -> None:
    agent, relay = fresh_pair()
    agent.start_keepalive(10.0, now=0.0)
    relay.ping(bytes(8))
    agent.receive_data(relay.data_to_send(), now=25.0)  # a message is life, whatever it carries
    agent.data_to_send()
    verdicts = []
    for _ in range(10):
        now = agent.next_deadline()
        assert now is not None
        verdicts = agent.handle_timer(now)
        if verdicts:
            break
    assert verdicts == [m.PeerDead(30.0)] and now == 55.0
    # data without ``now`` (a caller without keepalive bookkeeping) does not count
    agent2, relay2 = fresh_pair()
    agent2.start_keepalive(10.0, now=0.0)
    relay2.ping(bytes(8))
    agent2.receive_data(relay2.data_to_send())
    assert agent2.handle_timer(10.0) == [] and agent2.handle_timer(20.0) == []
    assert agent2.handle_timer(30.0) == [m.PeerDead(30.0)]


def test_a_send_buffer_that_never_drains_is_a_peer_that_stopped_reading() -> None:
    agent, relay = fresh_pair()
    agent.start_keepalive(10.0, now=0.0)
    agent.send_blocked(5.0)
    agent.send_blocked(9.0)  # later blocked writes do not move the clock
    verdicts: list[m.Event] = []
    for t in (10.0, 20.0, 30.0, 34.999):
        relay.ping(bytes(8))
        agent.receive_data(relay.data_to_send(), now=t)  # the peer keeps sending; it never reads
        verdicts += agent.handle_timer(t)
    assert verdicts == []
    assert agent.next_deadline() == 35.0
    assert agent.handle_timer(35.0) == [m.PeerNotReading(30.0)]
    agent.send_drained()
    assert agent.handle_timer(35.0) == []  # drained: the verdict is withdrawn


# --- the association of docs/protocol.md Appendix A.2, replayed byte for byte ---------------------------


def test_the_documented_association_is_what_two_muxes_send() -> None:
    documented = protocol_doc.trace(protocol_doc.blocks("trace")["association"])
    # The DICOM bytes come from the document; they must be what they say they are.
    payloads = [bytes(f.payload) for _, wire in documented for f in frames_in(wire) if f.type is FrameType.DATA]
    rq, ac, release_rq, release_rp = payloads
    req = AssociateSniffer(1 << 20).feed(rq)
    assert req is not None and (req.called_ae, req.calling_ae) == ("PACS", "CLOUDAI")
    assert ac[0] == 0x02 and int.from_bytes(ac[2:6], "big") == len(ac) - 6  # A-ASSOCIATE-AC, whole
    assert release_rq == bytes.fromhex("05 00 00000004 00000000")
    assert release_rp == bytes.fromhex("06 00 00000004 00000000")

    relay, agent = m.Mux(m.Role.RELAY), m.Mux(m.Role.AGENT)  # default limits, as the document says
    sent: list[tuple[str, bytes]] = []

    def carry(name: str) -> list[m.Event]:
        src, dst = (relay, agent) if name == "relay" else (agent, relay)
        wire = bytes(src.data_to_send())
        sent.append((name, wire))
        return dst.receive_data(wire)

    carry("relay")
    carry("agent")
    sid = relay.open_stream(fr.OpenPayload(TargetKind.ROUTE, "pacs", "CLOUDAI"))
    assert relay.send_data(sid, rq) == len(rq)
    assert carry("relay") == [m.StreamOpened(sid, fr.OpenPayload(TargetKind.ROUTE, "pacs", "CLOUDAI")),
                              m.DataReceived(sid, rq)]
    for name, pdu in (("agent", ac), ("relay", release_rq), ("agent", release_rp)):
        sender = relay if name == "relay" else agent
        sender.acknowledge(sid, sender.bytes_held)  # what it received was written onward: consumed
        assert sender.send_data(sid, pdu) == len(pdu)
        assert carry(name) == [m.DataReceived(sid, pdu)]
    relay.acknowledge(sid, relay.bytes_held)
    relay.end_stream(sid)
    assert carry("relay") == [m.StreamEnded(sid)]
    agent.end_stream(sid)
    assert carry("agent") == [m.StreamEnded(sid)]
    assert sent == documented
    assert relay.stream_count == agent.stream_count == 0
    assert not relay.has_data_to_send() and not agent.has_data_to_send()
