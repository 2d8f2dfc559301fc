"""The relay's admin API (plain HTTP on the admin port, loopback by default), authenticated by a bearer token.

The token is a random secret in ``{state_dir}/admin.token`` (0600), created on first use. Whoever can read
the relay's state directory can administer it, which is the same trust as holding the CA key. Site
certificates do not authenticate here at all: the admin port speaks no TLS and knows only the token.

- ``GET  /healthz``                              (no token) liveness
- ``GET  /readyz``                               (no token) 200 when ready, 503 with the reason otherwise
- ``GET  /metrics``                              (no token) Prometheus text (``relay.metrics``): counts and
  names only, no PHI or secrets, read-only; the port is loopback by default, open it to the scraper only
- ``GET  /api/status``                           sites, associations, process
- ``GET  /api/sites``                            registry view of every site
- ``POST /api/sites`` ``{"name": "..."}``        add (or reinstate) a site; returns a one-line enrollment token
- ``POST /api/sites/{name}/revoke``              revoke the site and all its certificates; ends its tunnel
- ``GET  /api/certificates[?site=name]``         issued certificates
- ``POST /api/certificates/{serial}/revoke``     revoke one certificate; ends a tunnel that uses it
- ``GET  /api/audit``                            the latest audit entries
- ``GET  /api/routes``                           listener routes and site destinations, with their source
- ``POST /api/routes`` ``{listener, called_ae, site, route, allowed_calling_aes}``   add a listener route
- ``DELETE /api/routes/{listener}/{called_ae}``  remove one (only routes added here; config routes stay)
- ``POST /api/sites/{name}/destinations`` ``{called_ae, host, port, allowed_calling_aes}``
- ``DELETE /api/sites/{name}/destinations/{called_ae}``
Routing changes apply to the next association at once; they persist in the registry.

The ops dashboard (``relay.dashboard``: ``/``, ``/sites/{name}``, ``/login``) shares this port; its data API
``/api/dashboard*`` also accepts the session cookie its login hands out (``session_allows``). Every other
``/api/`` path needs the token. The composition root (``relay.server``) hands in the metrics handler and the
dashboard's session check, and adds the dashboard's routes.

Before any handler (``relay.guard``): a request whose ``Host`` is not ``localhost``, an IP literal or one of
``[admin] allowed_hosts`` is answered 421 (DNS rebinding); a *wrong* bearer token or dashboard login counts
against ``[admin.login_rate_limit]`` per source and, beyond it, is answered 429 with ``Retry-After``. The right
token is compared first, in constant time, and always let in. No response carries a ``Server`` version.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pydantic
from aiohttp import web

from relay import guard, pki
from relay.config import DestinationConfig, ListenerRoute, RelaySettings
from relay.guard import RelayGuards
from relay.registry import DestinationRecord, Registry, RegistryError, RegistryUnavailable, RouteRecord
from relay.registrygate import AsyncRegistry
from relay.revocation import RevocationSweep
from relay.sites import SiteTable, reload_routing
from relay.status import StatusSource
from tunnel_core.ratelimit import RateLimiter
from tunnel_core.token import EnrollmentToken
from tunnel_runtime.settings import NAME_PATTERN

MAX_BODY = 16 * 1024


def public_url(settings: RelaySettings, tunnel_port: int) -> str:
    """The URL enrollment tokens carry: ``tunnel.public_url``, else derived from the relay certificate."""
    t = settings.tunnel
    if t.public_url:
        return t.public_url
    names = pki.relay_hostnames(settings.state_dir)
    host = names[0] if names else "localhost"
    host = f"[{host}]" if ":" in host else host
    return f"wss://{host}:{tunnel_port}{t.path}"

log = logging.getLogger("relay")


@dataclass(frozen=True, slots=True)
class AdminApi:
    """What the admin API reads and changes: settings, the open registry, the site table (routing is
    rebuilt after each change), the status, the revocation sweep (a revocation ends the tunnel before the
    answer) and the tunnel port (the URL in enrollment tokens)."""

    settings: RelaySettings
    registry: AsyncRegistry
    sites: SiteTable
    status: StatusSource
    revocations: RevocationSweep
    tunnel_port: int
    drain: Callable[[], None] = lambda: None  # begin the relay's drain and stop (as SIGTERM does)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(api: AdminApi, guards: RelayGuards, *, token: str, metrics: Handler,
              session_allows: Callable[[web.Request], bool]) -> web.Application:
    """The admin port's app: Host allow-list, then the token check (or the dashboard's session cookie, by
    ``session_allows``), then the API and ``metrics``. The caller adds the dashboard's own routes."""

    def misdirected() -> None:
        guards.misdirected += 1

    @web.middleware
    async def require_token(request: web.Request, handler):
        if request.path.startswith("/api/") and not session_allows(request):
            given = request.headers.get("Authorization")
            if given is None or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _refuse_token(guards.login, request, presented=given is not None)
        try:
            return await handler(request)
        except RegistryUnavailable as exc:  # a read of a shared registry that is down: say which database
            return _registry_refusal(exc, 503)

    async def healthz(request: web.Request) -> web.Response:
        return _json({"ok": True})

    async def readyz(request: web.Request) -> web.Response:
        ready = api.status.readiness()
        return _json({"ready": ready.ready, "reason": ready.reason}, status=200 if ready.ready else 503)

    async def status(request: web.Request) -> web.Response:
        return _json(api.status.snapshot().as_dict())

    async def sites(request: web.Request) -> web.Response:
        return _json({"sites": [site.as_dict() for site in await api.status.registered_sites()]})

    async def fleet(request: web.Request) -> web.Response:
        now = time.time()
        relays, presence, paths = await api.registry.call(lambda r: (r.fleet(now), r.presence(now), r.paths(now)))
        return _json({"relay": api.settings.fleet.name, "relays": [r.as_dict() for r in relays],
                      "presence": presence,
                      "paths": {site: [{"relay": relay, "agents": agents} for relay, agents in held]
                                for site, held in paths.items()}})

    async def drain(request: web.Request) -> web.Response:
        api.drain()
        return _json({"draining": True, "deadline_s": api.settings.fleet.drain_deadline}, status=202)

    async def audit(request: web.Request) -> web.Response:
        return _json({"audit": await api.registry.call(lambda r: r.audit_entries())})

    async def routes(request: web.Request) -> web.Response:
        routes, destinations = await api.registry.call(lambda r: (r.routes(), r.destinations()))
        return _json({"listener_routes": [r.as_dict() for r in routes],
                      "destinations": [d.as_dict() for d in destinations]})

    def bound(handler):
        async def handle(request: web.Request) -> web.Response:
            return await handler(api, request)
        return handle

    host_check = guard.host_allowlist(api.settings.admin.host_names(), on_refused=misdirected)
    app = web.Application(middlewares=[host_check, require_token], client_max_size=MAX_BODY)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)  # no token, like /healthz: see relay.metrics
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/sites", sites)
    app.router.add_post("/api/sites", bound(_add_site))
    app.router.add_post("/api/sites/{name}/revoke", bound(_revoke_site))
    app.router.add_get("/api/certificates", bound(_certificates))
    app.router.add_post("/api/certificates/{serial}/revoke", bound(_revoke_certificate))
    app.router.add_get("/api/audit", audit)
    app.router.add_get("/api/fleet", fleet)
    app.router.add_post("/api/drain", drain)
    app.router.add_get("/api/routes", routes)
    app.router.add_post("/api/routes", bound(_add_route))
    app.router.add_delete("/api/routes/{listener}/{called_ae}", bound(_remove_route))
    app.router.add_post("/api/sites/{name}/destinations", bound(_add_destination))
    app.router.add_delete("/api/sites/{name}/destinations/{called_ae}", bound(_remove_destination))
    return app


