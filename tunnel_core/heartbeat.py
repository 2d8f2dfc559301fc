"""Keepalive and dead-peer detection with time passed in (no clock reads here).

Its owner — :class:`tunnel_core.mux.Mux`, through ``start_keepalive``/``next_deadline``/``handle_timer`` —
calls ``poll(now)`` at ``next_deadline()``; it sends a PING when told to and declares the peer dead when
nothing at all has arrived for ``misses`` intervals. Any received frame counts as life, so a
PONG stuck behind a bulk transfer does not kill a busy tunnel. RTT comes from the PONG echoing the ping's
8-byte payload, which encodes a sequence number.

A peer can also die the other way round: it stops *reading* (a frozen host, a NAT that black-holes one
direction), so our send buffer fills and never drains. The adapter reports when a write finds the buffer
full (``on_send_blocked``, via ``Mux.send_blocked``) and when it drains again (``on_send_drained``); a
buffer that stays full for ``misses`` intervals is the same verdict, ``PeerNotReading``. Both timers run
from this one deadline, so the adapter's one timer never waits on a write to learn that the peer is gone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_SEQ = struct.Struct("!Q")


@dataclass(frozen=True, slots=True)
class SendPing:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class PeerDead:
    """Nothing arrived from the peer for ``silent_for`` seconds."""

    silent_for: float

    def describe(self) -> str:
        return f"peer silent for {self.silent_for:.1f}s"


@dataclass(frozen=True, slots=True)
class PeerNotReading:
    """Our send buffer has been full, without draining, for ``blocked_for`` seconds."""

    blocked_for: float

    def describe(self) -> str:
        return f"peer stopped reading: send buffer full for {self.blocked_for:.1f}s"


class Heartbeat:
    def __init__(self, interval: float, now: float, misses: int = 3) -> None:
        if interval <= 0 or misses < 1:
            raise ValueError("interval must be positive and misses at least 1")
        self.interval = interval
        self.misses = misses
        self._last_heard = now
        self._next_ping = now + interval
        self._seq = 0
        self._sent: dict[int, float] = {}
        self._blocked_since: float | None = None
        self.rtt: float | None = None

    @property
    def dead_after(self) -> float:
        """Seconds of silence (or of a full send buffer) after which the peer is dead."""
        return self.interval * self.misses

    def next_deadline(self) -> float:
        deadline = min(self._next_ping, self._last_heard + self.dead_after)
        if self._blocked_since is not None:
            deadline = min(deadline, self._blocked_since + self.dead_after)
        return deadline

    def on_send_blocked(self, now: float) -> None:
        """A write found the send buffer full; the clock starts at the first such write."""
        if self._blocked_since is None:
            self._blocked_since = now

    def on_send_drained(self) -> None:
        """The send buffer drained: the peer is reading."""
        self._blocked_since = None

    def on_activity(self, now: float) -> None:
        self._last_heard = now

    def on_pong(self, opaque: bytes, now: float) -> float | None:
        """Record the RTT of one of our pings; returns it, or None for an unknown payload."""
        self._last_heard = now
        if len(opaque) != _SEQ.size:
            return None
        sent = self._sent.pop(_SEQ.unpack(opaque)[0], None)
        if sent is None:
            return None
        self.rtt = now - sent
        return self.rtt

    def poll(self, now: float) -> SendPing | PeerDead | PeerNotReading | None:
        # Compare exactly as next_deadline() computes, or float rounding could keep a due deadline unmet.
        if now >= self._last_heard + self.dead_after:
            return PeerDead(now - self._last_heard)
        if self._blocked_since is not None and now >= self._blocked_since + self.dead_after:
            return PeerNotReading(now - self._blocked_since)
        if now >= self._next_ping:
            self._next_ping = now + self.interval
            self._seq += 1
            self._sent[self._seq] = now
            for old in [s for s in self._sent if s <= self._seq - self.misses - 1]:
                del self._sent[old]  # bounded: forget pings whose pongs never came
            return SendPing(_SEQ.pack(self._seq))
        return None
