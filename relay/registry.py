"""The relay's registry: sites, enrollment tokens, issued certificates, revocations and an audit trail.

Theory of operation: one SQLite file (``{state_dir}/registry.sqlite3``, mode 0600, WAL journal) is the
source of truth for *who may connect*. The TLS handshake proves a certificate chains to the relay CA; the
relay then asks the registry whether that certificate's serial was issued by us and is neither revoked nor
for a revoked site (:meth:`Registry.check_certificate`). The relay re-asks for every live session once a
second, so a revocation written by any process (the admin API, or the CLI on the same state directory)
ends the site's session within that sweep.

Routing lives here too. Listener routes (called AE on a relay listener -> a site's route) and site
destinations (cloud SCPs a site may send to) come from two sources: the config file, whose rows are
replaced at every start-up, and the admin API, whose rows persist and cannot shadow or remove a config
row. The relay builds its routing tables from these rows (and rebuilds them when another process writes).

Enrollment tokens are single-use and expiring; only the SHA-256 of the secret is stored, so a copy of
the database cannot be used to enroll. Redeeming is one ``UPDATE ... WHERE used_at IS NULL AND expires_at
> now``: two agents racing with the same token cannot both win.

Schema changes are numbered migrations applied in order inside one transaction each; ``PRAGMA
user_version`` records how far a file has come, so an old file is upgraded at start-up and a file from a
newer release is refused rather than misread.

Timestamps are UNIX seconds (float), passed in by the caller (``now``) so tests control the clock.
Every method opens its own short transaction; the class is safe to use from one thread (the event loop).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = [
    "REGISTRY_FILE",
    "CertificateRecord",
    "CertificateVerdict",
    "DestinationRecord",
    "Registry",
    "RegistryError",
    "RouteRecord",
    "SiteRecord",
    "TokenRefused",
    "hash_secret",
]

REGISTRY_FILE = "registry.sqlite3"

audit_log = logging.getLogger("relay.audit")

# Migration N (1-based) brings a file from user_version N-1 to N. Append only; never edit a released one.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sites (
        name        TEXT PRIMARY KEY,
        created_at  REAL NOT NULL,
        revoked_at  REAL,
        revoked_why TEXT
    );
    CREATE TABLE tokens (
        secret_sha256 TEXT PRIMARY KEY,
        site          TEXT NOT NULL REFERENCES sites(name),
        created_at    REAL NOT NULL,
        expires_at    REAL NOT NULL,
        used_at       REAL
    );
    CREATE TABLE certificates (
        serial      TEXT PRIMARY KEY,
        site        TEXT NOT NULL REFERENCES sites(name),
        kind        TEXT NOT NULL,
        issued_at   REAL NOT NULL,
        not_after   REAL NOT NULL,
        revoked_at  REAL,
        revoked_why TEXT
    );
    CREATE INDEX certificates_site ON certificates(site);
    CREATE TABLE audit (
        id     INTEGER PRIMARY KEY AUTOINCREMENT,
        at     REAL NOT NULL,
        actor  TEXT NOT NULL,
        action TEXT NOT NULL,
        site   TEXT,
        detail TEXT NOT NULL
    );
    """,
    # 2: routing in the registry. Rows from the config file (source 'config') are replaced at every
    # start-up; rows added through the admin API (source 'api') persist.
    """
    CREATE TABLE listener_routes (
        listener            TEXT NOT NULL,
        called_ae           TEXT NOT NULL,
        site                TEXT NOT NULL REFERENCES sites(name),
        route               TEXT NOT NULL,
        allowed_calling_aes TEXT NOT NULL,
        source              TEXT NOT NULL,
        PRIMARY KEY (listener, called_ae)
    );
    CREATE TABLE site_destinations (
        site                TEXT NOT NULL REFERENCES sites(name),
        called_ae           TEXT NOT NULL,
        host                TEXT NOT NULL,
        port                INTEGER NOT NULL,
        allowed_calling_aes TEXT NOT NULL,
        source              TEXT NOT NULL,
        PRIMARY KEY (site, called_ae)
    );
    """,
    # 3: WireGuard peers: one key and one tunnel address per site.
    """
    CREATE TABLE wg_peers (
        site       TEXT PRIMARY KEY REFERENCES sites(name),
        public_key TEXT NOT NULL UNIQUE,
        address    TEXT NOT NULL UNIQUE,
        updated_at REAL NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


class RegistryError(Exception):
    """The registry cannot do what was asked (unknown site, unreadable or too new a file...)."""


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


@dataclass(frozen=True, slots=True)
class RouteRecord:
    """A listener entry: called AE ``called_ae`` on ``listener`` leads to ``route`` at ``site``."""

    listener: str
    called_ae: str
    site: str
    route: str
    allowed: tuple[str, ...]
    source: str = "api"

    def as_dict(self) -> dict[str, object]:
        return {"listener": self.listener, "called_ae": self.called_ae, "site": self.site, "route": self.route,
                "allowed_calling_aes": list(self.allowed), "source": self.source}


@dataclass(frozen=True, slots=True)
class DestinationRecord:
    """A cloud SCP that ``site``'s agent may send to, by called AE."""

    site: str
    called_ae: str
    host: str
    port: int
    allowed: tuple[str, ...]
    source: str = "api"

    def as_dict(self) -> dict[str, object]:
        return {"site": self.site, "called_ae": self.called_ae, "host": self.host, "port": self.port,
                "allowed_calling_aes": list(self.allowed), "source": self.source}


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def serial_hex(serial: int) -> str:
    """The registry's spelling of a certificate serial number."""
    return format(serial, "x")


