"""Enrollment and renewal over the relay's agent-facing HTTPS port (the one port hospitals allow out).

- ``GET  /enroll/v1/ca``: the relay CA certificate (public). The agent checks its SHA-256 against the
  fingerprint in its token *before* sending the token anywhere, then talks to the relay pinned to it.
- ``POST /enroll/v1/certificate`` ``{"token": ..., "csr": PEM}``: redeem a single-use token and sign the
  CSR as that token's site. The private key never leaves the agent.
- ``POST /enroll/v1/renew`` ``{"csr": PEM}``: needs the agent's current, valid, unrevoked client
  certificate (mutual TLS); signs a fresh certificate for the same site. A live tunnel of that site that
  authenticated with the old certificate carries on under the new one, so renewal drops no association.

Answers are JSON. Refusals say little to the caller (``403 {"error": "token refused"}``) and the reason to
the relay's log and audit trail, so the endpoint does not help anyone probe tokens.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from relay import pki
from relay.registry import RegistryError, TokenRefused, serial_hex

if TYPE_CHECKING:
    from relay.server import Relay

log = logging.getLogger("relay.enroll")

MAX_BODY = 64 * 1024  # a CSR is a few hundred bytes; refuse anything large before reading it


def add_routes(app: web.Application, relay: Relay) -> None:
    def bound(handler):
        async def handle(request: web.Request) -> web.Response:
            return await handler(relay, request)
        return handle

    app.router.add_get("/enroll/v1/ca", bound(_ca))
    app.router.add_post("/enroll/v1/certificate", bound(_enroll))
    app.router.add_post("/enroll/v1/renew", bound(_renew))


async def _ca(relay: Relay, request: web.Request) -> web.Response:
    return web.Response(body=relay.settings.tunnel_ca_path.read_bytes(), content_type="application/x-pem-file")


async def _enroll(relay: Relay, request: web.Request) -> web.Response:
    body = await _json_body(request, ("token", "csr"))
    now = time.time()
    try:
        site = relay.registry.redeem_token(body["token"], now)
    except TokenRefused as exc:
        log.warning("enrollment from %s refused: %s", request.remote, exc)
        raise _error(web.HTTPForbidden, "token refused (unknown, used, expired or revoked)") from None
    issued = _sign(relay, body["csr"], site, kind="enroll", actor=f"enroll:{request.remote}")
    log.info("site=%s enrolled from %s; certificate %s valid until %s", site, request.remote,
             serial_hex(issued.serial), issued.not_after.isoformat())
    return _issued_response(relay, issued)


async def _renew(relay: Relay, request: web.Request) -> web.Response:
    identity = relay.authenticate_request(request)
    if identity is None:
        raise _error(web.HTTPForbidden, "a valid site certificate is required to renew")
    body = await _json_body(request, ("csr",))
    issued = _sign(relay, body["csr"], identity.site, kind="renew", actor=f"renew:{identity.serial}")
    relay.certificate_renewed(identity, serial_hex(issued.serial), issued.not_after.timestamp())
    log.info("site=%s renewed certificate %s -> %s, valid until %s", identity.site, identity.serial,
             serial_hex(issued.serial), issued.not_after.isoformat())
    return _issued_response(relay, issued)


def _sign(relay: Relay, csr: str, site: str, *, kind: str, actor: str) -> pki.IssuedCertificate:
    try:
        issued = pki.sign_site_csr(relay.settings.state_dir, csr.encode(), site,
                                   days=relay.settings.enrollment.certificate_days)
    except pki.PkiError as exc:
        raise _error(web.HTTPBadRequest, str(exc)) from None
    try:
        relay.registry.record_certificate(serial_hex(issued.serial), site, kind, time.time(),
                                          issued.not_after.timestamp(), actor)
    except RegistryError as exc:
        log.error("site=%s certificate not recorded: %s", site, exc)
        raise _error(web.HTTPInternalServerError, "registry unavailable") from None
    return issued


def _issued_response(relay: Relay, issued: pki.IssuedCertificate) -> web.Response:
    return web.json_response({
        "site": issued.site,
        "certificate": issued.pem.decode(),
        "ca": relay.settings.tunnel_ca_path.read_text(),
        "not_after": issued.not_after.timestamp(),
    })


async def _json_body(request: web.Request, keys: tuple[str, ...]) -> dict[str, str]:
    if request.content_length is None or request.content_length > MAX_BODY:
        raise _error(web.HTTPRequestEntityTooLarge if request.content_length else web.HTTPLengthRequired,
                     f"send a JSON body of at most {MAX_BODY} bytes")
    try:
        body = await request.json()
    except ValueError:
        raise _error(web.HTTPBadRequest, "body is not JSON") from None
    if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in keys):
        raise _error(web.HTTPBadRequest, f"body must be a JSON object with string fields {', '.join(keys)}")
    return body


def _error(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    text = json.dumps({"error": message})
    if kind is web.HTTPRequestEntityTooLarge:
        return web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=0, text=text,
                                             content_type="application/json")
    return kind(text=text, content_type="application/json")
