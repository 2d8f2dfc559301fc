"""The two database engines under the registry: a private SQLite file (the embedded default) and PostgreSQL.

Theory of operation: the registry's rules (``relay.identities``, ``relay.routingrows``) are written once,
in the SQL both engines speak (``?`` placeholders, ``INSERT ... ON CONFLICT``, ``RETURNING``). An engine
gives them four things, the same way on both:

- ``execute(sql, args)`` returns a cursor (``fetchone``, ``fetchall``, ``rowcount``, iteration);
- ``transaction()`` is one short write transaction with *one writer at a time across processes*: SQLite's
  ``BEGIN IMMEDIATE``, PostgreSQL's transaction-scoped advisory lock (every relay of a fleet shares the
  database, and the registry's read-then-write rules, such as the lowest free WireGuard address, need the
  same serial order SQLite gives). A PostgreSQL write also advances the ``registry_generation`` counter
  (``change=False``: a write that is not a registry change, the fleet's presence, does neither);
- ``data_version()`` changes when another process committed a write: SQLite's ``PRAGMA data_version``,
  PostgreSQL's generation counter (which our own writes move too: one harmless extra reload);
- ``migrate(migrations)`` applies the numbered schema migrations in order, one transaction each, recording
  the version (``PRAGMA user_version``, or the ``registry_schema`` row) and refusing a database from a
  newer release. On PostgreSQL two relays starting at once take turns on the advisory lock.

Every failure leaves as :class:`~relay.registryerrors.RegistryError`; a database that cannot be reached (refused,
timed out, connection lost) as its subclass :class:`~relay.registryerrors.RegistryUnavailable`, whose message names
the database (never with a password) so that an operator knows what to fix. A lost PostgreSQL connection is
opened again on the next call. Every PostgreSQL call has a deadline: ``connect_timeout``, a server-side
``statement_timeout`` and ``lock_timeout``, and ``tcp_user_timeout`` with keepalives for a peer that stops
answering mid-query.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import psycopg

from relay.registryerrors import RegistryError, RegistryUnavailable

__all__ = ["NOTIFY_CHANNEL", "Engine", "PostgresEngine", "PostgresTarget", "SqliteEngine", "render_migration"]

# The channel every write NOTIFYs at commit, with "change" (a registry change) or "presence" (the fleet's
# presence): a hint the other relays act on at once (``relay.notify``); their periodic reads cover a miss.
NOTIFY_CHANNEL = "dicom_tunnel_registry"

# One key for the registry's write lock (pg_advisory_xact_lock): "DICOMREG" as a 64-bit integer.
_WRITE_LOCK = int.from_bytes(b"DICOMREG", "big") - 2**63

# What a migration's type names become on each engine. SQLite's spellings are the ones the first
# releases used, so an existing file's schema is exactly what it was.
_TYPES = {
    "sqlite": {"REAL": "REAL", "TEXT": "TEXT", "INT": "INTEGER", "ID": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    # DOUBLE PRECISION: PostgreSQL's REAL is 4 bytes, too short for a UNIX time. COLLATE "C": names sort
    # by bytes, as they do in SQLite, whatever the server's locale.
    "postgresql": {"REAL": "DOUBLE PRECISION", "TEXT": 'TEXT COLLATE "C"', "INT": "INTEGER",
                   "ID": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"},
}


def render_migration(template: str, kind: str) -> list[str]:
    """The statements of one migration template (``{REAL}``, ``{TEXT}``, ``{INT}``, ``{ID}``) for ``kind``."""
    script = template.format(**_TYPES[kind])
    return [s.strip() for s in script.split(";") if s.strip()]


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Engine(Protocol):
    kind: str  # "sqlite" | "postgresql"
    where: str  # the database, for messages: a path, or user@host:port/database (no password)

    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor: ...
    def transaction(self, *, change: bool = True) -> contextlib.AbstractContextManager[None]: ...
    def data_version(self) -> int: ...
    def migrate(self, migrations: Sequence[str]) -> None: ...
    def close(self) -> None: ...


def _check_version(version: int, latest: int, where: str) -> None:
    if version > latest:
        raise RegistryError(f"registry {where} has schema version {version}, newer than this release "
                            f"understands ({latest}); upgrade tunnel-relay")


# --- SQLite --------------------------------------------------------------------------------------------


class SqliteEngine:
    """The registry file in the state directory: created 0600, WAL journal, foreign keys on. Usable from
    one thread at a time (any one: the relay may move its calls to a worker thread)."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        if not path.exists():
            _create_private_file(path)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"cannot open registry {path}: {exc}") from exc
        for extra in ("-wal", "-shm"):  # SQLite creates these with the umask's mode; keep them private
            side = path.with_name(path.name + extra)
            if side.exists():
                os.chmod(side, 0o600)

    def execute(self, sql: str, args: Sequence[object] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError) as exc:  # the statement's fault
            raise RegistryError(f"registry {self.where}: {exc}") from exc
        except sqlite3.Error as exc:  # locked past busy_timeout, a disk error, a damaged file
            raise RegistryUnavailable(f"registry {self.where} cannot be used now: {exc}") from exc

    @contextlib.contextmanager
    def transaction(self, *, change: bool = True) -> Iterator[None]:
        self.execute("BEGIN IMMEDIATE")  # one relay per file: every write may take the lock
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self.execute("COMMIT")

    def data_version(self) -> int:
        return self.execute("PRAGMA data_version").fetchone()[0]

    def migrate(self, migrations: Sequence[str]) -> None:
        version = self.execute("PRAGMA user_version").fetchone()[0]
        _check_version(version, len(migrations), self.where)
        for number in range(version + 1, len(migrations) + 1):
            with self.transaction():
                for statement in render_migration(migrations[number - 1], self.kind):
                    self.execute(statement)
                self.execute(f"PRAGMA user_version = {number}")

    def close(self) -> None:
        self._db.close()