def _refuse_token(limiter: RateLimiter, request: web.Request, *, presented: bool) -> web.Response:
    """401 for a missing or wrong bearer token; a wrong one counts against the login limit (429 beyond it).
    A missing token is no guess (e.g. a dashboard page polling after its session ended) and counts nothing."""
    if presented:
        verdict = guard.attempt(limiter, request)
        if not verdict.allowed:
            return _json({"error": "too many wrong admin tokens from this address; retry later"}, status=429,
                         headers=guard.retry_after_header(verdict))
    return _json({"error": "missing or wrong admin token (see admin.token in the state directory)"},
                 status=401, headers={"WWW-Authenticate": 'Bearer realm="tunnel-relay"'})


async def _add_site(api: AdminApi, request: web.Request) -> web.Response:
    body = await _body(request)
    name = body.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        return _json({"error": "name must be 1-63 characters of a-z, 0-9 and '-'"}, status=400)
    ttl = body.get("token_ttl", api.settings.enrollment.token_ttl)
    if not isinstance(ttl, int | float) or not 0 < ttl <= 30 * 86400:
        return _json({"error": "token_ttl must be a number of seconds, at most 30 days"}, status=400)
    now = time.time()
    secret = secrets.token_urlsafe(32)

    def add(r: Registry) -> str:
        outcome = r.add_site(name, now, actor="admin-api")
        r.add_token(name, secret, now, now + ttl, actor="admin-api")
        return outcome

    try:
        outcome = await api.registry.call(add)
    except RegistryError as exc:
        return _registry_refusal(exc, 409)
    url = public_url(api.settings, api.tunnel_port)
    token = EnrollmentToken(url, pki.ca_fingerprint(api.settings.state_dir), secret)
    return _json({"site": name, "outcome": outcome, "token": token.encode(), "expires_at": now + ttl,
                  "relay_url": token.relay_url, "configured_routes": api.sites.has_routes(name)})


