"""The registry's identities: sites, single-use enrollment tokens, issued certificates, WireGuard keys.

A certificate may connect only if the relay issued its serial, for the site it names, and neither is
revoked (:meth:`Identities.check_certificate`). Enrollment tokens are single-use and expiring; only the
SHA-256 of the secret is stored, so a copy of the database cannot be used to enroll. Redeeming is one
``UPDATE ... WHERE used_at IS NULL AND expires_at > now``: two agents racing with the same token cannot
both win. A site's WireGuard key and tunnel address are one row each (:class:`PeerKeys`).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from relay.store import RegistryError, Store

__all__ = [
    "CertificateRecord",
    "CertificateVerdict",
    "Identities",
    "PeerKeys",
    "SiteRecord",
    "TokenRefused",
    "hash_secret",
    "serial_hex",
]


class TokenRefused(RegistryError):
    """An enrollment token is unknown, already used, expired, or for a revoked site (deliberately vague
    towards the caller: the message says which for the relay's log only)."""


class CertificateVerdict(Enum):
    OK = "ok"
    UNKNOWN = "certificate was not issued through this relay's registry"
    REVOKED = "certificate is revoked"
    SITE_REVOKED = "site is revoked"
    SITE_MISMATCH = "certificate is registered to another site"


@dataclass(frozen=True, slots=True)
class SiteRecord:
    name: str
    created_at: float
    revoked_at: float | None
    revoked_why: str | None
    certificates: int
    latest_not_after: float | None

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "created_at": self.created_at, "revoked": self.revoked_at is not None,
                "revoked_at": self.revoked_at, "revoked_why": self.revoked_why,
                "certificates": self.certificates, "latest_not_after": self.latest_not_after}


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str
    site: str
    kind: str
    issued_at: float
    not_after: float
    revoked_at: float | None

    def as_dict(self) -> dict[str, object]:
        return {"serial": self.serial, "site": self.site, "kind": self.kind, "issued_at": self.issued_at,
                "not_after": self.not_after, "revoked": self.revoked_at is not None}


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def serial_hex(serial: int) -> str:
    """The registry's spelling of a certificate serial number."""
    return format(serial, "x")