def _create_private_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise RegistryError(f"cannot create registry {path}: {exc.strerror}") from exc
    os.close(fd)


# --- PostgreSQL ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PostgresTarget:
    """Where the PostgreSQL registry is: parsed from ``registry_url`` (which must not hold a password) plus
    the password from a file or the environment (None: libpq's own ``~/.pgpass`` / ``PGPASSFILE``)."""

    host: str
    port: int
    database: str
    user: str
    password: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    statement_timeout: float = 5.0

    @classmethod
    def from_url(cls, url: str, password: str | None = None, **timeouts: float) -> PostgresTarget:
        """Parse ``postgresql://user@host:port/database``; raises RegistryError for anything else."""
        try:
            parts = urlsplit(url)
            port = parts.port or 5432
        except ValueError as exc:
            raise RegistryError(f"registry_url is not a valid URL: {exc}") from None
        if parts.scheme not in ("postgresql", "postgres"):
            raise RegistryError("registry_url must start with postgresql:// (or be empty for the SQLite file)")
        if parts.password is not None:
            raise RegistryError("registry_url must not hold a password: put it in registry_password_file "
                                "or the TUNNEL_RELAY_REGISTRY_PASSWORD environment variable")
        if not parts.hostname or not parts.username or not parts.path.strip("/"):
            raise RegistryError("registry_url needs a user, a host and a database: postgresql://user@host:5432/db")
        if parts.query or parts.fragment:
            raise RegistryError("registry_url takes no query parameters: the relay sets the connection's "
                                "timeouts itself")
        return cls(parts.hostname, port, unquote(parts.path.strip("/")), unquote(parts.username), password,
                   **timeouts)

    @property
    def where(self) -> str:
        return f"PostgreSQL {self.user}@{self.host}:{self.port}/{self.database}"

    def connect_args(self) -> dict[str, object]:
        """psycopg.connect keyword arguments: every wait bounded, the password never in a URL or argv."""
        statement_ms = int(self.statement_timeout * 1000)
        args: dict[str, object] = {
            "host": self.host, "port": self.port, "dbname": self.database, "user": self.user,
            "connect_timeout": max(1, round(self.connect_timeout)),
            "application_name": "tunnel-relay",
            "options": f"-c statement_timeout={statement_ms} -c lock_timeout={statement_ms} "
                       f"-c idle_in_transaction_session_timeout={4 * statement_ms}",
            # A server that stops answering mid-query (a dead host, a partition): the kernel gives up
            # after this long instead of the default ~15 minutes of retransmissions.
            "tcp_user_timeout": statement_ms, "keepalives": 1, "keepalives_idle": 5,
            "keepalives_interval": 2, "keepalives_count": 3,
            "autocommit": True,
        }
        if self.password is not None:
            args["password"] = self.password
        return args


