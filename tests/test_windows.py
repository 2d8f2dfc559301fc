"""tunnel_core.windows: one window type for stream and connection credit (docs/protocol.md §6).

The reference models below are the two credit-return rules as the protocol states them (and as ``Mux``
wrote them out twice before they became one type); a hypothesis run drives both with the same steps.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel_core.errors import UsageError
from tunnel_core.limits import INITIAL_WINDOW, KIB, MIB
from tunnel_core.windows import MAX_WINDOW, Window


def test_a_stream_owes_its_configured_credit_until_the_peer_used_half_the_initial_window() -> None:
    w = Window(4 * MIB)
    assert (w.send, w.recv, w.owed) == (INITIAL_WINDOW, INITIAL_WINDOW, 4 * MIB - INITIAL_WINDOW)
    w.arrived(300)  # an A-ASSOCIATE-RQ
    assert w.consume(300) == 0  # a short exchange costs no WINDOW
    w.arrived(INITIAL_WINDOW // 2)
    assert w.recv < INITIAL_WINDOW // 2
    assert w.consume(1) == 301 + 4 * MIB - INITIAL_WINDOW  # everything consumed, plus all that is owed
    assert w.owed == 0 and w.unreturned == 0
    assert w.recv == 4 * MIB - 300 - INITIAL_WINDOW // 2 + 301


def test_half_window_hysteresis() -> None:
    w = Window(256 * KIB)  # nothing owed
    w.arrived(256 * KIB)
    assert w.consume(128 * KIB - 1) == 0
    assert w.consume(1) == 128 * KIB
    assert w.recv == 128 * KIB


def test_the_connection_returns_credit_at_once_when_the_peer_has_run_out() -> None:
    w = Window(1 * MIB, return_when_exhausted=True)
    assert w.grant_owed() == 1 * MIB - INITIAL_WINDOW
    assert w.grant_owed() == 0
    w.arrived(1 * MIB - 10)  # stalled streams hold nearly all of it
    assert w.consume(9) == 0  # 9 < the 10 the peer has left
    assert w.consume(1) == 10  # now what we hold back reaches what the peer has: return it
    stream = Window(1 * MIB)
    stream.grant_owed()
    stream.arrived(1 * MIB - 10)
    assert stream.consume(10) == 0  # a stream waits for half its window


def test_no_credit_after_the_peer_finished() -> None:
    w = Window(256 * KIB)
    w.arrived(200 * KIB)
    assert w.consume(200 * KIB, returning=False) == 0
    assert w.held == 0 and w.unreturned == 0


def test_consuming_more_than_held_changes_nothing() -> None:
    w = Window(256 * KIB)
    w.arrived(3)
    for n in (4, -1):
        with pytest.raises(UsageError):
            w.consume(n)
    assert (w.held, w.unreturned, w.recv) == (3, 0, INITIAL_WINDOW - 3)
    assert w.consume(3) == 0


def test_send_credit_and_its_overflow() -> None:
    w = Window(INITIAL_WINDOW)
    w.spend(INITIAL_WINDOW)
    assert w.send == 0
    assert w.raise_send(MAX_WINDOW)
    assert not w.raise_send(1)  # would pass 2**31 - 1: refused, unchanged
    assert w.send == MAX_WINDOW


@pytest.mark.parametrize("size", [INITIAL_WINDOW - 1, MAX_WINDOW + 1])
def test_size_is_validated(size: int) -> None:
    with pytest.raises(ValueError):
        Window(size)


# --- the same rules as the protocol states them, twice ---------------------------------------------------


class StreamModel:
    def __init__(self, size: int) -> None:
        self.size, self.recv, self.held, self.unacked = size, INITIAL_WINDOW, 0, 0
        self.owed = size - INITIAL_WINDOW

    def consume(self, n: int) -> int:
        self.held -= n
        self.unacked += n
        if self.unacked >= self.size // 2 or (self.owed and self.recv < INITIAL_WINDOW // 2):
            credit = self.unacked + self.owed
            self.recv += credit
            self.unacked = self.owed = 0
            return credit
        return 0


class ConnectionModel:
    def __init__(self, size: int) -> None:
        self.size, self.recv, self.held, self.unacked = size, size, 0, 0

    def consume(self, n: int) -> int:
        self.held -= n
        self.unacked += n
        credit = self.unacked
        if credit and (credit >= self.size // 2 or credit >= self.recv):
            self.recv += credit
            self.unacked = 0
            return credit
        return 0


@settings(max_examples=300, deadline=None)
@given(size=st.integers(INITIAL_WINDOW, 8 * MIB), connection=st.booleans(),
       steps=st.lists(st.tuples(st.booleans(), st.floats(0.0, 1.0)), max_size=60))
def test_one_window_type_keeps_both_rules(size: int, connection: bool, steps: list[tuple[bool, float]]) -> None:
    window = Window(size, return_when_exhausted=connection)
    model: StreamModel | ConnectionModel
    if connection:
        window.grant_owed()
        model = ConnectionModel(size)
    else:
        model = StreamModel(size)
    for arrive, fraction in steps:
        if arrive:
            n = int(window.recv * fraction)
            assert window.fits(n)
            window.arrived(n)
            model.recv -= n
            model.held += n
        else:
            n = int(window.held * fraction)
            assert window.consume(n) == model.consume(n)
        assert (window.recv, window.held) == (model.recv, model.held)
        assert window.recv >= 0 and window.held >= 0
        assert window.recv + window.held + window.unreturned <= size  # never more credit out than configured
