"""tunnel_core.ratelimit: token buckets per source and in total, bounded, with time passed in.

Exact examples on a fake clock, then hypothesis properties over any sequence of attempts: no source gets more
than its burst plus its rate over the time elapsed, nor all sources together more than the total's; one
source's attempts never change another's verdicts while the total is not the limit; memory stays bounded;
every throttled attempt is counted once and reported at most once per interval.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel_core.ratelimit import RateLimiter, RateLimits, ThrottleReport, TokenBucket, source_key

ROOMY = 10**9  # a total bucket so large it never decides


def test_bucket_starts_full_refills_at_its_rate_and_caps_at_its_burst():
    bucket = TokenBucket(burst=3, rate=0.5, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(100.0) == pytest.approx(2.0)
    assert not bucket.take(101.9)
    assert bucket.take(102.0)  # one token after two seconds at 0.5/s
    assert bucket.level(10_000.0) == 3.0  # never more than the burst
    assert bucket.full(10_000.0)


def test_a_clock_that_goes_backwards_adds_nothing():
    bucket = TokenBucket(burst=1, rate=1.0, now=50.0)
    assert bucket.take(50.0)
    assert bucket.level(10.0) == 0.0
    assert not bucket.take(49.0)
    assert bucket.take(51.0)


def test_source_burst_then_throttled_with_retry_after_and_counted():
    limiter = RateLimiter(RateLimits(per_source_burst=2, per_source_rate=0.1, total_burst=ROOMY), now=0.0)
    assert [limiter.attempt("a", 0.0).allowed for _ in range(2)] == [True, True]
    refused = limiter.attempt("a", 1.0)
    assert not refused.allowed and refused.limit == "source"
    assert refused.retry_after == pytest.approx(9.0)  # one token at 0.1/s, one second of it already gone
    assert limiter.throttled == 1
    assert limiter.attempt("a", 1.0 + refused.retry_after).allowed
    assert limiter.attempt("b", 1.0).allowed  # another source has its own bucket


def test_the_total_bucket_caps_all_sources_and_a_refused_source_does_not_drain_it():
    limiter = RateLimiter(RateLimits(per_source_burst=2, per_source_rate=0.001, total_burst=5, total_rate=0.5))
    for _ in range(1000):
        limiter.attempt("noisy", 0.0)  # two allowed, then throttled by its own bucket: the total keeps 3
    assert [limiter.attempt(s, 0.0).allowed for s in ("b", "c", "d")] == [True, True, True]
    refused = limiter.attempt("e", 0.0)
    assert not refused.allowed and refused.limit == "total" and refused.retry_after == pytest.approx(2.0)
    assert limiter.attempt("e", 2.0).allowed  # its own bucket was not charged for the refusal
    assert limiter.throttled == 998 + 1


def test_tracked_sources_are_bounded_and_the_least_recently_seen_goes_first():
    limiter = RateLimiter(RateLimits(per_source_burst=1, per_source_rate=0.001, total_burst=ROOMY, max_sources=3))
    for source in ("a", "b", "c"):
        limiter.attempt(source, 0.0)
    assert not limiter.attempt("a", 1.0).allowed  # "a" is now the most recently seen
    limiter.attempt("d", 1.0)  # forgets "b"
    assert len(limiter) == 3
    assert limiter.attempt("b", 2.0).allowed  # came back with a full bucket
    assert not limiter.attempt("a", 2.0).allowed  # still remembered, still empty


def test_reports_come_once_an_interval_per_source_with_the_count_since_the_last():
    limiter = RateLimiter(RateLimits(per_source_burst=1, per_source_rate=1e-6, total_burst=ROOMY,
                                     report_interval=60.0))
    limiter.attempt("a", 0.0)
    for t in range(1, 6):
        limiter.attempt("a", float(t))
    assert limiter.due_reports(6.0) == [ThrottleReport("a", 5, 1.0)]
    for t in range(7, 10):
        limiter.attempt("a", float(t))
    assert limiter.due_reports(30.0) == []  # reported 24 s ago: wait for the interval
    assert limiter.due_reports(66.0) == [ThrottleReport("a", 3, 7.0)]
    assert limiter.due_reports(500.0) == []  # nothing new


def test_counts_of_forgotten_sources_are_still_reported():
    limiter = RateLimiter(RateLimits(per_source_burst=1, per_source_rate=1e-6, total_burst=ROOMY, max_sources=1))
    limiter.attempt("a", 0.0)
    limiter.attempt("a", 1.0)
    limiter.attempt("b", 2.0)  # forgets "a" with one unreported refusal
    assert limiter.due_reports(3.0) == [ThrottleReport(None, 1, 1.0)]


def test_retry_after_looks_without_counting():
    limiter = RateLimiter(RateLimits(per_source_burst=1, per_source_rate=0.5, total_burst=ROOMY))
    assert limiter.retry_after("a", 0.0) == 0.0
    limiter.attempt("a", 0.0)
    assert limiter.retry_after("a", 0.0) == pytest.approx(2.0) and limiter.throttled == 0


@pytest.mark.parametrize("bad", [dict(per_source_burst=0), dict(total_burst=0), dict(per_source_rate=0.0),
                                 dict(total_rate=-1.0), dict(max_sources=0), dict(report_interval=0.0)])
def test_limits_refuse_nonsense(bad):
    with pytest.raises(ValueError):
        RateLimits(**bad)


@pytest.mark.parametrize(("address", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),  # the same /64: one host, one bucket
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("fe80::1%eth0", "fe80::/64"),
    (None, "unknown"),
    ("", "unknown"),
    ("/run/relay.sock", "/run/relay.sock"),
])
def test_source_keys(address, key):
    assert source_key(address) == key


# --- properties ------------------------------------------------------------------------------------------

SOURCES = st.sampled_from(["a", "b", "c", "d", "e"])
GAPS = st.one_of(st.just(0.0), st.floats(0.0, 0.2), st.floats(0.0, 5.0))  # bursts, trickles and pauses
ATTEMPTS = st.lists(st.tuples(SOURCES, GAPS), max_size=200)
LIMITS = st.builds(RateLimits, per_source_burst=st.integers(1, 8), per_source_rate=st.floats(0.01, 5.0),
                   total_burst=st.integers(1, 20), total_rate=st.floats(0.01, 10.0), max_sources=st.integers(1, 6),
                   report_interval=st.floats(0.5, 30.0))


def _run(limits: RateLimits, steps: list[tuple[str, float]]):
    """Feed attempts with increasing time (each step's float is the gap since the previous attempt)."""
    limiter = RateLimiter(limits, now=0.0)
    now, log = 0.0, []
    for source, gap in steps:
        now += gap
        log.append((source, now, limiter.attempt(source, now)))
    return limiter, log


@settings(max_examples=300, deadline=None)
@given(LIMITS, ATTEMPTS)
def test_nobody_gets_more_than_burst_plus_rate_times_elapsed(limits, steps):
    limiter, log = _run(limits, steps)
    allowed = [(s, t) for s, t, v in log if v.allowed]
    span = log[-1][1] if log else 0.0
    slack = 1e-6
    assert len(allowed) <= limits.total_burst + limits.total_rate * span + slack
    if limits.max_sources >= 5:  # nobody forgotten: a source's own bound holds over the whole run
        for source in "abcde":
            mine = [t for s, t in allowed if s == source]
            if mine:
                assert len(mine) <= limits.per_source_burst + limits.per_source_rate * (mine[-1] - mine[0]) + slack
    assert len(limiter) <= limits.max_sources
    assert limiter.throttled == sum(1 for *_, v in log if not v.allowed)


@settings(max_examples=300, deadline=None)
@given(LIMITS, ATTEMPTS)
def test_another_source_never_changes_my_verdicts_when_the_total_is_not_the_limit(limits, steps):
    roomy = RateLimits(per_source_burst=limits.per_source_burst, per_source_rate=limits.per_source_rate,
                       total_burst=ROOMY, max_sources=10)
    _, together = _run(roomy, steps)
    mine_together = [v.allowed for s, _, v in together if s == "a"]
    limiter, alone = RateLimiter(roomy, now=0.0), []
    for source, now, _ in together:
        if source == "a":
            alone.append(limiter.attempt("a", now).allowed)
    assert mine_together == alone


@settings(max_examples=300, deadline=None)
@given(LIMITS, ATTEMPTS, st.lists(st.floats(0.0, 40.0), max_size=10))
def test_every_throttled_attempt_is_reported_once_and_each_source_at_most_once_an_interval(limits, steps, looks):
    limiter = RateLimiter(limits, now=0.0)
    now, last_report, reported = 0.0, {}, 0
    looks = list(looks)
    for source, gap in steps:
        now += gap
        limiter.attempt(source, now)
        if looks and gap > 2.5:
            now += looks.pop()
            for report in limiter.due_reports(now):
                if report.source is not None:
                    if report.source in last_report:
                        assert now - last_report[report.source] >= limits.report_interval
                    last_report[report.source] = now
                assert report.count >= 1
                reported += report.count
    reported += sum(r.count for r in limiter.due_reports(math.inf))
    assert reported == limiter.throttled