class Identities(Store):
    """Sites, tokens and certificates (part of ``relay.registry.Registry``)."""

    # --- sites -----------------------------------------------------------------------------------------

    def ensure_site(self, name: str, now: float, actor: str = "config") -> bool:
        """Register ``name`` if it is new; a revoked site stays revoked. True if it was added."""
        with self._tx():
            added = self._ensure_site_row(name, now)
            if added:
                self._audit(now, actor, "site_added", name, {})
        return added

    def add_site(self, name: str, now: float, actor: str) -> str:
        """Register ``name`` (or reinstate it if revoked: its old certificates stay revoked).

        Returns "added", "reinstated" or "exists".
        """
        with self._tx():
            row = self._db.execute("SELECT revoked_at FROM sites WHERE name = ?", (name,)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO sites(name, created_at) VALUES (?, ?)", (name, now))
                outcome = "added"
            elif row[0] is not None:
                self._db.execute("UPDATE sites SET revoked_at = NULL, revoked_why = NULL WHERE name = ?",
                                 (name,))
                outcome = "reinstated"
            else:
                outcome = "exists"
            if outcome != "exists":
                self._audit(now, actor, f"site_{outcome}", name, {})
        return outcome

    def site(self, name: str) -> SiteRecord | None:
        return next(iter(self._sites("WHERE s.name = ?", (name,))), None)

    def sites(self) -> list[SiteRecord]:
        return self._sites("", ())

    def _sites(self, where: str, args: tuple) -> list[SiteRecord]:
        rows = self._db.execute(
            "SELECT s.name, s.created_at, s.revoked_at, s.revoked_why, COUNT(c.serial), MAX(c.not_after) "
            f"FROM sites s LEFT JOIN certificates c ON c.site = s.name {where} "
            "GROUP BY s.name ORDER BY s.name", args).fetchall()
        return [SiteRecord(*row) for row in rows]

    def revoke_site(self, name: str, now: float, actor: str, why: str = "") -> list[str]:
        """Revoke ``name`` and every certificate it holds; returns the serials newly revoked."""
        with self._tx():
            if self._db.execute("UPDATE sites SET revoked_at = ?, revoked_why = ? WHERE name = ?",
                                (now, why, name)).rowcount != 1:
                raise RegistryError(f"unknown site {name!r}")
            serials = [r[0] for r in self._db.execute(
                "SELECT serial FROM certificates WHERE site = ? AND revoked_at IS NULL", (name,))]
            self._db.execute("UPDATE certificates SET revoked_at = ?, revoked_why = ? "
                             "WHERE site = ? AND revoked_at IS NULL", (now, why or "site revoked", name))
            self._db.execute("UPDATE tokens SET used_at = ? WHERE site = ? AND used_at IS NULL", (now, name))
            self._audit(now, actor, "site_revoked", name, {"certificates": serials, "why": why})
        return serials

    # --- tokens ----------------------------------------------------------------------------------------

    def add_token(self, site: str, secret: str, now: float, expires_at: float, actor: str) -> None:
        with self._tx():
            row = self._db.execute("SELECT revoked_at FROM sites WHERE name = ?", (site,)).fetchone()
            if row is None:
                raise RegistryError(f"unknown site {site!r}")
            if row[0] is not None:
                raise RegistryError(f"site {site!r} is revoked")
            self._db.execute("INSERT INTO tokens(secret_sha256, site, created_at, expires_at) VALUES (?,?,?,?)",
                             (hash_secret(secret), site, now, expires_at))
            self._audit(now, actor, "token_issued", site, {"expires_at": expires_at})

    def redeem_token(self, secret: str, now: float) -> str:
        """Use up a token; return its site. Raises :class:`TokenRefused` (with the reason) otherwise."""
        digest = hash_secret(secret)
        with self._tx():
            row = self._db.execute(
                "UPDATE tokens SET used_at = ? WHERE secret_sha256 = ? AND used_at IS NULL AND expires_at > ? "
                "AND site IN (SELECT name FROM sites WHERE revoked_at IS NULL) RETURNING site",
                (now, digest, now)).fetchone()
            if row is None:  # recorded and committed: the refusal belongs in the audit trail
                reason = self._token_problem(digest, now)
                self._audit(now, "enroll", "token_refused", None, {"reason": reason})
            else:
                self._audit(now, "enroll", "token_redeemed", row[0], {})
        if row is None:
            raise TokenRefused(reason)
        return row[0]

    def _token_problem(self, digest: str, now: float) -> str:
        row = self._db.execute("SELECT site, expires_at, used_at FROM tokens WHERE secret_sha256 = ?",
                               (digest,)).fetchone()
        if row is None:
            return "unknown token"
        if row[2] is not None:
            return f"token for site {row[0]!r} was already used"
        if row[1] <= now:
            return f"token for site {row[0]!r} expired"
        return f"site {row[0]!r} is revoked"

    # --- certificates ----------------------------------------------------------------------------------

    def record_certificate(self, serial: str, site: str, kind: str, now: float, not_after: float,
                           actor: str) -> None:
        with self._tx():
            self._ensure_site_row(site, now)
            self._db.execute("INSERT INTO certificates(serial, site, kind, issued_at, not_after) "
                             "VALUES (?,?,?,?,?)", (serial, site, kind, now, not_after))
            self._audit(now, actor, "certificate_issued", site,
                        {"serial": serial, "kind": kind, "not_after": not_after})

    def certificates(self, site: str | None = None) -> list[CertificateRecord]:
        where, args = ("WHERE site = ?", (site,)) if site else ("", ())
        rows = self._db.execute("SELECT serial, site, kind, issued_at, not_after, revoked_at FROM certificates "
                                f"{where} ORDER BY issued_at, serial", args).fetchall()
        return [CertificateRecord(*row) for row in rows]

    def revoke_certificate(self, serial: str, now: float, actor: str, why: str = "") -> str:
        """Revoke one certificate; returns its site."""
        with self._tx():
            row = self._db.execute("UPDATE certificates SET revoked_at = ?, revoked_why = ? "
                                   "WHERE serial = ? AND revoked_at IS NULL RETURNING site",
                                   (now, why, serial)).fetchone()
            if row is None:
                known = self._db.execute("SELECT 1 FROM certificates WHERE serial = ?", (serial,)).fetchone()
                raise RegistryError(f"certificate {serial} is {'already revoked' if known else 'unknown'}")
            self._audit(now, actor, "certificate_revoked", row[0], {"serial": serial, "why": why})
        return row[0]

    def check_certificate(self, serial: str, site: str) -> CertificateVerdict:
        row = self._db.execute(
            "SELECT c.site, c.revoked_at, s.revoked_at FROM certificates c JOIN sites s ON s.name = c.site "
            "WHERE c.serial = ?", (serial,)).fetchone()
        if row is None:
            return CertificateVerdict.UNKNOWN
        if row[0] != site:
            return CertificateVerdict.SITE_MISMATCH
        if row[2] is not None:
            return CertificateVerdict.SITE_REVOKED
        if row[1] is not None:
            return CertificateVerdict.REVOKED
        return CertificateVerdict.OK

    def refused_among(self, serials: Iterable[str]) -> dict[str, CertificateVerdict]:
        """The subset of ``serials`` that may no longer connect, with why (one query per call)."""
        serials = list(serials)
        if not serials:
            return {}
        marks = ",".join("?" * len(serials))
        rows = self._db.execute(
            "SELECT c.serial, c.revoked_at, s.revoked_at FROM certificates c JOIN sites s ON s.name = c.site "
            f"WHERE c.serial IN ({marks}) AND (c.revoked_at IS NOT NULL OR s.revoked_at IS NOT NULL)",
            serials).fetchall()
        return {serial: CertificateVerdict.SITE_REVOKED if site_revoked is not None else CertificateVerdict.REVOKED
                for serial, _cert_revoked, site_revoked in rows}



class PeerKeys(Store):
    """One WireGuard key and tunnel address per site (part of ``relay.registry.Registry``)."""

    def register_wg_peer(self, site: str, public_key: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network,
                         reserved: set[str], now: float, actor: str) -> str:
        """Give ``site`` the WireGuard key ``public_key``; returns its tunnel address (kept across key changes,
        else the lowest free host address of ``network`` not in ``reserved``)."""
        with self._tx():
            self._require_live_site(site)
            row = self._db.execute("SELECT site FROM wg_peers WHERE public_key = ?", (public_key,)).fetchone()
            if row is not None and row[0] != site:
                raise RegistryError("that WireGuard key is registered to another site")
            current = self._db.execute("SELECT public_key, address FROM wg_peers WHERE site = ?",
                                       (site,)).fetchone()
            if current is not None:
                if current[0] != public_key:
                    self._db.execute("UPDATE wg_peers SET public_key = ?, updated_at = ? WHERE site = ?",
                                     (public_key, now, site))
                    self._audit(now, actor, "wireguard_key_replaced", site, {"address": current[1]})
                return current[1]
            taken = {r[0] for r in self._db.execute("SELECT address FROM wg_peers")} | reserved
            address = next((str(ip) for ip in network.hosts() if str(ip) not in taken), None)
            if address is None:
                raise RegistryError(f"no free WireGuard address left in {network}")
            self._db.execute("INSERT INTO wg_peers(site, public_key, address, updated_at) VALUES (?,?,?,?)",
                             (site, public_key, address, now))
            self._audit(now, actor, "wireguard_peer_added", site, {"address": address})
        return address

    def wg_peers(self) -> list[tuple[str, str, str]]:
        """(site, public key, address) of every unrevoked site with a WireGuard key."""
        return [tuple(r) for r in self._db.execute(
            "SELECT w.site, w.public_key, w.address FROM wg_peers w JOIN sites s ON s.name = w.site "
            "WHERE s.revoked_at IS NULL ORDER BY w.site")]

