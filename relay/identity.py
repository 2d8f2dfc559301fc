"""Who a connection to the relay is: the site of a verified client certificate, if the registry agrees.

The TLS layer (outer, or inner TLS inside the WebSocket) has verified that the certificate chains to the
relay CA. :class:`Admission` then asks the registry whether the relay issued that serial, for that site,
and neither is revoked (``Registry.check_certificate``, asked through the registry's worker thread with a
deadline). While the registry cannot be asked (a shared database down), a certificate this relay judged
before gets that verdict again, so agents that reconnect keep their tunnels; one it never saw waits
(:class:`RegistryDown`). A refusal is logged here, once, and answered with the ``Tunnel-Refused`` token that
tells the agent why (``docs/protocol.md`` §1). A WireGuard connection has no certificate: its site is the
peer whose tunnel address it came from (``relay.wgtransport``).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from aiohttp import web

from relay import pki
from relay.pki import PkiError, site_from_certificate
from relay.registry import CertificateVerdict, RegistryUnavailable, serial_hex
from relay.registrygate import AsyncRegistry
from tunnel_core.refusal import RefusalToken

__all__ = ["Admission", "Identity", "RegistryDown"]

ADMIT_TIMEOUT = 5.0  # seconds for the registry's verdict (inside the inner-TLS handshake's 10 s)
ADMIT_TIMEOUT_DEGRADED = 0.5  # the same while the registry did not answer its last call
REMEMBERED_VERDICTS = 100_000  # certificates whose last verdict is kept for a registry outage (~100 B each)

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


@dataclass(frozen=True, slots=True)
class RegistryDown:
    """No verdict: the registry cannot be asked and this relay has no earlier verdict for the certificate.
    Not a refusal: the agent is answered 503 (or an inner-TLS close without a token) and retries."""

    reason: str


class Admission:
    """Build with the registry's gateway. Every verdict comes from the registry as it is now, so a revocation
    by any process or relay counts at once; while the registry cannot be asked, a certificate this relay
    admitted or refused before gets the same verdict again (``remembered`` verdicts, newest kept), and
    any other is :class:`RegistryDown`."""

    def __init__(self, registry: AsyncRegistry, *, remembered: int = REMEMBERED_VERDICTS) -> None:
        self.registry = registry
        self.remembered = remembered
        self._verdicts: collections.OrderedDict[str, tuple[str, CertificateVerdict]] = collections.OrderedDict()

    async def admit_der(self, der: bytes | None, remote: str | None,
                        path: str) -> Identity | RefusalToken | RegistryDown:
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
        verdict = await self._verdict(serial, name, remote)
        if isinstance(verdict, RegistryDown):
            return verdict
        if verdict is not CertificateVerdict.OK:
            log.warning("refused %s from %s: site=%s certificate %s: %s", path, remote, name, serial,
                        verdict.value)
            return _REFUSAL_TOKENS[verdict]
        return Identity(name, serial, pki.certificate_not_after(der).timestamp())

    async def admit_request(self, request: web.Request) -> Identity | RefusalToken | RegistryDown:
        """:meth:`admit_der` for the client certificate of this request's TLS connection."""
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        return await self.admit_der(der, request.remote, request.path)

    async def authenticate_request(self, request: web.Request) -> Identity | None:
        """The site behind this request's verified client certificate, if the registry lets it in."""
        identity = await self.admit_request(request)
        return identity if isinstance(identity, Identity) else None

    async def authenticate_der(self, der: bytes | None, remote: str | None, path: str) -> Identity | None:
        """The site of a certificate the TLS layer already verified (outer or inner), if the registry agrees."""
        identity = await self.admit_der(der, remote, path)
        return identity if isinstance(identity, Identity) else None

    async def _verdict(self, serial: str, name: str, remote: str | None) -> CertificateVerdict | RegistryDown:
        try:
            # Once the registry is known to be down, ask only briefly: the remembered verdict is the answer
            # until it is back, and an agent's connect attempt must not time out waiting for us.
            timeout = ADMIT_TIMEOUT if self.registry.available else ADMIT_TIMEOUT_DEGRADED
            verdict = await self.registry.call(lambda r: r.check_certificate(serial, name), timeout=timeout)
        except RegistryUnavailable as exc:
            remembered = self._verdicts.get(serial)
            if remembered is None or remembered[0] != name:
                log.warning("cannot admit site=%s from %s now: %s", name, remote, exc)
                return RegistryDown(str(exc))
            log.warning("site=%s from %s: %s; answering from this relay's last verdict (%s)", name, remote, exc,
                        remembered[1].name)
            return remembered[1]
        self._verdicts[serial] = (name, verdict)
        self._verdicts.move_to_end(serial)
        while len(self._verdicts) > self.remembered:
            self._verdicts.popitem(last=False)
        return verdict