class Registry:
    """Open with :meth:`open` (creates and migrates the file); ``close()`` when done."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, state_dir: Path) -> Registry:
        path = state_dir / REGISTRY_FILE
        if not path.exists():
            _create_private_file(path)
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open registry {path}: {exc}") from exc
        registry = cls(db, path)
        registry._migrate()
        for extra in ("-wal", "-shm"):  # SQLite creates these with the umask's mode; keep them private
            side = path.with_name(path.name + extra)
            if side.exists():
                os.chmod(side, 0o600)
        return registry

    def close(self) -> None:
        self._db.close()

    # --- sites -----------------------------------------------------------------------------------------

    def ensure_site(self, name: str, now: float, actor: str = "config") -> bool:
        """Register ``name`` if it is new; a revoked site stays revoked. True if it was added."""
        with self._tx():
            added = self._db.execute("INSERT OR IGNORE INTO sites(name, created_at) VALUES (?, ?)",
                                     (name, now)).rowcount == 1
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
            self._db.execute("INSERT OR IGNORE INTO sites(name, created_at) VALUES (?, ?)", (site, now))
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

    # --- routing ---------------------------------------------------------------------------------------

    def sync_config_routing(self, routes: Iterable[RouteRecord], destinations: Iterable[DestinationRecord],
                            now: float) -> None:
        """Make the 'config' rows equal to the config file's; an API row with the same key is replaced."""
        with self._tx():
            self._db.execute("DELETE FROM listener_routes WHERE source = 'config'")
            self._db.execute("DELETE FROM site_destinations WHERE source = 'config'")
            for r in routes:
                self._db.execute("INSERT OR IGNORE INTO sites(name, created_at) VALUES (?, ?)", (r.site, now))
                self._db.execute("INSERT OR REPLACE INTO listener_routes VALUES (?,?,?,?,?, 'config')",
                                 (r.listener, r.called_ae, r.site, r.route, json.dumps(sorted(r.allowed))))
            for d in destinations:
                self._db.execute("INSERT OR IGNORE INTO sites(name, created_at) VALUES (?, ?)", (d.site, now))
                self._db.execute("INSERT OR REPLACE INTO site_destinations VALUES (?,?,?,?,?, 'config')",
                                 (d.site, d.called_ae, d.host, d.port, json.dumps(sorted(d.allowed))))

    def routes(self) -> list[RouteRecord]:
        rows = self._db.execute("SELECT listener, called_ae, site, route, allowed_calling_aes, source "
                                "FROM listener_routes ORDER BY listener, called_ae").fetchall()
        return [RouteRecord(li, ae, site, route, tuple(json.loads(allowed)), source)
                for li, ae, site, route, allowed, source in rows]

    def destinations(self) -> list[DestinationRecord]:
        rows = self._db.execute("SELECT site, called_ae, host, port, allowed_calling_aes, source "
                                "FROM site_destinations ORDER BY site, called_ae").fetchall()
        return [DestinationRecord(site, ae, host, port, tuple(json.loads(allowed)), source)
                for site, ae, host, port, allowed, source in rows]

    def add_route(self, r: RouteRecord, now: float, actor: str) -> None:
        with self._tx():
            self._require_live_site(r.site)
            if self._db.execute("SELECT 1 FROM listener_routes WHERE listener = ? AND called_ae = ?",
                                (r.listener, r.called_ae)).fetchone():
                raise RegistryError(f"listener {r.listener!r} already routes called AE {r.called_ae!r}")
            self._db.execute("INSERT INTO listener_routes VALUES (?,?,?,?,?, 'api')",
                             (r.listener, r.called_ae, r.site, r.route, json.dumps(sorted(r.allowed))))
            self._audit(now, actor, "route_added", r.site, {"listener": r.listener, "called_ae": r.called_ae,
                                                            "route": r.route, "allowed": sorted(r.allowed)})

    def remove_route(self, listener: str, called_ae: str, now: float, actor: str) -> str:
        with self._tx():
            row = self._db.execute("SELECT site, source FROM listener_routes WHERE listener = ? AND called_ae = ?",
                                   (listener, called_ae)).fetchone()
            if row is None:
                raise RegistryError(f"listener {listener!r} has no route for called AE {called_ae!r}")
            if row[1] == "config":
                raise RegistryError("that route is defined in the relay's config file; remove it there")
            self._db.execute("DELETE FROM listener_routes WHERE listener = ? AND called_ae = ?", (listener, called_ae))
            self._audit(now, actor, "route_removed", row[0], {"listener": listener, "called_ae": called_ae})
        return row[0]

    def add_destination(self, d: DestinationRecord, now: float, actor: str) -> None:
        with self._tx():
            self._require_live_site(d.site)
            if self._db.execute("SELECT 1 FROM site_destinations WHERE site = ? AND called_ae = ?",
                                (d.site, d.called_ae)).fetchone():
                raise RegistryError(f"site {d.site!r} already has a destination {d.called_ae!r}")
            self._db.execute("INSERT INTO site_destinations VALUES (?,?,?,?,?, 'api')",
                             (d.site, d.called_ae, d.host, d.port, json.dumps(sorted(d.allowed))))
            self._audit(now, actor, "destination_added", d.site, {"called_ae": d.called_ae, "host": d.host,
                                                                  "port": d.port, "allowed": sorted(d.allowed)})

    def remove_destination(self, site: str, called_ae: str, now: float, actor: str) -> None:
        with self._tx():
            row = self._db.execute("SELECT source FROM site_destinations WHERE site = ? AND called_ae = ?",
                                   (site, called_ae)).fetchone()
            if row is None:
                raise RegistryError(f"site {site!r} has no destination {called_ae!r}")
            if row[0] == "config":
                raise RegistryError("that destination is defined in the relay's config file; remove it there")
            self._db.execute("DELETE FROM site_destinations WHERE site = ? AND called_ae = ?", (site, called_ae))
            self._audit(now, actor, "destination_removed", site, {"called_ae": called_ae})

    def _require_live_site(self, site: str) -> None:
        row = self._db.execute("SELECT revoked_at FROM sites WHERE name = ?", (site,)).fetchone()
        if row is None:
            raise RegistryError(f"unknown site {site!r} (tunnel-relay site add first)")
        if row[0] is not None:
            raise RegistryError(f"site {site!r} is revoked")

    # --- WireGuard peers --------------------------------------------------------------------------------

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

    def data_version(self) -> int:
        """Changes when any *other* connection commits: a cheap "reload?" check."""
        return self._db.execute("PRAGMA data_version").fetchone()[0]

    # --- audit -----------------------------------------------------------------------------------------

    def audit_entries(self, limit: int = 100) -> list[dict[str, object]]:
        rows = self._db.execute("SELECT at, actor, action, site, detail FROM audit ORDER BY id DESC LIMIT ?",
                                (limit,)).fetchall()
        return [{"at": at, "actor": actor, "action": action, "site": site, **json.loads(detail)}
                for at, actor, action, site, detail in rows]

    def _audit(self, now: float, actor: str, action: str, site: str | None, detail: dict[str, object]) -> None:
        self._db.execute("INSERT INTO audit(at, actor, action, site, detail) VALUES (?,?,?,?,?)",
                         (now, actor, action, site, json.dumps(detail, sort_keys=True)))
        audit_log.info("audit %s", json.dumps({"action": action, "actor": actor, "site": site, **detail},
                                              sort_keys=True))

    # --- plumbing --------------------------------------------------------------------------------------

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RegistryError(f"registry {self.path} has schema version {version}, newer than this "
                                f"release understands ({SCHEMA_VERSION}); upgrade tunnel-relay")
        for number in range(version + 1, SCHEMA_VERSION + 1):
            with self._tx():
                for statement in _split_sql(_MIGRATIONS[number - 1]):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error): one writer at a time, across processes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _create_private_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise RegistryError(f"cannot create registry {path}: {exc.strerror}") from exc
    os.close(fd)
