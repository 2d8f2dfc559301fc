"""The registry's database: opening it (a private SQLite file, or the fleet's PostgreSQL), numbered schema
migrations, transactions, the audit trail.

Schema changes are numbered migrations applied in order inside one transaction each; the database records
how far it has come, so an old one is upgraded at start-up and one from a newer release is refused rather
than misread. The migrations are written once with type names (``{REAL}``, ``{TEXT}``, ``{INT}``, ``{ID}``)
that each engine spells its own way (``relay.engines``). Every write is one short transaction, one writer at
a time across processes and relays, and leaves an audit row. The tables' own rules are in
``relay.identities`` (sites, tokens, certificates, WireGuard keys) and ``relay.routingrows``;
``relay.registry`` is the one class made of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Self

from relay.engines import Engine, PostgresEngine, PostgresTarget, SqliteEngine
from relay.registryerrors import RegistryError, RegistryUnavailable

__all__ = ["REGISTRY_FILE", "SCHEMA_VERSION", "RegistryError", "RegistryUnavailable", "Store"]

REGISTRY_FILE = "registry.sqlite3"

audit_log = logging.getLogger("relay.audit")

# Migration N (1-based) brings a database from version N-1 to N. Append only; never change what a released
# one creates (SQLite's spellings of the type names are those the first releases wrote).
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sites (
        name        {TEXT} PRIMARY KEY,
        created_at  {REAL} NOT NULL,
        revoked_at  {REAL},
        revoked_why {TEXT}
    );
    CREATE TABLE tokens (
        secret_sha256 {TEXT} PRIMARY KEY,
        site          {TEXT} NOT NULL REFERENCES sites(name),
        created_at    {REAL} NOT NULL,
        expires_at    {REAL} NOT NULL,
        used_at       {REAL}
    );
    CREATE TABLE certificates (
        serial      {TEXT} PRIMARY KEY,
        site        {TEXT} NOT NULL REFERENCES sites(name),
        kind        {TEXT} NOT NULL,
        issued_at   {REAL} NOT NULL,
        not_after   {REAL} NOT NULL,
        revoked_at  {REAL},
        revoked_why {TEXT}
    );
    CREATE INDEX certificates_site ON certificates(site);
    CREATE TABLE audit (
        id     {ID},
        at     {REAL} NOT NULL,
        actor  {TEXT} NOT NULL,
        action {TEXT} NOT NULL,
        site   {TEXT},
        detail {TEXT} NOT NULL
    );
    """,
    # 2: routing in the registry. Rows from the config file (source 'config') are replaced at every
    # start-up; rows added through the admin API (source 'api') persist.
    """
    CREATE TABLE listener_routes (
        listener            {TEXT} NOT NULL,
        called_ae           {TEXT} NOT NULL,
        site                {TEXT} NOT NULL REFERENCES sites(name),
        route               {TEXT} NOT NULL,
        allowed_calling_aes {TEXT} NOT NULL,
        source              {TEXT} NOT NULL,
        PRIMARY KEY (listener, called_ae)
    );
    CREATE TABLE site_destinations (
        site                {TEXT} NOT NULL REFERENCES sites(name),
        called_ae           {TEXT} NOT NULL,
        host                {TEXT} NOT NULL,
        port                {INT} NOT NULL,
        allowed_calling_aes {TEXT} NOT NULL,
        source              {TEXT} NOT NULL,
        PRIMARY KEY (site, called_ae)
    );
    """,
    # 3: WireGuard peers: one key and one tunnel address per site.
    """
    CREATE TABLE wg_peers (
        site       {TEXT} PRIMARY KEY REFERENCES sites(name),
        public_key {TEXT} NOT NULL UNIQUE,
        address    {TEXT} NOT NULL UNIQUE,
        updated_at {REAL} NOT NULL
    );
    """,
    # 4: the fleet: the relays sharing the registry, and which holds each site's tunnel, under leases.
    """
    CREATE TABLE relays (
        name        {TEXT} PRIMARY KEY,
        zone        {TEXT} NOT NULL,
        state       {TEXT} NOT NULL,
        started_at  {REAL} NOT NULL,
        lease_until {REAL} NOT NULL
    );
    CREATE TABLE presence (
        site        {TEXT} NOT NULL,
        relay       {TEXT} NOT NULL REFERENCES relays(name),
        since       {REAL} NOT NULL,
        lease_until {REAL} NOT NULL,
        PRIMARY KEY (site, relay)
    );
    CREATE INDEX presence_relay ON presence(relay);
    """,
    # 5: where the other relays reach each relay for a hop (its [fleet] address; empty: it takes none), and
    # the URL agents dial to reach it directly (its [fleet] tunnel_url; empty: agents are not told of it);
    # and which of a site's agents hold the tunnels a relay has for it (names, comma-separated).
    """
    ALTER TABLE relays ADD COLUMN address {TEXT} NOT NULL DEFAULT '';
    ALTER TABLE relays ADD COLUMN tunnel_url {TEXT} NOT NULL DEFAULT '';
    ALTER TABLE presence ADD COLUMN agents {TEXT} NOT NULL DEFAULT '';
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


class Store:
    """The open database (``open`` / ``connect`` create and migrate it; ``close()`` when done) and what every
    table's rules share: transactions, the audit trail, the site checks."""

    def __init__(self, engine: Engine) -> None:
        self._db = engine

    @classmethod
    def open(cls, state_dir: Path) -> Self:
        """The embedded registry: ``{state_dir}/registry.sqlite3`` (0600), created and migrated."""
        return cls._migrated(SqliteEngine(state_dir / REGISTRY_FILE))

    @classmethod
    def connect(cls, target: PostgresTarget) -> Self:
        """The fleet's registry on PostgreSQL, migrated (relays starting together take turns)."""
        return cls._migrated(PostgresEngine(target))

    @classmethod
    def _migrated(cls, engine: Engine) -> Self:
        try:
            engine.migrate(_MIGRATIONS)
        except BaseException:
            engine.close()
            raise
        return cls(engine)

    @property
    def where(self) -> str:
        """The database, for messages (a path, or PostgreSQL user@host:port/database)."""
        return self._db.where

    @property
    def kind(self) -> str:
        return self._db.kind

    @property
    def target(self) -> PostgresTarget | None:
        """The shared PostgreSQL database, for a session of its own (``relay.notify``); None for SQLite."""
        return self._db.target if isinstance(self._db, PostgresEngine) else None

    def close(self) -> None:
        self._db.close()

    def data_version(self) -> int:
        """Changes when another process commits: a cheap "reload?" check."""
        return self._db.data_version()

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

    def _ensure_site_row(self, site: str, now: float) -> bool:
        """Add ``site`` unless it exists (revoked or not); True if it was added. Inside a transaction."""
        return self._db.execute("INSERT INTO sites(name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                                (site, now)).rowcount == 1

    def _tx(self, *, change: bool = True) -> contextlib.AbstractContextManager[None]:
        """One write transaction: one writer at a time, across processes. ``change=False`` for writes that
        are not registry changes (the fleet's presence): no write lock, and the relays' reload version
        stays where it is."""
        return self._db.transaction(change=change)
