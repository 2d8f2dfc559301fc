"""TLS contexts for the tunnel: mutual TLS between agent and relay, trusting only the relay's own CA.

Policy, identical on both ends:
- TLS 1.3 preferred, TLS 1.2 the minimum; under TLS 1.2 only ECDHE key exchange with AEAD ciphers
  (``ECDHE+AESGCM:ECDHE+CHACHA20``), so every session has forward secrecy.
- No TLS compression (CRIME), no renegotiation, strict X.509 checks.
- Trust anchors are the pinned relay CA file only, never the system store: a TLS-intercepting proxy's
  certificate fails verification instead of being silently accepted.
- The relay requires a client certificate (``CERT_REQUIRED``); OpenSSL's purpose check then insists on
  the clientAuth EKU for agents and serverAuth for the relay. The agent also checks the relay's host name.

Paths go to OpenSSL directly (``load_cert_chain``), so no key material passes through argv or env.
After the handshake the relay reads the site from the peer certificate with
``relay.pki.site_from_certificate(ssl_object.getpeercert(binary_form=True))``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["TLS12_CIPHERS", "TlsConfigError", "client_context", "server_context"]

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TlsConfigError(Exception):
    """A certificate, key or CA file could not be loaded into a TLS context."""


def server_context(cert: Path, key: Path, ca: Path, *, client_cert_optional: bool = False) -> ssl.SSLContext:
    """Context for the relay's tunnel endpoint: presents ``cert``/``key``, requires a client cert from ``ca``.

    Pass it to the HTTPS server; after the handshake read the site from the peer certificate.
    ``client_cert_optional``: a client may connect without a certificate (enrollment, inner-TLS mode), and
    the application must then refuse certificate-less requests itself; a certificate that *is* presented
    is still verified in the handshake, so a wrong CA, expiry or a missing clientAuth EKU fails there.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_policy(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.verify_mode = ssl.CERT_OPTIONAL if client_cert_optional else ssl.CERT_REQUIRED
    _load(ctx, cert, key, ca)
    return ctx


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Context for the agent: presents ``cert``/``key``, trusts only ``ca`` and checks the host name.

    Pass the relay's host name as ``server_hostname`` when connecting.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname=True, CERT_REQUIRED
    _apply_policy(ctx)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, cert, key, ca)
    return ctx


def _apply_policy(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.3 suites are all AEAD with (EC)DHE and are left at their defaults
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.verify_flags &= ~ssl.VERIFY_X509_PARTIAL_CHAIN  # only a chain ending at the pinned CA is trusted


def _load(ctx: ssl.SSLContext, cert: Path, key: Path, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load CA certificate {ca}: {exc}") from exc
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load certificate {cert} with key {key}: {exc}") from exc
