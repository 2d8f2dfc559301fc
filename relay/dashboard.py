"""The relay's ops dashboard on the admin port: a login, an overview of every site, a page per site.

Theory of operation: the pages are static files (``relay/static/``) with no data in them; their script
polls ``/api/dashboard`` (and ``/api/dashboard/sites/{name}``) every two seconds and writes what it gets
into the page as text. Everything is served from the package, so the dashboard works offline, and the
Content-Security-Policy allows nothing but this origin (no inline script, no CDN).

Who may look: whoever knows the admin token (``{state_dir}/admin.token``, the same secret as the admin
API's bearer token). ``POST /login`` checks it once and hands out a session cookie (random, HttpOnly,
SameSite=Strict); the session table lives here, in memory, bounded, each entry expiring after
``SESSION_TTL``. The given token is compared with the right one first, in constant time: the right token
always logs in, whatever came before. Only a wrong one counts, against the source's bucket in the login
limiter (``[admin.login_rate_limit]``, ``relay.guard``); beyond it that source's wrong tokens are answered
429 with ``Retry-After``, and other sources are not affected. ``POST /logout`` needs the session's CSRF
token, which the data API hands to the page's script.

What it shows comes from the relay's status snapshot (``relay.status``: the site condition decided by
``tunnel_core.health.site_condition``, the agent's health report, the associations in progress) plus two
things only the dashboard keeps, sampled every ``SAMPLE_INTERVAL`` seconds: bytes per site (from the
associations the tracker holds; an association's byte counts are final, and counted, when it ends, so a
long transfer shows as throughput when it finishes) and the tracker's cumulative outcome counts every
``HISTORY_INTERVAL`` seconds in a ring buffer. Both are bounded in memory.

Routes (:func:`add_routes`, on the admin app, which the composition root ``relay.server`` builds):
- ``GET /login``, ``POST /login``, ``POST /logout``
- ``GET /`` overview page, ``GET /sites/{name}`` one site's page (redirect to ``/login`` without a session)
- ``GET /api/dashboard``, ``GET /api/dashboard/sites/{name}`` the pages' data (session cookie or bearer token)
- ``GET /static/...`` the pages' script and style (public: nothing secret in them)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from relay import guard
from relay.sites import SiteTable
from relay.status import RegisteredSite, RelayStatus, SiteStatus
from tunnel_core.health import DestinationReport, Readiness
from tunnel_core.ratelimit import RateLimiter, RateLimits
from tunnel_link.aio import cancel_and_wait
from tunnel_link.associations import Association, AssociationTracker

log = logging.getLogger("relay.dashboard")

__all__ = [
    "Dashboard",
    "DashboardSource",
    "OutcomeHistory",
    "SessionStore",
    "TrafficMeter",
    "add_routes",
    "classify_outcome",
    "is_data_path",
]

SESSION_COOKIE = "relay_session"
SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 64  # a full table drops its oldest session; memory stays bounded whoever logs in
SAMPLE_INTERVAL = 0.25  # short associations between two samples are missed; keep the gap small
HISTORY_INTERVAL = 10.0
HISTORY_BUCKETS = 180  # 30 minutes of 10 s buckets
RATE_WINDOW = 10.0  # throughput is averaged over this many seconds
RECENT_PER_SITE = 20
MAX_REASONS = 32  # distinct outcome names kept per history bucket (the rest are summed as "other")
DATA_PATH = "/api/dashboard"
STATIC_DIR = Path(__file__).with_name("static")

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def is_data_path(path: str) -> bool:
    """The dashboard's data API, which a session cookie may read (other ``/api/`` paths need the bearer token)."""
    return path == DATA_PATH or path.startswith(DATA_PATH + "/")


# --- sessions (pure: the clock is a parameter) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    csrf: str
    created: float
    expires: float


class SessionStore:
    """Logged-in browsers. Keyed by a digest of the cookie, so a lookup's timing says nothing about it."""

    def __init__(self, ttl: float = SESSION_TTL, max_sessions: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, now: float) -> tuple[str, Session]:
        """A new session; returns the cookie value (only ever held by the browser) and the session."""
        self._purge(now)
        while len(self._sessions) >= self.max_sessions:
            del self._sessions[next(iter(self._sessions))]  # insertion order: the oldest goes first
        session_id = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), now, now + self.ttl)
        self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None, now: float) -> Session | None:
        if not session_id:
            return None
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is not None and now >= session.expires:
            del self._sessions[key]
            return None
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)

    def _purge(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if now >= s.expires]:
            del self._sessions[key]


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


