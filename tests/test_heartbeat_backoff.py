"""tunnel_core.heartbeat and tunnel_core.backoff, with a fake clock and injected randomness."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel_core.backoff import Backoff
from tunnel_core.heartbeat import Heartbeat, PeerDead, PeerNotReading, SendPing


def seq(n: int) -> bytes:
    return struct.pack("!Q", n)


# --- heartbeat ------------------------------------------------------------------------------------------


def test_first_ping_after_one_interval() -> None:
    hb = Heartbeat(interval=10.0, now=100.0)
    assert hb.next_deadline() == 110.0
    assert hb.poll(109.999) is None
    assert hb.poll(110.0) == SendPing(seq(1))
    assert hb.next_deadline() == 120.0


def test_dead_exactly_at_three_silent_intervals_and_not_before() -> None:
    hb = Heartbeat(interval=10.0, now=0.0)
    assert hb.poll(10.0) == SendPing(seq(1))
    assert hb.poll(20.0) == SendPing(seq(2))
    assert hb.next_deadline() == 30.0
    assert hb.poll(29.999) is None
    assert hb.poll(30.0) == PeerDead(30.0)


def test_activity_postpones_death() -> None:
    hb = Heartbeat(interval=10.0, now=0.0)
    hb.poll(10.0)
    hb.on_activity(25.0)  # any frame counts as life
    assert hb.poll(30.0) == SendPing(seq(2))
    assert hb.next_deadline() == 40.0
    assert hb.poll(40.0) == SendPing(seq(3))
    assert hb.next_deadline() == 50.0
    assert hb.poll(50.0) == SendPing(seq(4))
    assert hb.next_deadline() == 55.0
    assert hb.poll(54.999) is None
    assert hb.poll(55.0) == PeerDead(30.0)


def test_pong_gives_the_rtt_and_counts_as_life() -> None:
    hb = Heartbeat(interval=10.0, now=0.0)
    ping = hb.poll(10.0)
    assert isinstance(ping, SendPing)
    assert hb.rtt is None
    assert hb.on_pong(ping.opaque, 10.25) == pytest.approx(0.25)
    assert hb.rtt == pytest.approx(0.25)
    assert hb.on_pong(ping.opaque, 11.0) is None  # already answered
    assert hb.rtt == pytest.approx(0.25)
    assert hb.poll(40.0) == SendPing(seq(2))  # not dead: heard at 11.0
    assert hb.poll(41.0) == PeerDead(30.0)


@pytest.mark.parametrize("opaque", [b"", b"short", seq(99), b"123456789"])
def test_unknown_pong_returns_none_but_is_still_activity(opaque: bytes) -> None:
    hb = Heartbeat(interval=10.0, now=0.0)
    hb.poll(10.0)
    assert hb.on_pong(opaque, 29.0) is None
    assert hb.rtt is None
    assert not isinstance(hb.poll(30.0), PeerDead)


def test_ping_memory_is_bounded() -> None:
    hb = Heartbeat(interval=1.0, now=0.0, misses=3)
    for t in range(1, 1001):
        hb.on_activity(float(t))  # the peer talks, but never answers our pings
        assert hb.poll(float(t)) == SendPing(seq(t))
    assert len(hb._sent) <= hb.misses + 1  # the bound itself (private, but it is the point of this test)
    assert hb.on_pong(seq(996), 1000.5) is None  # forgotten
    assert hb.on_pong(seq(997), 1000.5) == pytest.approx(3.5)  # still remembered


def test_misses_is_configurable() -> None:
    hb = Heartbeat(interval=2.0, now=0.0, misses=1)
    assert hb.next_deadline() == 2.0
    assert hb.poll(2.0) == PeerDead(2.0)  # death is checked before the ping


@pytest.mark.parametrize(("interval", "misses"), [(0.0, 3), (-1.0, 3), (1.0, 0)])
def test_heartbeat_validates(interval: float, misses: int) -> None:
    with pytest.raises(ValueError):
        Heartbeat(interval, now=0.0, misses=misses)


def test_polling_at_each_deadline_declares_death_on_time() -> None:
    """An adapter that sleeps until next_deadline() and polls sees the peer die at 3 intervals."""
    hb = Heartbeat(interval=10.0, now=1000.0)
    actions = []
    for _ in range(10):
        now = hb.next_deadline()
        action = hb.poll(now)
        actions.append((now, action))
        if isinstance(action, PeerDead):
            break
    assert actions == [(1010.0, SendPing(seq(1))), (1020.0, SendPing(seq(2))), (1030.0, PeerDead(30.0))]


@settings(max_examples=300, deadline=None)
@given(start=st.floats(0.0, 1e6), interval=st.floats(0.01, 60.0), misses=st.integers(1, 5))
def test_polling_at_next_deadline_always_makes_progress(start: float, interval: float, misses: int) -> None:
    """BUG (reported): poll() compares ``now - last_heard`` with ``interval * misses`` while next_deadline()
    returns ``last_heard + interval * misses``; in floating point the two disagree (e.g. start=1000.37,
    interval=0.1), so poll(next_deadline()) returns None and next_deadline() stays in the past: the
    adapter's timer spins instead of declaring the peer dead."""
    hb = Heartbeat(interval, now=start, misses=misses)
    for _ in range(misses + 2):
        now = hb.next_deadline()
        if isinstance(hb.poll(now), PeerDead):
            return
        assert hb.next_deadline() > now, "poll at the deadline did nothing; the timer would spin"
    raise AssertionError("the silent peer was never declared dead")


