"""The agent's pure choice between its WireGuard path and the WebSocket fallback; time is a parameter."""

from __future__ import annotations


class TransportPlan:
    """WireGuard first; after it failed, the fallback until ``retry_interval`` passed or a probe answered.

    Times are the caller's clock (monotonic seconds). ``reason`` is why the fallback is in use ("" while
    WireGuard is the choice); ``retry_at`` when WireGuard is next tried (None while it is the choice).
    """

    def __init__(self, retry_interval: float) -> None:
        self.retry_interval = retry_interval
        self.reason = ""
        self.retry_at: float | None = None

    def use_wireguard(self, now: float) -> bool:
        """Should the attempt starting at ``now`` try WireGuard (before any fallback)?"""
        return self.retry_at is None or now >= self.retry_at

    def wireguard_failed(self, now: float, reason: str) -> None:
        """The WireGuard path (an attempt or a probe) failed: fall back, try again in retry_interval."""
        self.reason = reason
        self.retry_at = now + self.retry_interval

    def probe_answered(self, now: float) -> None:
        """A probe reached the relay through WireGuard: the next attempt tries it."""
        self.retry_at = now

    def wireguard_up(self) -> None:
        self.reason = ""
        self.retry_at = None