# --- what the dashboard keeps: outcome history and bytes per site (pure) ---------------------------------


def classify_outcome(outcome: str) -> str:
    """``completed``; ``rejected`` (never reached the destination's DICOM peer); or ``failed`` (ended abnormally)."""
    if outcome == "completed":
        return "completed"
    if outcome.startswith(("rejected:", "refused:", "bad-first-pdu:")) or outcome in {
            "artim-timeout", "closed-before-associate", "destination-unreachable"}:
        return "rejected"
    return "failed"


class OutcomeHistory:
    """Samples of the tracker's cumulative outcome counts, one per ``interval``; at most ``buckets`` + 1 kept."""

    def __init__(self, interval: float = HISTORY_INTERVAL, buckets: int = HISTORY_BUCKETS) -> None:
        self.interval = interval
        self._samples: deque[tuple[float, dict[str, int]]] = deque(maxlen=buckets + 1)

    def sample(self, totals: Mapping[str, int], now: float) -> None:
        """Keep ``totals`` if the last kept sample is at least one interval old."""
        if not self._samples or now - self._samples[-1][0] >= self.interval:
            self._samples.append((now, dict(totals)))

    def series(self, totals: Mapping[str, int], now: float) -> list[dict[str, Any]]:
        """One bucket per pair of samples, oldest first; the last runs from the newest sample to ``totals`` now."""
        points = [*self._samples, (now, dict(totals))]
        return [_bucket(t0, before, t1, after) for (t0, before), (t1, after) in zip(points, points[1:], strict=False)]


def _bucket(start: float, before: Mapping[str, int], end: float, after: Mapping[str, int]) -> dict[str, Any]:
    deltas = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
    kinds = {"completed": 0, "rejected": 0, "failed": 0}
    for outcome, n in deltas.items():
        kinds[classify_outcome(outcome)] += n
    return {"start": start, "end": end, **kinds, "reasons": _capped(deltas)}


def _capped(counts: Mapping[str, int]) -> dict[str, int]:
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(ordered[:MAX_REASONS])
    rest = sum(n for _, n in ordered[MAX_REASONS:])
    if rest:
        kept["other"] = kept.get("other", 0) + rest
    return kept


def _site_bytes(assoc: Association) -> tuple[int, int]:
    """(to the site, from the site) for one association, whichever side called."""
    if assoc.direction == "site-to-cloud":
        return assoc.bytes_to_caller, assoc.bytes_from_caller
    return assoc.bytes_from_caller, assoc.bytes_to_caller