class PostgresEngine:
    """One connection to the shared PostgreSQL registry, opened again after it is lost. Usable from one
    thread at a time."""

    kind = "postgresql"

    def __init__(self, target: PostgresTarget) -> None:
        self.target = target
        self.where = target.where
        self._conn: Any = None
        self._connect()

    def _connect(self) -> Any:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            self._conn.close()
        try:
            self._conn = psycopg.connect(**self.target.connect_args())
        except psycopg.Error as exc:
            self._conn = None
            raise RegistryUnavailable(f"registry database {self.where} is unreachable: {_first_line(exc)}") from None
        return self._conn

    def execute(self, sql: str, args: Sequence[object] = ()) -> Any:
        conn = self._connect()
        try:
            return conn.execute(_placeholders(sql), tuple(args))
        except psycopg.Error as exc:
            raise self._translate(exc) from None

    @contextlib.contextmanager
    def transaction(self, *, change: bool = True) -> Iterator[None]:
        conn = self._connect()
        try:
            with conn.transaction():
                if change:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                yield
                if change:
                    conn.execute("UPDATE registry_generation SET n = n + 1")
                conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, "change" if change else "presence"))
        except psycopg.Error as exc:
            raise self._translate(exc) from None

    def data_version(self) -> int:
        return self.execute("SELECT n FROM registry_generation").fetchone()[0]

    def migrate(self, migrations: Sequence[str]) -> None:
        conn = self._connect()
        try:
            with conn.transaction():  # the bookkeeping tables, once, under the write lock
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS registry_schema (version INTEGER NOT NULL)")
                conn.execute("CREATE TABLE IF NOT EXISTS registry_generation (n BIGINT NOT NULL)")
                if conn.execute("SELECT count(*) FROM registry_schema").fetchone()[0] == 0:
                    conn.execute("INSERT INTO registry_schema VALUES (0)")
                if conn.execute("SELECT count(*) FROM registry_generation").fetchone()[0] == 0:
                    conn.execute("INSERT INTO registry_generation VALUES (0)")
            for number in range(1, len(migrations) + 1):
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                    version = conn.execute("SELECT version FROM registry_schema").fetchone()[0]
                    _check_version(version, len(migrations), self.where)
                    if version >= number:
                        continue  # done already (by us earlier, or by another relay)
                    for statement in render_migration(migrations[number - 1], self.kind):
                        conn.execute(statement)
                    conn.execute("UPDATE registry_schema SET version = %s", (number,))
            version = conn.execute("SELECT version FROM registry_schema").fetchone()[0]
            _check_version(version, len(migrations), self.where)
        except psycopg.Error as exc:
            raise self._translate(exc) from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _translate(self, exc: Exception) -> RegistryError:
        """A lost or unreachable server is RegistryUnavailable; anything else (a constraint, a timeout on
        a lock) a RegistryError naming the database."""
        errors = psycopg.errors
        if isinstance(exc, errors.QueryCanceled | errors.LockNotAvailable):
            return RegistryUnavailable(f"registry database {self.where} did not answer in time: {_first_line(exc)}")
        if isinstance(exc, psycopg.OperationalError) or (self._conn is not None and self._conn.broken):
            return RegistryUnavailable(f"registry database {self.where} is unreachable: {_first_line(exc)}")
        return RegistryError(f"registry {self.where}: {_first_line(exc)}")


def _placeholders(sql: str) -> str:
    """The registry's ``?`` placeholders in psycopg's spelling (the registry's SQL holds no literal ? or %)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
