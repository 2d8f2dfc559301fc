"""Keepalive and dead-peer detection with time passed in (no clock reads here).

The adapter calls ``poll(now)`` at ``next_deadline()``; it sends a PING when told to and declares the peer
dead when nothing at all has arrived for ``misses`` intervals. Any received frame counts as life, so a
PONG stuck behind a bulk transfer does not kill a busy tunnel. RTT comes from the PONG echoing the ping's
8-byte payload, which encodes a sequence number.
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
    silent_for: float


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
        self.rtt: float | None = None

    def next_deadline(self) -> float:
        return min(self._next_ping, self._last_heard + self.interval * self.misses)

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

    def poll(self, now: float) -> SendPing | PeerDead | None:
        # Compare exactly as next_deadline() computes, or float rounding could keep a due deadline unmet.
        if now >= self._last_heard + self.interval * self.misses:
            return PeerDead(now - self._last_heard)
        if now >= self._next_ping:
            self._next_ping = now + self.interval
            self._seq += 1
            self._sent[self._seq] = now
            for old in [s for s in self._sent if s <= self._seq - self.misses - 1]:
                del self._sent[old]  # bounded: forget pings whose pongs never came
            return SendPing(_SEQ.pack(self._seq))
        return None
