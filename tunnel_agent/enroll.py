"""Joining a site (``tunnel-agent enroll``) and renewing its certificate, on the agent's side.

Enrollment, from a token made by ``tunnel-relay site add`` (see ``tunnel_core.token``):

1. Fetch the relay CA from ``GET /enroll/v1/ca`` and compare its SHA-256 with the token's fingerprint.
   Nothing secret is sent in this step. A mismatch fails closed and names the certificate that was
   presented instead, which on a hospital network usually means a TLS-intercepting proxy.
2. Make the private key here (ECDSA P-256; it never leaves the host) and send a CSR with the token's
   secret to ``POST /enroll/v1/certificate`` over a connection that trusts *only* the pinned CA and checks
   the relay's host name, so the secret cannot reach anyone but the relay.
3. Check the certificate that came back (our key, signed by the pinned CA), then write key (0600),
   certificate, CA and ``enrollment.json`` (relay URL, site, fingerprint) atomically into place.

Renewal (:func:`renew`) is the same step 2-3 with the current certificate as the credential
(``POST /enroll/v1/renew``, mutual TLS); :func:`renewal_due` says when (two thirds into the lifetime).
Both go through the configured HTTP proxy, like the tunnel.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tunnel_agent.connect import outer_context, proxy_failure, target_of
from tunnel_agent.peek import PeekError, describe_certificate, peek_certificate
from tunnel_agent.proxy import choose_proxy
from tunnel_core.token import EnrollmentToken
from tunnel_link.errors import LinkError
from tunnel_link.innertls import inner_tls_client, read_line
from tunnel_link.tls import TLS12_CIPHERS, client_context

if TYPE_CHECKING:
    from tunnel_agent.config import AgentSettings

__all__ = ["ENROLLMENT_FILE", "EnrollError", "Enrollment", "enroll", "load_enrollment", "relay_url_mismatch",
           "renew", "renewal_due", "with_enrollment"]

ENROLLMENT_FILE = "enrollment.json"
RENEW_AT = 2 / 3  # fraction of a certificate's lifetime after which the agent renews it


class EnrollError(Exception):
    """Enrollment or renewal failed; the message is one line for the operator, without secrets."""


@dataclass(frozen=True, slots=True)
class Enrollment:
    relay_url: str
    site: str
    ca_fingerprint: str
    not_after: float


def load_enrollment(state_dir: Path) -> Enrollment | None:
    """What ``enroll`` recorded in ``state_dir``, or None if this host never enrolled."""
    try:
        data = json.loads((state_dir / ENROLLMENT_FILE).read_text())
        return Enrollment(data["relay_url"], data["site"], data["ca_fingerprint"], float(data["not_after"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EnrollError(f"{state_dir / ENROLLMENT_FILE} is unreadable ({exc}); enroll again") from exc


async def enroll(settings: AgentSettings, token: EnrollmentToken, *,
                 environ: Mapping[str, str] | None = None) -> Enrollment:
    """Redeem ``token`` at the relay it names; write key, certificate and CA where ``settings`` says."""
    base = _https_base(token.relay_url)
    environ = os.environ if environ is None else environ
    ca_pem = await _fetch_pinned_ca(settings, base, token, environ)
    key = ec.generate_private_key(ec.SECP256R1())
    pinned = _pinned_context(ca_pem)
    answer = await _post(settings, pinned, f"{base}/enroll/v1/certificate",
                         {"token": token.secret, "csr": _csr_pem(key)}, environ)
    cert_pem = _check_issued(answer, key, ca_pem)
    enrollment = Enrollment(token.relay_url, answer["site"], token.ca_fingerprint, answer["not_after"])
    _install(settings, key, cert_pem, ca_pem, enrollment)
    return enrollment


async def renew(settings: AgentSettings, *, environ: Mapping[str, str] | None = None) -> float:
    """Renew the agent's certificate with the current one; returns the new ``not_after`` (UNIX time)."""
    ca_pem = settings.ca_file.read_bytes()
    key = ec.generate_private_key(ec.SECP256R1())
    ctx = client_context(settings.cert_file, settings.key_file, settings.ca_file)
    base = _https_base(settings.relay_url)
    answer = await _post(settings, ctx, f"{base}/enroll/v1/renew", {"csr": _csr_pem(key)},
                         os.environ if environ is None else environ)
    cert_pem = _check_issued(answer, key, ca_pem)
    previous = load_enrollment(settings.state_dir)
    enrollment = Enrollment(settings.relay_url, answer["site"],
                            previous.ca_fingerprint if previous else _fingerprint(ca_pem), answer["not_after"])
    _install(settings, key, cert_pem, ca_pem, enrollment)
    return answer["not_after"]


