"""Who a connection to the relay is: the site of a verified client certificate, if the registry agrees.

The TLS layer (outer, or inner TLS inside the WebSocket) has verified that the certificate chains to the
relay CA. :class:`Admission` then asks the registry whether the relay issued that serial, for that site,
and neither is revoked (``Registry.check_certificate``). A refusal is logged here, once, and answered with
the ``Tunnel-Refused`` token that tells the agent why (``docs/protocol.md`` §1). A WireGuard connection
has no certificate: its site is the peer whose tunnel address it came from (``relay.wgtransport``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from relay import pki
from relay.pki import PkiError, site_from_certificate
from relay.registry import CertificateVerdict, Registry, serial_hex
from tunnel_core.refusal import RefusalToken

__all__ = ["Admission", "Identity"]

log = logging.getLogger("relay")

# The registry's verdict as the agent is told it (Tunnel-Refused, docs/protocol.md §1).
_REFUSAL_TOKENS = {
    CertificateVerdict.UNKNOWN: RefusalToken.UNKNOWN_CERTIFICATE,
    CertificateVerdict.REVOKED: RefusalToken.CERTIFICATE_REVOKED,
    CertificateVerdict.SITE_REVOKED: RefusalToken.SITE_REVOKED,
    CertificateVerdict.SITE_MISMATCH: RefusalToken.SITE_MISMATCH,
}


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is, after the registry agreed: from a verified client certificate (``serial``,
    ``not_after``), or from the WireGuard peer the connection came through (both None)."""

    site: str
    serial: str | None
    not_after: float | None


class Admission:
    """Build with the open registry. Every method answers from the registry as it is now: a revocation by
    any process counts at once."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def admit_der(self, der: bytes | None, remote: str | None, path: str) -> Identity | RefusalToken:
        """The site of a certificate the TLS layer already verified (outer or inner) if the registry agrees,
        else the ``Tunnel-Refused`` token that tells the agent why (logged here, once)."""
        if not der:
            log.warning("refused %s from %s: no client certificate", path, remote)
            return RefusalToken.NO_CERTIFICATE
        try:
            name = site_from_certificate(der)
            serial = serial_hex(pki.certificate_serial(der))
        except PkiError as exc:
            log.warning("refused %s from %s: %s", path, remote, exc)
            return RefusalToken.UNKNOWN_CERTIFICATE
        verdict = self.registry.check_certificate(serial, name)
        if verdict is not CertificateVerdict.OK:
            log.warning("refused %s from %s: site=%s certificate %s: %s", path, remote, name, serial,
                        verdict.value)
            return _REFUSAL_TOKENS[verdict]
        return Identity(name, serial, pki.certificate_not_after(der).timestamp())

    def admit_request(self, request: web.Request) -> Identity | RefusalToken:
        """:meth:`admit_der` for the client certificate of this request's TLS connection."""
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        return self.admit_der(der, request.remote, request.path)

    def authenticate_request(self, request: web.Request) -> Identity | None:
        """The site behind this request's verified client certificate, if the registry lets it in."""
        identity = self.admit_request(request)
        return identity if isinstance(identity, Identity) else None

    def authenticate_der(self, der: bytes | None, remote: str | None, path: str) -> Identity | None:
        """The site of a certificate the TLS layer already verified (outer or inner), if the registry agrees."""
        identity = self.admit_der(der, remote, path)
        return identity if isinstance(identity, Identity) else None
