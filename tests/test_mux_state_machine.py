"""A hypothesis state machine for the mux: an agent and a relay joined by a wire this test controls.

Hypothesis decides who opens, sends, acknowledges, ends, resets and when bytes cross the wire, in chunks
of random size. The model records what each side sent and what the other side was given, and checks:

- per stream and direction, the bytes delivered are a prefix of the bytes sent, and all of them once
  everything was delivered and nobody reset the stream;
- nothing is delivered for a stream after the receiver reset it or saw it reset, or before it was opened;
- send windows never go negative, and bytes delivered but not acknowledged never exceed the receiver's
  stream and connection windows (memory stays bounded);
- the streams each Mux holds, and their states, are the ones the events told the model about;
- two well-behaved peers never trip a protocol, flow-control or fault reset.
"""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tunnel_core import frames as fr
from tunnel_core import mux as m
from tunnel_core.codes import ErrorCode, TargetKind
from tunnel_core.limits import KIB, MuxLimits

AGENT, RELAY = "agent", "relay"
PEER = {AGENT: RELAY, RELAY: AGENT}
SIDES = st.sampled_from([AGENT, RELAY])
PICK = st.integers(0, 2**16)
# Small windows and frames so a few steps reach every limit; max_streams low so opens get refused.
LIMITS = {
    AGENT: MuxLimits(max_frame_payload=16 * KIB, stream_window=256 * KIB, connection_window=512 * KIB,
                     max_streams=3),
    RELAY: MuxLimits(max_frame_payload=8 * KIB, stream_window=320 * KIB, connection_window=640 * KIB,
                     max_streams=2),
}
OPEN_BY = {AGENT: fr.OpenPayload(TargetKind.CALLED_AE, "STORE", "CT1"),
           RELAY: fr.OpenPayload(TargetKind.ROUTE, "pacs", "CLOUD")}
REFUSALS = {ErrorCode.CAPACITY, ErrorCode.GOING_AWAY}


class TunnelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mux = {AGENT: m.Mux(m.Role.AGENT, LIMITS[AGENT]), RELAY: m.Mux(m.Role.RELAY, LIMITS[RELAY])}
        self.wire = {AGENT: bytearray(), RELAY: bytearray()}  # sent by this side, not yet delivered
        self.sent: dict[tuple[int, str], bytearray] = {}  # (stream, sender) -> bytes accepted by send_data
        self.got: dict[tuple[int, str], bytearray] = {}  # (stream, sender) -> bytes the receiver was given
        self.unacked = {AGENT: {}, RELAY: {}}  # receiver -> stream -> delivered, not yet acknowledged
        self.live = {AGENT: set(), RELAY: set()}  # streams each side should hold, from calls and events
        self.fin_sent = {AGENT: set(), RELAY: set()}
        self.fin_seen = {AGENT: set(), RELAY: set()}
        self.reset_at = {AGENT: set(), RELAY: set()}  # this side reset the stream or saw it reset

    # --- rules ------------------------------------------------------------------------------------------

    @rule(side=SIDES)
    def open_stream(self, side: str) -> None:
        mux = self.mux[side]
        if mux.goaway_sent or mux.goaway_received or mux.stream_count >= mux.limits.max_streams:
            return
        sid = mux.open_stream(OPEN_BY[side])
        assert sid not in self.live[side]
        self.live[side].add(sid)
        self.sent[(sid, side)] = bytearray()

    @rule(side=SIDES, pick=PICK, size=st.integers(1, 300 * KIB), seed=st.integers(0, 2**32))
    def send(self, side: str, pick: int, size: int, seed: int) -> None:
        sid = self._pick(side, pick, {m.StreamState.OPEN, m.StreamState.HALF_CLOSED_REMOTE})
        if sid is None:
            return
        mux = self.mux[side]
        window = mux.send_window(sid)
        data = random.Random(seed).randbytes(size)
        n = mux.send_data(sid, data)
        assert n == min(size, window)
        self.sent[(sid, side)] += data[:n]

    @rule(side=SIDES, seed=st.integers(0, 2**32))
    def flood(self, side: str, seed: int) -> None:
        """A sender that fills every window while its receiver acknowledges nothing (stopped reading)."""
        for _ in range(3):
            for pick in range(self.mux[side].stream_count):
                self.send(side, pick, 300 * KIB, seed + pick)
            self.deliver(side, None, None)
            self.deliver(PEER[side], None, None)

    @rule(side=SIDES, size=st.one_of(st.none(), st.integers(1, 40 * KIB)),
          message=st.one_of(st.none(), st.integers(1, 64 * KIB)))
    def deliver(self, side: str, size: int | None, message: int | None) -> None:
        """Carry up to ``size`` bytes from ``side`` to its peer (None: everything queued)."""
        if self.mux[side].has_data_to_send():
            self.wire[side] += self.mux[side].data_to_send(message)
        wire = self.wire[side]
        chunk = bytes(wire if size is None else wire[:size])
        del wire[:len(chunk)]
        receiver = PEER[side]
        for event in self.mux[receiver].receive_data(chunk):
            self._on_event(receiver, event)

    @rule(side=SIDES, pick=PICK, fraction=st.floats(0.0, 1.0))
    def acknowledge(self, side: str, pick: int, fraction: float) -> None:
        pending = sorted(sid for sid, n in self.unacked[side].items() if n)
        if not pending:
            return
        sid = pending[pick % len(pending)]
        n = max(1, int(self.unacked[side][sid] * fraction))
        self.mux[side].acknowledge(sid, n)
        self.unacked[side][sid] -= n

    @rule(side=SIDES, pick=PICK)
    def end_stream(self, side: str, pick: int) -> None:
        sid = self._pick(side, pick, {m.StreamState.OPEN, m.StreamState.HALF_CLOSED_REMOTE})
        if sid is None:
            return
        self.mux[side].end_stream(sid)
        self.fin_sent[side].add(sid)
        if sid in self.fin_seen[side]:
            self.live[side].discard(sid)

    @rule(side=SIDES, pick=PICK, code=st.sampled_from([ErrorCode.ABORTED, ErrorCode.DESTINATION_UNREACHABLE,
                                                      ErrorCode.UNKNOWN_ROUTE, ErrorCode.TIMEOUT]))
    def reset_stream(self, side: str, pick: int, code: ErrorCode) -> None:
        sid = self._pick(side, pick, set(m.StreamState))
        if sid is None:
            return
        self.mux[side].reset_stream(sid, code)
        self.live[side].discard(sid)
        self.reset_at[side].add(sid)

    @rule(side=SIDES, dice=st.integers(0, 9))
    def go_away(self, side: str, dice: int) -> None:
        if dice == 0:  # rarely: after it, no stream is ever opened again
            self.mux[side].go_away()

    @rule(side=SIDES, opaque=st.binary(min_size=8, max_size=8))
    def ping(self, side: str, opaque: bytes) -> None:
        self.mux[side].ping(opaque)

    @rule()
    def settle(self) -> None:
        """Deliver everything, acknowledge everything: each direction now holds all that was sent."""
        for _ in range(50):
            if not any(self.mux[s].has_data_to_send() or self.wire[s] for s in (AGENT, RELAY)):
                break
            for side in (AGENT, RELAY):
                self.deliver(side, None, None)
            for side in (AGENT, RELAY):
                for sid, n in self.unacked[side].items():
                    if n:
                        self.mux[side].acknowledge(sid, n)
                        self.unacked[side][sid] = 0
        else:
            raise AssertionError("the wire never went quiet")
        for (sid, sender), sent in self.sent.items():
            if sid not in self.reset_at[AGENT] | self.reset_at[RELAY]:
                assert self.got.get((sid, sender), b"") == sent, f"stream {sid} from {sender} incomplete"

    # --- model ------------------------------------------------------------------------------------------

    def _pick(self, side: str, pick: int, states: set[m.StreamState]) -> int | None:
        mux = self.mux[side]
        candidates = sorted(sid for sid in mux.stream_ids() if mux.stream_state(sid) in states)
        return candidates[pick % len(candidates)] if candidates else None

    def _on_event(self, side: str, event: m.Event) -> None:
        sender = PEER[side]
        match event:
            case m.StreamOpened(sid, payload):
                assert payload == OPEN_BY[sender]
                assert sid not in self.live[side] and sid not in self.reset_at[side]
                self.live[side].add(sid)
                self.sent.setdefault((sid, side), bytearray())
            case m.DataReceived(sid, data):
                assert sid in self.live[side], f"{side} got data on stream {sid}, which it does not hold"
                assert sid not in self.reset_at[side], f"{side} got data on stream {sid} after a reset"
                got = self.got.setdefault((sid, sender), bytearray())
                got += data
                sent = self.sent[(sid, sender)]
                assert got == sent[:len(got)], f"stream {sid}: delivered bytes are not a prefix of sent"
                self.unacked[side][sid] = self.unacked[side].get(sid, 0) + len(data)
            case m.StreamEnded(sid):
                assert sid in self.live[side]
                self.fin_seen[side].add(sid)
                if sid in self.fin_sent[side]:
                    self.live[side].discard(sid)
            case m.StreamReset(sid, code, by_peer):
                assert by_peer, f"{side} reset stream {sid} for a fault ({code.name}) of a well-behaved peer"
                assert sid in self.live[side]
                if code in REFUSALS:
                    assert sid % 2 == (1 if side == AGENT else 0), "only our own opens are refused"
                self.live[side].discard(sid)
                self.reset_at[side].add(sid)
            case m.PongReceived() | m.PingReceived() | m.WindowUpdated() | m.GoAwayReceived():
                pass
            case _:
                raise AssertionError(f"unexpected event {event!r}")

    # --- invariants -------------------------------------------------------------------------------------

    @invariant()
    def streams_match_the_model(self) -> None:
        for side, mux in self.mux.items():
            assert set(mux.stream_ids()) == self.live[side]
            assert mux.stream_count == len(self.live[side]) <= mux.limits.max_streams
            for sid in self.live[side]:
                expected = {(False, False): m.StreamState.OPEN, (True, False): m.StreamState.HALF_CLOSED_LOCAL,
                            (False, True): m.StreamState.HALF_CLOSED_REMOTE}[
                    (sid in self.fin_sent[side], sid in self.fin_seen[side])]
                assert mux.stream_state(sid) is expected

    @invariant()
    def windows_never_negative(self) -> None:
        for mux in self.mux.values():
            assert mux.connection_send_window >= 0
            assert mux.connection_recv_window >= 0
            for sid in mux.stream_ids():
                # send_window() clamps at 0, so look at the raw counters.
                window = mux._streams[sid].window
                assert window.send >= 0 and window.recv >= 0 and window.held >= 0 and window.unreturned >= 0

    @invariant()
    def held_bytes_are_bounded_by_the_windows(self) -> None:
        for side, held in self.unacked.items():
            limits = self.mux[side].limits
            assert sum(held.values()) <= limits.connection_window
            assert all(n <= limits.stream_window for n in held.values())


TunnelMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_mux_state_machine = TunnelMachine.TestCase