# --- a peer that stops reading (issue 10) ---------------------------------------------------------------


def test_a_send_buffer_full_for_three_intervals_is_a_dead_peer_even_while_it_still_sends() -> None:
    hb = Heartbeat(interval=10.0, now=0.0)
    hb.on_send_blocked(5.0)
    hb.on_send_blocked(9.0)  # later writes that find it full do not move the clock
    for t in (10.0, 20.0, 30.0):
        hb.on_activity(t)  # the peer keeps sending; it just never reads what we send
    assert hb.next_deadline() == 10.0  # the first ping
    hb.poll(10.0)
    assert hb.next_deadline() == 20.0
    hb.poll(20.0)
    assert hb.next_deadline() == 30.0
    hb.poll(30.0)
    assert hb.next_deadline() == 35.0
    assert hb.poll(34.999) is None
    assert hb.poll(35.0) == PeerNotReading(30.0)
    assert PeerNotReading(30.0).describe() == "peer stopped reading: send buffer full for 30.0s"


def test_a_drained_buffer_stops_the_clock_and_the_next_block_starts_it_afresh() -> None:
    hb = Heartbeat(interval=10.0, now=0.0)
    hb.on_send_blocked(1.0)
    hb.on_activity(28.0)
    hb.on_send_drained()
    hb.on_send_blocked(29.0)
    hb.on_activity(40.0)
    assert not isinstance(hb.poll(35.0), PeerNotReading)
    assert hb.poll(59.0) == PeerNotReading(30.0)


def test_silence_wins_when_both_verdicts_are_due() -> None:
    hb = Heartbeat(interval=1.0, now=0.0)
    hb.on_send_blocked(0.0)
    assert hb.poll(3.0) == PeerDead(3.0)
    assert PeerDead(3.0).describe() == "peer silent for 3.0s"


@settings(max_examples=300, deadline=None)
@given(start=st.floats(0.0, 1e6), interval=st.floats(0.01, 60.0), misses=st.integers(1, 5),
       blocked_after=st.floats(0.0, 100.0))
def test_polling_at_next_deadline_declares_a_reader_that_stopped_dead(start: float, interval: float, misses: int,
                                                                     blocked_after: float) -> None:
    """The peer keeps sending (so it is never silent) but never drains our buffer: the adapter that only
    sleeps until next_deadline() and polls still reaches the verdict, on time, without spinning."""
    hb = Heartbeat(interval, now=start, misses=misses)
    blocked_at = start + blocked_after
    hb.on_send_blocked(blocked_at)
    for _ in range(int(blocked_after / interval) + misses + 3):
        now = hb.next_deadline()
        hb.on_activity(now)  # something arrived just now: never silent
        action = hb.poll(now)
        if isinstance(action, PeerNotReading):
            assert now == blocked_at + interval * misses
            return
        assert not isinstance(action, PeerDead)
        assert hb.next_deadline() > now, "poll at the deadline did nothing; the timer would spin"
    raise AssertionError("the peer that stopped reading was never declared dead")


# --- backoff --------------------------------------------------------------------------------------------


def test_ceiling_doubles_up_to_the_cap() -> None:
    b = Backoff(initial=0.5, cap=30.0, rand=lambda: 1.0)
    ceilings = []
    for _ in range(9):
        ceilings.append(b.ceiling())
        b.next_delay()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_full_jitter_spans_zero_to_just_below_the_ceiling() -> None:
    draws = iter([0.0, 0.9999999, 0.5])
    b = Backoff(initial=1.0, cap=8.0, rand=lambda: next(draws))
    assert b.next_delay() == 0.0  # attempt 0: ceiling 1
    assert b.next_delay() == pytest.approx(1.9999998)  # attempt 1: ceiling 2, never reached
    assert b.next_delay() == 2.0  # attempt 2: ceiling 4
    assert b.attempt == 3


def test_reset_starts_over() -> None:
    b = Backoff(initial=1.0, cap=60.0, rand=lambda: 0.999)
    for _ in range(5):
        b.next_delay()
    assert b.ceiling() == 32.0
    b.reset()
    assert b.attempt == 0 and b.ceiling() == 1.0
    assert b.next_delay() == pytest.approx(0.999)


def test_many_attempts_stay_at_the_cap_without_overflow() -> None:
    b = Backoff(initial=0.1, cap=30.0, rand=lambda: 0.5)
    for _ in range(5000):
        assert 0.0 <= b.next_delay() <= 15.0
    assert b.ceiling() == 30.0


@pytest.mark.parametrize(("initial", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_backoff_validates(initial: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial, cap, rand=lambda: 0.0)