class TrafficMeter:
    """Bytes to and from each site and their rate, from the associations the tracker holds.

    Call ``observe`` with the tracker's active associations now and then (the dashboard: every ``SAMPLE_INTERVAL``).
    An association's byte counts are final once it ends; ``ended`` (the tracker's finish listener) adds
    them to its site's totals and recent list, so even one that starts and ends between two samples counts.
    """

    def __init__(self, window: float = RATE_WINDOW, recent: int = RECENT_PER_SITE) -> None:
        self.window = window
        self._recent_size = recent
        self._watching: dict[str, Association] = {}
        self._done: dict[str, tuple[int, int]] = {}
        self._points: dict[str, deque[tuple[float, int, int]]] = {}
        self._recent: dict[str, deque[dict[str, Any]]] = {}
        self._totals: dict[str, tuple[int, int]] = {}

    def ended(self, assoc: Association, now: float) -> None:
        """An association is over (the tracker's finish listener): its bytes are final, count them."""
        self._watching.pop(assoc.id, None)
        if assoc.site:
            to_site, from_site = _site_bytes(assoc)
            done = self._done.get(assoc.site, (0, 0))
            self._done[assoc.site] = (done[0] + to_site, done[1] + from_site)
            recent = self._recent.setdefault(assoc.site, deque(maxlen=self._recent_size))
            recent.appendleft({**assoc.as_dict(), "ended": now})

    def observe(self, active: Mapping[str, Association], now: float, sites: Iterable[str]) -> None:
        for assoc_id in [a for a in self._watching if a not in active]:
            self.ended(self._watching[assoc_id], now)  # without a finish listener: seen to have left
        self._watching.update(active)
        live: dict[str, tuple[int, int]] = {}
        for assoc in self._watching.values():  # one pass, whatever the number of sites
            if assoc.site:
                more, so_far = _site_bytes(assoc), live.get(assoc.site, (0, 0))
                live[assoc.site] = (so_far[0] + more[0], so_far[1] + more[1])
        self._totals = {}
        for site in sites:
            done, more = self._done.get(site, (0, 0)), live.get(site, (0, 0))
            to_site, from_site = self._totals[site] = (done[0] + more[0], done[1] + more[1])
            points = self._points.setdefault(site, deque())
            points.append((now, to_site, from_site))
            while len(points) > 2 and now - points[1][0] >= self.window:
                points.popleft()  # keep one point at least ``window`` old, to average over

    def totals(self, site: str) -> tuple[int, int]:
        """Bytes to and from ``site`` as of the last ``observe`` (ended associations, plus what the active ones
        have counted so far)."""
        return self._totals.get(site, (0, 0))

    def rate(self, site: str) -> tuple[float, float] | None:
        """Bytes per second to and from ``site`` over the last ``window`` seconds; None before two samples."""
        points = self._points.get(site)
        if not points or len(points) < 2 or points[-1][0] <= points[0][0]:
            return None
        (t0, to0, from0), (t1, to1, from1) = points[0], points[-1]
        return (to1 - to0) / (t1 - t0), (from1 - from0) / (t1 - t0)

    def recent(self, site: str) -> list[dict[str, Any]]:
        return list(self._recent.get(site, ()))


# --- the views -------------------------------------------------------------------------------------------


class DashboardSource(Protocol):
    """What the dashboard reads of the relay (``relay.status.StatusSource``)."""

    def snapshot(self) -> RelayStatus: ...

    def readiness(self) -> Readiness: ...

    async def registered_sites(self) -> list[RegisteredSite]: ...

    async def presence(self) -> dict[str, list[tuple[str, list[str]]]]: ...


