"""Enrollment and renewal over the relay's agent-facing HTTPS port (the one port hospitals allow out).

- ``GET  /enroll/v1/ca``: the relay CA certificate (public). The agent checks its SHA-256 against the
  fingerprint in its token *before* sending the token anywhere, then talks to the relay pinned to it.
- ``POST /enroll/v1/certificate`` ``{"token": ..., "csr": PEM}``: redeem a single-use token and sign the
  CSR as that token's site. The private key never leaves the agent.
- ``POST /enroll/v1/renew`` ``{"csr": PEM}``: needs the agent's current, valid, unrevoked client
  certificate (mutual TLS); signs a fresh certificate for the same site. A live tunnel of that site that
  authenticated with the old certificate carries on under the new one, so renewal drops no association.
- ``GET /enroll/v1/inner`` (WebSocket): the same two requests inside a TLS session run over the
  WebSocket, for agents whose outer TLS ends at an inspecting proxy (inner-TLS mode).

Answers are JSON. Refusals say little to the caller (``403 {"error": "token refused"}``) and the reason to
the relay's log and audit trail, so the endpoint does not help anyone probe tokens.

Every request to the four endpoints above (not ``/ca``) first counts against ``[enrollment.rate_limit]``
(``relay.guard``): beyond it, a source is answered ``429`` with ``Retry-After`` before anything is read,
recorded or logged, and its throttled count is logged once an interval. The CSR is checked (PEM, signature,
key type and size) before a token is redeemed, so a request with a bad CSR leaves the token usable.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from relay import guard, pki
from relay.config import RelaySettings
from relay.identity import Admission, Identity
from relay.registry import RegistryError, RegistryUnavailable, TokenRefused, serial_hex
from relay.registrygate import AsyncRegistry
from tunnel_core.ratelimit import RateLimiter
from tunnel_link.errors import LinkError
from tunnel_link.innertls import InnerTlsError, inner_tls_server, read_line

log = logging.getLogger("relay.enroll")

MAX_BODY = 64 * 1024  # a CSR is a few hundred bytes; refuse anything large before reading it
INNER_TIMEOUT = 10.0


# What an agent is told while the registry's database is down (the relay's log names the database; the
# agent, outside, is not told the cloud's internal addresses). It retries with backoff.
UNAVAILABLE = "the relay's registry database is unavailable; retry later"


class Refused(Exception):
    """An enrollment or renewal request is refused; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class WireGuardRegistrar(Protocol):
    """Where a site registers its WireGuard key (``relay.wgtransport.RelayWireGuard``)."""

    async def register(self, site: str, public_key: str) -> dict[str, object]: ...

    async def sync(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What the enrollment endpoints use: settings (CA, state directory, certificate lifetime), the open
    registry, the admission check for renewals, where a renewal is told to the live tunnel
    (``SiteTable.certificate_renewed``), the inner-TLS server context, and the WireGuard peers if any."""

    settings: RelaySettings
    registry: AsyncRegistry
    admission: Admission
    renewed: Callable[[Identity, str, float], None]
    inner_context: ssl.SSLContext
    wireguard: WireGuardRegistrar | None = None


def add_routes(app: web.Application, enrollment: Enrollment, limiter: RateLimiter) -> None:
    """Route the enrollment endpoints on the tunnel app; every one but ``/ca`` is throttled per source
    (``limiter``: ``[enrollment.rate_limit]``).

    Also strips aiohttp's ``Server`` version header from every response of ``app`` (the whole tunnel port:
    these routes and the tunnel's WebSocket upgrades alike)."""

    def bound(handler, *, throttled: bool = True):
        async def handle(request: web.Request) -> web.StreamResponse:
            if throttled:
                verdict = guard.attempt(limiter, request)
                if not verdict.allowed:  # before the body is read: no registry row, no log line
                    return guard.throttled_response(verdict, "enrollment attempts")
            return await handler(enrollment, request)
        return handle

    app.router.add_get("/enroll/v1/ca", bound(_ca, throttled=False))
    app.router.add_post("/enroll/v1/certificate", bound(_enroll_http))
    app.router.add_post("/enroll/v1/renew", bound(_renew_http))
    app.router.add_get("/enroll/v1/inner", bound(_inner))
    app.router.add_post("/enroll/v1/wireguard", bound(_wireguard_http))
    app.cleanup_ctx.append(guard.report_throttles(limiter, log, "enrollment attempts"))


# --- the two operations, whatever carries them --------------------------------------------------------


async def enroll_with_token(enrollment: Enrollment, body: dict, remote: str | None) -> dict[str, object]:
    """Redeem ``body["token"]`` and sign ``body["csr"]`` for its site. The CSR is checked first: a request
    whose CSR would be refused raises :class:`Refused` (400) and leaves the token unredeemed."""
    _require_strings(body, ("token", "csr"))
    check_csr(body["csr"])
    try:
        token, now = body["token"], time.time()
        site = await enrollment.registry.call(lambda r: r.redeem_token(token, now))
    except TokenRefused as exc:
        log.warning("enrollment from %s refused: %s", remote, exc)
        raise Refused(403, "token refused (unknown, used, expired or revoked)") from None
    except RegistryUnavailable as exc:  # nothing was redeemed: the agent may retry with the same token
        log.error("enrollment from %s not possible: %s", remote, exc)
        raise Refused(503, UNAVAILABLE) from None
    issued = await _sign(enrollment, body["csr"], site, kind="enroll", actor=f"enroll:{remote}")
    log.info("site=%s enrolled from %s; certificate %s valid until %s", site, remote,
             serial_hex(issued.serial), issued.not_after.isoformat())
    return _issued(enrollment, issued)


async def renew_as(enrollment: Enrollment, identity: Identity | None, body: dict) -> dict[str, object]:
    if identity is None:
        raise Refused(403, "a valid site certificate is required to renew")
    _require_strings(body, ("csr",))
    check_csr(body["csr"])
    issued = await _sign(enrollment, body["csr"], identity.site, kind="renew", actor=f"renew:{identity.serial}")
    enrollment.renewed(identity, serial_hex(issued.serial), issued.not_after.timestamp())
    log.info("site=%s renewed certificate %s -> %s, valid until %s", identity.site, identity.serial,
             serial_hex(issued.serial), issued.not_after.isoformat())
    return _issued(enrollment, issued)


# --- HTTPS ------------------------------------------------------------------------------------------


async def _ca(enrollment: Enrollment, request: web.Request) -> web.Response:
    return web.Response(body=enrollment.settings.tunnel_ca_path.read_bytes(), content_type="application/x-pem-file")


async def _enroll_http(enrollment: Enrollment, request: web.Request) -> web.Response:
    body = await _json_body(request)
    return await _answer(enroll_with_token(enrollment, body, request.remote))


async def _renew_http(enrollment: Enrollment, request: web.Request) -> web.Response:
    identity = await enrollment.admission.authenticate_request(request)
    body = await _json_body(request) if identity is not None else {}
    return await _answer(renew_as(enrollment, identity, body))


async def _wireguard_http(enrollment: Enrollment, request: web.Request) -> web.Response:
    """Register the site's WireGuard key (mutual TLS): answers its tunnel address and the relay's peer data."""
    identity = await enrollment.admission.authenticate_request(request)
    if identity is None:
        return web.json_response({"error": "a valid site certificate is required"}, status=403)
    if enrollment.wireguard is None:
        return web.json_response({"error": "this relay has no WireGuard transport"}, status=404)
    body = await _json_body(request)
    try:
        _require_strings(body, ("public_key",))
        answer = await enrollment.wireguard.register(identity.site, body["public_key"])
    except Refused as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)
    except (ValueError, RegistryError) as exc:
        if isinstance(exc, RegistryUnavailable):
            log.error("site=%s WireGuard key not registered: %s", identity.site, exc)
            return web.json_response({"error": UNAVAILABLE}, status=503)
        return web.json_response({"error": str(exc)}, status=400)
    await enrollment.wireguard.sync()
    log.info("site=%s registered a WireGuard key; tunnel address %s", identity.site, answer["address_cidr"])
    return web.json_response(answer)


