"""The agent's certificate: when it expires, which site it names, and its renewal.

Renewal happens two thirds into the certificate's lifetime (``tunnel_agent.enroll.renewal_due``), over the
relay's own port. The live tunnel carries on: the relay moves it onto the new certificate, and the next
connection uses the new files. A failure is kept in ``renewal_error`` (the status and the health report
show it) and retried every ``RENEW_RETRY`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cryptography import x509
from cryptography.x509.oid import NameOID

from tunnel_agent.config import AgentSettings
from tunnel_agent.enroll import EnrollError, renew, renewal_due

__all__ = ["RENEW_RECHECK", "RENEW_RETRY", "Renewal"]

log = logging.getLogger("agent")

RENEW_RECHECK = 3600.0  # seconds between looks at the certificate while renewal is not due
RENEW_RETRY = 60.0  # seconds between attempts once it is due


class Renewal:
    """Build with the settings; ``await run()`` until cancelled. Reads ``cert_file`` afresh each time."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.renewals = 0
        self.renewal_error = ""

    async def run(self) -> None:
        """Renew when due; re-read the file meanwhile, since enrollment may replace it."""
        while True:
            try:
                due = renewal_due(self.settings.cert_file.read_bytes())
            except (OSError, ValueError) as exc:
                self.renewal_error = f"cannot read {self.settings.cert_file}: {exc}"
                due = time.time() + RENEW_RECHECK
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(min(delay, RENEW_RECHECK))
                continue
            try:
                not_after = await renew(self.settings)
            except EnrollError as exc:
                self.renewal_error = str(exc)
                log.warning("certificate renewal failed (retrying in %.0fs): %s", RENEW_RETRY, exc)
                await asyncio.sleep(RENEW_RETRY)
                continue
            self.renewals += 1
            self.renewal_error = ""
            log.info("certificate renewed; valid until %s",
                     time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after)))

    def certificate_not_after(self) -> float | None:
        cert = self._certificate()
        return cert.not_valid_after_utc.timestamp() if cert is not None else None

    def site_name(self) -> str:
        """This site's name (the certificate's CN), for the commands in a refusal's hint."""
        cert = self._certificate()
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if cert is not None else []
        return str(names[0].value) if names else "NAME"

    def _certificate(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self.settings.cert_file.read_bytes())
        except (OSError, ValueError):
            return None