class Dashboard:
    """The dashboard's state for one relay: sessions, sampled history, and the limiter its wrong logins count
    against (shared with the admin API's bearer token; ``relay.guard``). Build with the status it shows, the
    site table (routes and destinations of a site's page), the association tracker it samples, and the admin
    token; then :func:`add_routes`."""

    def __init__(self, status: DashboardSource, sites: SiteTable, tracker: AssociationTracker, admin_token: str,
                 login_limiter: RateLimiter | None = None) -> None:
        self.status = status
        self.sites = sites
        self.tracker = tracker
        self._token = admin_token.encode()
        self.sessions = SessionStore()
        self.login_limiter = RateLimiter(RateLimits(), time.time()) if login_limiter is None else login_limiter
        self.history = OutcomeHistory()
        self.traffic = TrafficMeter()
        tracker.finish_listeners.append(lambda assoc: self.traffic.ended(assoc, time.time()))

    def token_matches(self, given: str) -> bool:
        """Constant-time comparison with the admin token (surrounding whitespace ignored)."""
        return hmac.compare_digest(given.strip().encode(), self._token)

    def session_of(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE), time.time())

    def session_allows(self, request: web.Request) -> bool:
        """True for a request to the data API that carries a live session cookie."""
        return is_data_path(request.path) and self.session_of(request) is not None

    def sample(self, now: float) -> None:
        self.traffic.observe(self.tracker.active, now, self.sites.sites)
        self.history.sample(self.tracker.outcomes, now)

    async def sample_forever(self) -> None:
        while True:
            try:
                self.sample(time.time())
            except Exception:  # a bad sample must not end the sampling; say so and carry on
                log.exception("dashboard sample failed")
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def overview(self, now: float, session: Session | None) -> dict[str, Any]:
        status = self.status.snapshot()
        ready = self.status.readiness()
        registered = await self.status.registered_sites()
        holders = await self.status.presence()
        return {
            "now": now,
            "session": _session_view(session),
            "relay": {"started": status.started, "ready": ready.ready, "ready_reason": ready.reason,
                      "process": status.process.as_dict(), "active_associations": len(status.associations)},
            "sites": [{**self._site_row(s), "tunnels_on": [{"relay": relay, "agents": agents}
                                                            for relay, agents in holders.get(s.name, [])]}
                      for s in self._all_sites(status, now, registered)],
            "outcomes": {"interval_s": self.history.interval, "totals": dict(status.outcomes),
                         "series": self.history.series(status.outcomes, now)},
        }

    async def site_detail(self, name: str, now: float, session: Session | None) -> dict[str, Any] | None:
        status = self.status.snapshot()
        registered = await self.status.registered_sites()
        record = next((r for r in registered if r.name == name), None)
        row = next((s for s in self._all_sites(status, now, registered) if s.name == name), None)
        if row is None and record is None:
            return None
        state = self.sites.sites.get(name)
        report = row.health if row else None
        return {
            "now": now,
            "session": _session_view(session),
            "name": name,
            "site": self._site_row(row) if row else None,
            "registry": record.as_dict() if record else None,
            "echo_destinations": [asdict(d) for d in report.destinations] if report else [],
            "spool_destinations": [asdict(d) for d in report.spool] if report else [],
            "relay_destinations": [
                {"called_ae": d.name, "host": d.host, "port": d.port,
                 "allowed_calling_aes": sorted(d.allowed_calling_aes)}
                for d in (state.destinations.values() if state else ())],
            "listener_routes": [
                {"listener": listener, "called_ae": r.called_ae, "route": r.route,
                 "allowed_calling_aes": sorted(r.allowed_calling_aes)}
                for listener, table in self.sites.tables.items() for r in table.values() if r.site == name],
            "active": [a.as_dict() for a in status.associations if a.site == name],
            "recent": self.traffic.recent(name),
        }

    @staticmethod
    def _all_sites(status: RelayStatus, now: float, registered: list[RegisteredSite]) -> list[SiteStatus]:
        """The sites of the snapshot, then every unrevoked site only the registry knows (enrolled, never
        connected, no routes): those are down, for the reason ``site_condition`` gives a site never seen."""
        known = {s.name for s in status.sites}
        return [*status.sites, *(SiteStatus.never_seen(r.name, now) for r in registered
                                 if r.name not in known and not r.revoked)]

    def _site_row(self, site: SiteStatus) -> dict[str, Any]:
        report = site.health
        rate = self.traffic.rate(site.name)
        to_site, from_site = self.traffic.totals(site.name)
        row = {k: v for k, v in site.as_dict().items() if k != "health"}
        row.update({
            "throughput": {"to_site_bps": rate[0], "from_site_bps": rate[1]} if rate else None,
            "bytes": {"to_site": to_site, "from_site": from_site},
            "echo": _echo_summary(report.destinations) if report else None,
            "host": asdict(report.host) if report else None,
            "agent": {"version": report.version, "rtt_ms": report.tunnel.rtt_ms,
                      "reconnects": report.tunnel.reconnects} if report else None,
            "agent_certificate": asdict(report.certificate) if report else None,
        })
        return row


def _session_view(session: Session | None) -> dict[str, Any] | None:
    return {"csrf": session.csrf, "expires": session.expires} if session else None


def _echo_summary(destinations: Sequence[DestinationReport]) -> dict[str, Any]:
    """How the agent's C-ECHO checks of its PACS went: counts, worst latency, the first failure's reason."""
    failing = [d for d in destinations if d.ok is False]
    latencies = [d.latency_ms for d in destinations if d.ok and d.latency_ms is not None]
    return {
        "total": len(destinations),
        "ok": sum(1 for d in destinations if d.ok is True),
        "failing": len(failing),
        "max_latency_ms": max(latencies) if latencies else None,
        "first_failure": f"{failing[0].route}: {failing[0].last_failure_reason or 'no answer'}" if failing else None,
    }


# --- HTTP ------------------------------------------------------------------------------------------------