async def _answer(operation: Awaitable[dict[str, object]]) -> web.Response:
    try:
        return web.json_response(await operation)
    except Refused as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)


# --- inside inner TLS (agents behind a TLS-inspecting proxy) ---------------------------------------------


async def _inner(enrollment: Enrollment, request: web.Request) -> web.StreamResponse:
    """One request over a WebSocket whose inner TLS ends here: a JSON line in, a JSON line out.

    ``{"op": "enroll", "token", "csr"}`` needs no client certificate (the secret is the credential, and
    the agent has verified the pinned CA in the inner handshake); ``{"op": "renew", "csr"}`` needs the
    current certificate presented in the inner handshake.
    """
    ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_BODY * 2)
    await ws.prepare(request)
    try:
        inner = await inner_tls_server(ws, enrollment.inner_context, INNER_TIMEOUT)
    except InnerTlsError as exc:
        log.warning("inner-TLS enrollment from %s failed: %s", request.remote, exc)
        return ws
    try:
        line = await read_line(inner, MAX_BODY, INNER_TIMEOUT)
        body = json.loads(line)
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except (ValueError, TimeoutError, LinkError) as exc:
        log.warning("inner-TLS enrollment from %s: bad request (%s)", request.remote, type(exc).__name__)
        await inner.close()
        return ws
    try:
        if body.get("op") == "enroll":
            answer = {"status": 200, **await enroll_with_token(enrollment, body, request.remote)}
        elif body.get("op") == "renew":
            der = inner.getpeercert(binary_form=True)
            identity = await enrollment.admission.authenticate_der(der, request.remote, request.path)
            answer = {"status": 200, **await renew_as(enrollment, identity, body)}
        else:
            raise Refused(400, "op must be enroll or renew")
    except Refused as exc:
        answer = {"status": exc.status, "error": str(exc)}
    await inner.send_bytes(json.dumps(answer).encode() + b"\n")
    await inner.close()
    return ws