async def _revoke_site(api: AdminApi, request: web.Request) -> web.Response:
    name = request.match_info["name"]
    why = (await _body(request)).get("reason", "")
    try:
        now = time.time()
        serials = await api.registry.call(lambda r: r.revoke_site(name, now, actor="admin-api", why=str(why)[:200]))
    except RegistryError as exc:
        return _registry_refusal(exc, 404)
    closed = await api.revocations.enforce()
    return _json({"site": name, "revoked_certificates": serials, "closed_sessions": closed})


async def _revoke_certificate(api: AdminApi, request: web.Request) -> web.Response:
    serial = request.match_info["serial"].lower()
    why = (await _body(request)).get("reason", "")
    try:
        now = time.time()
        site = await api.registry.call(lambda r: r.revoke_certificate(serial, now, actor="admin-api",
                                                                      why=str(why)[:200]))
    except RegistryError as exc:
        return _registry_refusal(exc, 404)
    closed = await api.revocations.enforce()
    return _json({"serial": serial, "site": site, "closed_sessions": closed})


async def _add_route(api: AdminApi, request: web.Request) -> web.Response:
    body = await _body(request)
    listener = body.pop("listener", None)
    if not isinstance(listener, str) or api.settings.listener(listener) is None:
        known = ", ".join(li.name for li in api.settings.listeners) or "none"
        return _json({"error": f"listener must name a configured [[listeners]] entry ({known})"}, status=400)
    try:
        route = ListenerRoute.model_validate(body)
    except pydantic.ValidationError as exc:
        return _json({"error": _first_error(exc)}, status=400)
    record = RouteRecord(listener, route.called_ae, route.site, route.route, tuple(route.allowed_calling_aes))
    return await _apply(api, lambda r, now: r.add_route(record, now, actor="admin-api"),
                  record.as_dict(), status=201)


async def _remove_route(api: AdminApi, request: web.Request) -> web.Response:
    listener, called_ae = request.match_info["listener"], request.match_info["called_ae"]
    return await _apply(api, lambda r, now: r.remove_route(listener, called_ae, now, actor="admin-api"),
                  {"listener": listener, "called_ae": called_ae, "removed": True})


async def _add_destination(api: AdminApi, request: web.Request) -> web.Response:
    site = request.match_info["name"]
    try:
        dest = DestinationConfig.model_validate(await _body(request))
    except pydantic.ValidationError as exc:
        return _json({"error": _first_error(exc)}, status=400)
    record = DestinationRecord(site, dest.called_ae, dest.host, dest.port, tuple(dest.allowed_calling_aes))
    return await _apply(api, lambda r, now: r.add_destination(record, now, actor="admin-api"),
                  record.as_dict(), status=201)


async def _remove_destination(api: AdminApi, request: web.Request) -> web.Response:
    site, called_ae = request.match_info["name"], request.match_info["called_ae"]
    return await _apply(api, lambda r, now: r.remove_destination(site, called_ae, now, actor="admin-api"),
                  {"site": site, "called_ae": called_ae, "removed": True})


def _registry_refusal(exc: RegistryError, status: int) -> web.Response:
    """``status`` for a change the registry refused; 503 naming the database when it cannot be reached."""
    return _json({"error": str(exc)}, status=503 if isinstance(exc, RegistryUnavailable) else status)


async def _apply(api: AdminApi, change: Callable[[Registry, float], object], answer: dict,
                 status: int = 200) -> web.Response:
    """Write ``change(registry, now)`` and route with it at once; a refused change is a 409."""
    now = time.time()
    try:
        await api.registry.call(lambda r: change(r, now))
    except RegistryError as exc:
        return _registry_refusal(exc, 409)
    try:
        await reload_routing(api.sites, api.registry)
    except RegistryError as exc:  # written: the sweep applies it on its next pass
        log.warning("routing change written; applying it waits for the sweep: %s", exc)
    return _json(answer, status=status)


def _first_error(exc: pydantic.ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"]) or "body"
    return f"{where}: {error['msg']}"


async def _certificates(api: AdminApi, request: web.Request) -> web.Response:
    site = request.query.get("site")
    return _json({"certificates": [c.as_dict() for c in await api.registry.call(lambda r: r.certificates(site))]})


async def _body(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": "body is not JSON"}),
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "body must be a JSON object"}),
                                 content_type="application/json")
    return body


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)