def add_routes(app: web.Application, board: Dashboard) -> None:
    """The dashboard's pages, data API and static files, its security headers and its sampler."""
    def bound(handler):
        async def handle(request: web.Request) -> web.StreamResponse:
            return await handler(board, request)
        return handle

    app.router.add_get("/login", bound(_login_page))
    app.router.add_post("/login", bound(_login_submit))
    app.router.add_post("/logout", bound(_logout))
    app.router.add_get("/", bound(_overview_page))
    app.router.add_get("/sites/{name}", bound(_site_page))
    app.router.add_get(DATA_PATH, bound(_overview_data))
    app.router.add_get(DATA_PATH + "/sites/{name}", bound(_site_data))
    app.router.add_static("/static", STATIC_DIR, follow_symlinks=False, show_index=False)
    app.on_response_prepare.append(_security_headers)

    async def sampler(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(board.sample_forever())
        yield
        await cancel_and_wait(task)

    app.cleanup_ctx.append(sampler)
    app.cleanup_ctx.append(guard.report_throttles(board.login_limiter, log, "wrong admin tokens"))


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-cache")
    else:
        response.headers.setdefault("Cache-Control", "no-store")


async def _login_page(board: Dashboard, request: web.Request) -> web.StreamResponse:
    if board.session_of(request) is not None:
        raise web.HTTPSeeOther("/")
    return _login_form()


async def _login_submit(board: Dashboard, request: web.Request) -> web.StreamResponse:
    if not _same_origin(request):
        return _login_form("This login form must be sent from the dashboard's own page.", status=403)
    form = await request.post()
    given = form.get("token")
    if isinstance(given, str) and board.token_matches(given):  # first: the right token is never throttled
        session_id, _session = board.sessions.create(time.time())
        response = _see_other("/")
        response.set_cookie(SESSION_COOKIE, session_id, max_age=int(board.sessions.ttl), path="/",
                            httponly=True, samesite="Strict", secure=request.secure)
        return response
    verdict = guard.attempt(board.login_limiter, request)
    if not verdict.allowed:
        headers = guard.retry_after_header(verdict)
        return _login_form(f"Too many wrong tokens from this address. Try again in {headers['Retry-After']} s.",
                           status=429, headers=headers)
    return _login_form("Wrong admin token.", status=401)


async def _logout(board: Dashboard, request: web.Request) -> web.StreamResponse:
    session_id = request.cookies.get(SESSION_COOKIE)
    session = board.sessions.get(session_id, time.time())
    if session is not None:
        form = await request.post()
        csrf = form.get("csrf")
        if not _same_origin(request) or not isinstance(csrf, str) or not hmac.compare_digest(
                csrf.encode(), session.csrf.encode()):
            return web.Response(status=403, text="logout refused: missing or wrong CSRF token\n")
        board.sessions.end(session_id)
    response = _see_other("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def _overview_page(board: Dashboard, request: web.Request) -> web.StreamResponse:
    if board.session_of(request) is None:
        raise web.HTTPSeeOther("/login")
    return _static_page("index.html")


async def _site_page(board: Dashboard, request: web.Request) -> web.StreamResponse:
    if board.session_of(request) is None:
        raise web.HTTPSeeOther("/login")
    return _static_page("site.html")


async def _overview_data(board: Dashboard, request: web.Request) -> web.StreamResponse:
    return web.json_response(await board.overview(time.time(), board.session_of(request)))


async def _site_data(board: Dashboard, request: web.Request) -> web.StreamResponse:
    detail = await board.site_detail(request.match_info["name"], time.time(), board.session_of(request))
    if detail is None:
        return web.json_response({"error": "no such site"}, status=404)
    return web.json_response(detail)


def _same_origin(request: web.Request) -> bool:
    """False for a POST a browser says came from another site. Browsers name where a request came from in
    ``Sec-Fetch-Site``; older ones in ``Origin`` (which is "null" under our no-referrer policy: no verdict)."""
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None:
        return fetch_site in {"same-origin", "none"}
    origin = request.headers.get("Origin")
    return origin in {None, "null"} or origin == f"{request.scheme}://{request.host}"


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _static_page(name: str, status: int = 200) -> web.Response:
    return web.Response(body=(STATIC_DIR / name).read_bytes(), status=status, content_type="text/html",
                        charset="utf-8")


def _login_form(error: str = "", status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    page = (STATIC_DIR / "login.html").read_text()
    if error:  # our own fixed wording, escaped all the same
        page = page.replace("<!--error-->", f'<p class="error" role="alert">{html.escape(error)}</p>')
    return web.Response(text=page, status=status, content_type="text/html", headers=headers)
