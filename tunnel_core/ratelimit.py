"""Per-source token buckets for attempts that cost the relay something (enrollment, wrong admin tokens).

Theory of operation. A token bucket holds at most ``burst`` tokens and gains ``rate`` tokens a second; an
attempt takes one, and an attempt that finds less than one is *throttled* (the caller answers it cheaply,
e.g. HTTP 429, without doing the work). Every source (an IPv4 address; an IPv6 /64, since one host
usually holds a whole /64) has its own bucket, and all sources share one more bucket, so that many
sources cannot add up to an unbounded cost. An attempt draws on the shared bucket only after its source's
bucket allowed it: one noisy source drains its own bucket and at most its own share of the shared one,
never another source's.

Memory is bounded: at most ``max_sources`` sources are tracked, and the one seen least recently is
forgotten first. A forgotten source comes back with a full bucket — the price of the bound; the shared
bucket still caps the total.

Throttled attempts are counted in ``throttled`` (for metrics) and summarised per source for the log:
``due_reports(now)`` hands out, at most once per ``report_interval`` for each source, how many of that
source's attempts were throttled since its previous report. A flood costs one log line per source per
interval, not one per attempt.

Time is a parameter: every method takes ``now`` in seconds (the adapter passes its clock); nothing here
reads a clock, logs or does I/O. Time that goes backwards adds no tokens.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

__all__ = ["RateLimiter", "RateLimits", "ThrottleReport", "TokenBucket", "Verdict", "source_key"]

IPV6_SOURCE_PREFIX = 64


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Every bound of a :class:`RateLimiter`. Rates are tokens (attempts) a second; bursts are whole attempts."""

    per_source_burst: int = 10
    per_source_rate: float = 0.1
    total_burst: int = 100
    total_rate: float = 1.0
    max_sources: int = 10_000
    report_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.per_source_burst < 1 or self.total_burst < 1:
            raise ValueError("bursts must be at least one attempt")
        if not (self.per_source_rate > 0 and self.total_rate > 0):
            raise ValueError("rates must be positive")
        if self.max_sources < 1:
            raise ValueError("max_sources must be at least 1")
        if not self.report_interval > 0:
            raise ValueError("report_interval must be positive")


class TokenBucket:
    """``burst`` tokens at most, ``rate`` more a second; starts full at ``now``."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.tokens = self.burst
        self.updated = now

    def level(self, now: float) -> float:
        """The tokens available at ``now`` (refills; a clock that went backwards refills nothing)."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        return self.tokens

    def wait(self, now: float, cost: float = 1.0) -> float:
        """Seconds from ``now`` until ``cost`` tokens are available (0.0: now)."""
        missing = cost - self.level(now)
        return missing / self.rate if missing > 0 else 0.0

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if they are there; False (and nothing taken) otherwise."""
        if self.level(now) < cost:
            return False
        self.tokens -= cost
        return True

    def full(self, now: float) -> bool:
        return self.level(now) >= self.burst


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`RateLimiter.attempt` decided. ``retry_after`` (seconds) is 0.0 when ``allowed``;
    ``limit`` names the bucket that was empty: ``"source"`` or ``"total"``."""

    allowed: bool
    retry_after: float = 0.0
    limit: Literal["source", "total"] | None = None


@dataclass(frozen=True, slots=True)
class ThrottleReport:
    """``count`` attempts of ``source`` were throttled, the first at ``since``. ``source`` is None for the
    attempts of sources that were forgotten (``max_sources``) before their count was reported."""

    source: str | None
    count: int
    since: float


class _Source:
    __slots__ = ("bucket", "pending", "pending_since", "reported_at")

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket
        self.pending = 0  # throttled attempts not yet in a report
        self.pending_since = 0.0
        self.reported_at: float | None = None


class RateLimiter:
    """A token bucket per source plus one shared by all; see the module docstring.

    Call :meth:`attempt` once per attempt that should count, *before* doing its work; do the work only if
    the verdict ``allowed`` it. Call :meth:`due_reports` now and then (e.g. every second) and log what it
    returns. ``throttled`` counts every refused attempt since construction.
    """

    def __init__(self, limits: RateLimits | None = None, now: float = 0.0) -> None:
        self.limits = RateLimits() if limits is None else limits
        self.throttled = 0
        self._total = TokenBucket(self.limits.total_burst, self.limits.total_rate, now)
        self._sources: OrderedDict[str, _Source] = OrderedDict()  # least recently seen first
        self._forgotten = 0  # throttled attempts of sources forgotten before they were reported
        self._forgotten_since = 0.0

    def __len__(self) -> int:
        """How many sources are tracked (never more than ``limits.max_sources``)."""
        return len(self._sources)

    def attempt(self, source: str, now: float) -> Verdict:
        """Count one attempt of ``source`` at ``now``: allowed, or throttled with when to retry."""
        entry = self._seen(source, now)
        verdict = self._decide(entry.bucket, now)
        if not verdict.allowed:
            self.throttled += 1
            if entry.pending == 0:
                entry.pending_since = now
            entry.pending += 1
        return verdict

    def retry_after(self, source: str, now: float) -> float:
        """Seconds until an attempt of ``source`` would be allowed (0.0: now); counts nothing."""
        entry = self._sources.get(source)
        own = entry.bucket.wait(now) if entry is not None else 0.0
        return max(own, self._total.wait(now))

    def due_reports(self, now: float) -> list[ThrottleReport]:
        """Throttled counts that may be logged now: at most one per source per ``report_interval``."""
        interval = self.limits.report_interval
        reports = []
        for source, entry in self._sources.items():
            if entry.pending and (entry.reported_at is None or now - entry.reported_at >= interval):
                reports.append(ThrottleReport(source, entry.pending, entry.pending_since))
                entry.pending, entry.reported_at = 0, now
        if self._forgotten:
            reports.append(ThrottleReport(None, self._forgotten, self._forgotten_since))
            self._forgotten = 0
        return reports

    def _decide(self, bucket: TokenBucket, now: float) -> Verdict:
        if bucket.level(now) < 1.0:
            return Verdict(False, bucket.wait(now), "source")
        if not self._total.take(now):
            return Verdict(False, self._total.wait(now), "total")
        bucket.take(now)
        return Verdict(True)

    def _seen(self, source: str, now: float) -> _Source:
        entry = self._sources.get(source)
        if entry is not None:
            self._sources.move_to_end(source)
            return entry
        while len(self._sources) >= self.limits.max_sources:
            self._forget_oldest()
        entry = self._sources[source] = _Source(
            TokenBucket(self.limits.per_source_burst, self.limits.per_source_rate, now))
        return entry

    def _forget_oldest(self) -> None:
        _, old = self._sources.popitem(last=False)
        if old.pending:
            if self._forgotten == 0:
                self._forgotten_since = old.pending_since
            self._forgotten += old.pending


def source_key(address: str | None) -> str:
    """The source a peer address counts as: an IPv4 address as it is; an IPv6 address as its /64; an
    IPv4-mapped IPv6 address as the IPv4 address; anything else (None, a UNIX socket) as itself or
    ``"unknown"``."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_SOURCE_PREFIX), strict=False))
    return str(ip)