def with_enrollment(settings: AgentSettings) -> AgentSettings:
    """``settings`` with ``relay_url`` from ``enrollment.json`` (the token's URL), unless the operator set
    ``relay_url`` explicitly, in the config file or the environment (pydantic's ``model_fields_set``):
    that one wins, and :func:`relay_url_mismatch` says whether it differs from the enrolled relay.
    Raises :class:`EnrollError` when neither is there. Idempotent: the result counts as set."""
    if "relay_url" in settings.model_fields_set and settings.relay_url:
        return settings
    enrollment = load_enrollment(settings.state_dir)
    if enrollment is None:
        raise EnrollError(f"not enrolled: no relay_url in the config and no {settings.state_dir / ENROLLMENT_FILE}; "
                          "run `tunnel-agent enroll` with the token from `tunnel-relay site add`")
    return settings.model_copy(update={"relay_url": enrollment.relay_url})


def relay_url_mismatch(settings: AgentSettings) -> str | None:
    """One line when ``settings.relay_url`` (set explicitly) is not the relay this host enrolled with,
    which is how a placeholder copied from an example config shows itself; else None."""
    try:
        enrollment = load_enrollment(settings.state_dir)
    except EnrollError:
        return None
    if enrollment is None or not settings.relay_url or settings.relay_url == enrollment.relay_url:
        return None
    return (f"relay_url {settings.relay_url} (set in the config or TUNNEL_AGENT_RELAY_URL) is not the relay this "
            f"host enrolled with ({enrollment.relay_url}); the agent dials the former. Remove relay_url to use "
            "the enrolled relay")


def renewal_due(cert_pem: bytes) -> float:
    """When a certificate should be renewed: two thirds into its lifetime (UNIX time)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    return start + (end - start) * RENEW_AT


# --- steps -------------------------------------------------------------------------------------------


async def _fetch_pinned_ca(settings: AgentSettings, base: str, token: EnrollmentToken,
                           environ: Mapping[str, str]) -> bytes:
    """GET the CA without trusting anything yet, and keep it only if it is the one the token pins."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE  # nothing secret is sent on this connection; what comes back is pinned
    probe.minimum_version = ssl.TLSVersion.TLSv1_2
    body = await _request(settings, probe, "GET", f"{base}/enroll/v1/ca", None, environ)
    if _fingerprint_or_none(body) != token.ca_fingerprint:
        proxy = choose_proxy(settings.proxy, token.relay_url, environ)
        try:
            presented = describe_certificate(await peek_certificate(base, proxy, settings.connect_timeout))
        except PeekError as exc:
            presented = f"unknown ({exc})"
        raise EnrollError(_interception_message(presented, token))
    return body


