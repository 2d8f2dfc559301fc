"""What the relay puts in front of its HTTP handlers: per-source throttles, a Host allow-list, no Server header.

Theory of operation:

- **Throttles.** Each relay has two :class:`tunnel_core.ratelimit.RateLimiter` (``Relay.guards``):
  ``enroll`` counts every attempt at the enrollment endpoints of the tunnel port (``relay.enroll``), and
  ``login`` counts every *wrong* admin token presented to the admin port (dashboard login, bearer token;
  a right token is checked first and never counted, so it is never locked out). A throttled request is
  answered 429 with ``Retry-After`` by :func:`throttled_response` before any work: nothing is read, written
  to the registry or logged for it. :func:`report_throttles` (a cleanup context on the app) logs each source's
  throttled count at most once per ``report_interval``, and ``/metrics`` shows the totals
  (``dicom_tunnel_throttled_total{endpoint}``).
- **Host allow-list** (admin port, :func:`host_allowlist`): a DNS-rebinding page reaches a loopback port
  under the attacker's *name*, so the admin port answers only to ``localhost``, IP literals (a browser
  cannot rebind those; probes and scrapers address by IP) and the names in ``[admin] allowed_hosts``.
  Anything else, or no Host at all, is 421 before any handler runs.
- **No Server header**: every app is served through ``tunnel_link.httpserver.app_runner``, which removes
  aiohttp's version banner.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from tunnel_core.ratelimit import RateLimiter, ThrottleReport, Verdict, source_key
from tunnel_link.aio import cancel_and_wait

if TYPE_CHECKING:
    from relay.config import RelaySettings

__all__ = [
    "RelayGuards",
    "make_guards",
    "host_allowed",
    "host_allowlist",
    "parse_host",
    "report_throttles",
    "throttled_response",
]

REPORT_POLL = 1.0  # seconds between looks for due throttle reports; each source is still logged once an interval
LOOPBACK_NAMES = frozenset({"localhost"})
MISDIRECTED_BODY = ("misdirected request: this port answers only to localhost, IP addresses and the names "
                    "in [admin] allowed_hosts\n")


@dataclass
class RelayGuards:
    """One relay's throttles and refusal counts; read by ``relay.metrics``. Make with :func:`make_guards`."""

    enroll: RateLimiter
    login: RateLimiter
    misdirected: int = 0  # admin-port requests refused for their Host header


def make_guards(settings: RelaySettings, now: float) -> RelayGuards:
    """Fresh guards from the relay's settings (``[enrollment.rate_limit]``, ``[admin.login_rate_limit]``)."""
    return RelayGuards(enroll=RateLimiter(settings.enrollment.rate_limit.to_limits(), now=now),
                       login=RateLimiter(settings.admin.login_rate_limit.to_limits(), now=now))


# --- throttles ---------------------------------------------------------------------------------------------


def attempt(limiter: RateLimiter, request: web.Request) -> Verdict:
    """Count one attempt of the request's source (its address; an IPv6 /64) at the current time."""
    return limiter.attempt(source_key(request.remote), time.time())


def retry_after_header(verdict: Verdict) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(verdict.retry_after)))}


def throttled_response(verdict: Verdict, what: str) -> web.Response:
    """The 429 for a throttled request: a short JSON body and ``Retry-After`` (whole seconds, at least 1)."""
    return web.json_response({"error": f"too many {what} from this address; retry later"}, status=429,
                             headers=retry_after_header(verdict))


def report_throttles(limiter: RateLimiter, logger: logging.Logger, what: str,
                     poll: float = REPORT_POLL) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup context that logs ``limiter``'s due reports (one line per source per interval)."""
    async def reporting(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_report_forever(limiter, logger, what, poll))
        yield
        await cancel_and_wait(task)
        log_reports(limiter.due_reports(math.inf), logger, what)  # the last counts, before the app goes
    return reporting


def log_reports(reports: Iterable[ThrottleReport], logger: logging.Logger, what: str) -> None:
    now = time.time()
    for report in reports:
        source = report.source if report.source is not None else "sources no longer tracked"
        logger.warning("throttled %d %s from %s in the last %.0f s", report.count, what, source,
                       max(0.0, now - report.since))


async def _report_forever(limiter: RateLimiter, logger: logging.Logger, what: str, poll: float) -> None:
    while True:
        await asyncio.sleep(poll)
        log_reports(limiter.due_reports(time.time()), logger, what)


# --- Host allow-list -----------------------------------------------------------------------------------


def parse_host(value: str) -> str | None:
    """The host part of a ``Host`` header, lowercased, without port or trailing dot; None if malformed.

    ``name``, ``name:port``, ``1.2.3.4:port``, ``[::1]`` and ``[::1]:port`` parse; a bare IPv6 address
    (no brackets) or a non-numeric port does not."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or not _is_ip(value[1:end], version=6):
            return None
        host, rest = value[1:end], value[end + 1:]
    else:
        host, sep, rest = value.partition(":")
        rest = sep + rest
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
        return None
    host = host.rstrip(".")
    return host or None


def host_allowed(value: str | None, names: frozenset[str]) -> bool:
    """True if a request with ``Host: value`` may be answered: ``localhost``, any IP literal, or a name in
    ``names`` (lowercase, no port)."""
    host = parse_host(value) if value is not None else None
    if host is None:
        return False
    return host in LOOPBACK_NAMES or host in names or _is_ip(host)


def host_allowlist(names: Iterable[str], on_refused: Callable[[], None] | None = None):
    """An aiohttp middleware: requests whose Host is not allowed (:func:`host_allowed`) get 421 and a short
    body before any handler runs. ``names``: the extra names to accept (``[admin] allowed_hosts``)."""
    allowed = frozenset(n.lower().rstrip(".") for n in names)

    @web.middleware
    async def check_host(request: web.Request, handler):
        if not host_allowed(request.headers.get("Host"), allowed):
            if on_refused is not None:
                on_refused()
            return web.Response(status=421, text=MISDIRECTED_BODY)  # the refused name is not echoed back
        return await handler(request)
    return check_host


def _is_ip(host: str, version: int | None = None) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return version is None or ip.version == version
