"""The registry's SQLite file: opening it private, numbered schema migrations, transactions, the audit trail.

Schema changes are numbered migrations applied in order inside one transaction each; ``PRAGMA
user_version`` records how far a file has come, so an old file is upgraded at start-up and a file from a
newer release is refused rather than misread. Every write is one short ``BEGIN IMMEDIATE`` transaction
(one writer at a time, across processes) and leaves an audit row. The tables' own rules are in
``relay.identities`` (sites, tokens, certificates, WireGuard keys) and ``relay.routingrows``; ``relay.registry``
is the one class made of them.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Self

__all__ = ["REGISTRY_FILE", "SCHEMA_VERSION", "RegistryError", "Store"]

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



class Store:
    """The open file (``open`` creates and migrates it; ``close()`` when done) and what every table's rules
    share: transactions, the audit trail, the site checks."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, state_dir: Path) -> Self:
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

    def _require_live_site(self, site: str) -> None:
        row = self._db.execute("SELECT revoked_at FROM sites WHERE name = ?", (site,)).fetchone()
        if row is None:
            raise RegistryError(f"unknown site {site!r} (tunnel-relay site add first)")
        if row[0] is not None:
            raise RegistryError(f"site {site!r} is revoked")

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