def _pinned_context(ca_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname, CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_verify_locations(cadata=ca_pem.decode())
    return ctx


async def _post(settings: AgentSettings, ctx: ssl.SSLContext, url: str, body: dict[str, str],
                environ: Mapping[str, str]) -> dict:
    if settings.tls_mode == "inner":
        raw = await _inner_request(settings, ctx, url, body, environ)
    else:
        raw = await _request(settings, ctx, "POST", url, body, environ)
    try:
        answer = json.loads(raw)
    except ValueError:
        raise EnrollError(f"the relay's answer from {url} is not JSON") from None
    if not isinstance(answer, dict) or not all(isinstance(answer.get(k), str) for k in ("site", "certificate")) \
            or not isinstance(answer.get("not_after"), int | float):
        raise EnrollError(f"the relay's answer from {url} is incomplete")
    return answer


async def _inner_request(settings: AgentSettings, ctx: ssl.SSLContext, url: str, body: dict[str, str],
                         environ: Mapping[str, str]) -> bytes:
    """The same request inside inner TLS: ``ctx`` (pinned CA, with our certificate for renewal) is
    negotiated with the relay over a WebSocket whose outer TLS may end at an inspecting proxy."""
    parts = urlsplit(url)
    op = "renew" if parts.path.endswith("/renew") else "enroll"
    ws_url = urlunsplit(("wss", parts.netloc, "/enroll/v1/inner", "", ""))
    proxy = choose_proxy(settings.proxy, ws_url, environ)
    via = proxy.request_kwargs() if proxy is not None else {}
    connector = aiohttp.TCPConnector(ssl=outer_context(settings), use_dns_cache=False, force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as http:
            async with asyncio.timeout(settings.connect_timeout * 3):
                ws = await http.ws_connect(ws_url, compress=0, **via)
                inner = await inner_tls_client(ws, ctx, parts.hostname or "", settings.connect_timeout)
                try:
                    await inner.send_bytes(json.dumps({"op": op, **body}).encode() + b"\n")
                    line = await read_line(inner, 256 * 1024, settings.connect_timeout)
                finally:
                    await inner.close()
    except (aiohttp.ClientError, TimeoutError, LinkError, ValueError) as exc:
        failure = proxy_failure(proxy, target_of(ws_url), exc, settings.connect_timeout) \
            if proxy and isinstance(exc, aiohttp.ClientError | TimeoutError) else None
        raise EnrollError(str(failure) if failure else
                          f"cannot reach the relay at {ws_url} (inner TLS): {type(exc).__name__}: {exc}") from None
    try:
        status = json.loads(line).get("status")
    except (ValueError, AttributeError):
        status = None
    if status != 200:
        raise EnrollError(f"the relay refused ({status}): {_error_text(line)}")
    return line


async def _request(settings: AgentSettings, ctx: ssl.SSLContext, method: str, url: str, body: dict | None,
                   environ: Mapping[str, str]) -> bytes:
    proxy = choose_proxy(settings.proxy, url.replace("https://", "wss://", 1), environ)
    via = proxy.request_kwargs() if proxy is not None else {}
    timeout = aiohttp.ClientTimeout(total=settings.connect_timeout * 3, sock_connect=settings.connect_timeout)
    connector = aiohttp.TCPConnector(ssl=ctx, use_dns_cache=False, force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as http:
            async with http.request(method, url, json=body, **via) as response:
                data = await response.read()
                if response.status != 200:
                    raise EnrollError(f"the relay refused ({response.status}): {_error_text(data)}")
                return data
    except (aiohttp.ClientError, TimeoutError) as exc:
        failure = proxy_failure(proxy, target_of(url), exc, settings.connect_timeout) if proxy else None
        if failure is not None:
            raise EnrollError(str(failure)) from None
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            raise EnrollError(_verify_failure_message(exc)) from None
        raise EnrollError(f"cannot reach the relay at {url}: {type(exc).__name__}: {exc}") from None



def _check_issued(answer: dict, key: ec.EllipticCurvePrivateKey, ca_pem: bytes) -> bytes:
    try:
        cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrollError(f"the certificate the relay returned does not verify against the pinned CA ({exc})") \
            from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise EnrollError("the certificate the relay returned is not for the key made here")
    return answer["certificate"].encode()


def _install(settings: AgentSettings, key: ec.EllipticCurvePrivateKey, cert_pem: bytes, ca_pem: bytes,
             enrollment: Enrollment) -> None:
    """Write everything to temporary files first, then rename: a crash leaves the old set or the new."""
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    record = json.dumps({"relay_url": enrollment.relay_url, "site": enrollment.site,
                         "ca_fingerprint": enrollment.ca_fingerprint, "not_after": enrollment.not_after,
                         "written_at": dt.datetime.now(dt.UTC).isoformat()}, indent=2).encode()
    staged = [
        _stage(settings.key_file, key_pem, 0o600),
        _stage(settings.ca_file, ca_pem, 0o644),
        _stage(settings.cert_file, cert_pem, 0o644),
        _stage(settings.state_dir / ENROLLMENT_FILE, record, 0o644),
    ]
    for tmp, final in staged:  # key before certificate: a reader never sees a new cert with the old key
        os.replace(tmp, final)


def _stage(path: Path, data: bytes, mode: int) -> tuple[Path, Path]:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp, path


# --- helpers -----------------------------------------------------------------------------------------


def _https_base(relay_url: str) -> str:
    parts = urlsplit(relay_url)
    if parts.scheme != "wss" or not parts.hostname:
        raise EnrollError(f"the relay URL {relay_url!r} is not a wss:// URL")
    return urlunsplit(("https", parts.netloc, "", "", ""))


def _csr_pem(key: ec.EllipticCurvePrivateKey) -> str:
    # The subject is informational only: the relay names the certificate after the token's site.
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunnel-agent")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _fingerprint(pem_or_der: bytes) -> str:
    cert = (x509.load_pem_x509_certificate(pem_or_der) if pem_or_der.lstrip().startswith(b"-----")
            else x509.load_der_x509_certificate(pem_or_der))
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _fingerprint_or_none(data: bytes) -> str | None:
    try:
        return _fingerprint(data)
    except ValueError:
        return None


def _interception_message(presented: str, token: EnrollmentToken) -> str:
    host = urlsplit(token.relay_url).hostname
    return (f"the relay at {token.relay_url} did not present the CA this token pins "
            f"(sha256 {token.ca_fingerprint[:16]}...); it presented {presented}. If that is your "
            f"organisation's TLS inspection proxy, ask the network team to exempt {host} from TLS "
            "inspection, or use the agent's interception mode (see README). Nothing was sent.")


def _verify_failure_message(exc: aiohttp.ClientConnectorCertificateError) -> str:
    return (f"TLS verification of the relay failed: {exc.certificate_error}. The relay's certificate does "
            "not chain to the pinned relay CA (a TLS-inspecting proxy on the path?)")


def _error_text(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error", ""))[:200]
    except (ValueError, AttributeError):
        return data[:200].decode(errors="replace")