# --- shared -------------------------------------------------------------------------------------------


def check_csr(csr_pem: str) -> None:
    """Raise :class:`Refused` (400) for a CSR that ``pki.sign_site_csr`` would refuse: not PEM, a signature
    that does not verify, a key type or size it does not accept (``pki.check_public_key``)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise Refused(400, "not a usable PEM certificate signing request") from None
    if not valid:
        raise Refused(400, "the certificate signing request's signature does not verify")
    try:
        pki.check_public_key(key, pki.PkiError)
    except pki.PkiError as exc:
        raise Refused(400, str(exc)) from None


async def _sign(enrollment: Enrollment, csr: str, site: str, *, kind: str, actor: str) -> pki.IssuedCertificate:
    try:
        issued = pki.sign_site_csr(enrollment.settings.state_dir, csr.encode(), site,
                                   days=enrollment.settings.enrollment.certificate_days)
    except pki.PkiError as exc:
        raise Refused(400, str(exc)) from None
    try:
        serial, now, not_after = serial_hex(issued.serial), time.time(), issued.not_after.timestamp()
        await enrollment.registry.call(lambda r: r.record_certificate(serial, site, kind, now, not_after, actor))
    except RegistryError as exc:
        log.error("site=%s certificate not recorded: %s", site, exc)
        unavailable = isinstance(exc, RegistryUnavailable)
        raise Refused(503 if unavailable else 500, UNAVAILABLE if unavailable else "certificate not recorded") from None
    return issued


def _issued(enrollment: Enrollment, issued: pki.IssuedCertificate) -> dict[str, object]:
    return {
        "site": issued.site,
        "certificate": issued.pem.decode(),
        "ca": enrollment.settings.tunnel_ca_path.read_text(),
        "not_after": issued.not_after.timestamp(),
    }


def _require_strings(body: dict, keys: tuple[str, ...]) -> None:
    if not all(isinstance(body.get(k), str) for k in keys):
        raise Refused(400, f"body must be a JSON object with string fields {', '.join(keys)}")


async def _json_body(request: web.Request) -> dict:
    if request.content_length is None or request.content_length > MAX_BODY:
        raise _error(web.HTTPRequestEntityTooLarge if request.content_length else web.HTTPLengthRequired,
                     f"send a JSON body of at most {MAX_BODY} bytes")
    try:
        body = await request.json()
    except ValueError:
        raise _error(web.HTTPBadRequest, "body is not JSON") from None
    if not isinstance(body, dict):
        raise _error(web.HTTPBadRequest, "body must be a JSON object")
    return body


def _error(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    text = json.dumps({"error": message})
    if kind is web.HTTPRequestEntityTooLarge:
        return web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=0, text=text,
                                             content_type="application/json")
    return kind(text=text, content_type="application/json")
