"""A real PostgreSQL server of the caller's own, on 127.0.0.1, for the tests, the demo and the benchmark.

Theory of operation: the Debian package's server binaries (``/usr/lib/postgresql/<highest>/bin``) make a
new cluster (``initdb``, SCRAM passwords, UTF8, C locale, no fsync) and run its postmaster as a child of
the caller's :class:`~devkit.procs.ProcessTracker`, so it is ended by its own PID like every other child.
PostgreSQL refuses to run as root: as root, initdb and the postmaster run as the system user
``postgres`` (the package creates it); otherwise as ourselves. The server listens on one free TCP port of
127.0.0.1 and on no Unix socket. The password never appears in an argv or a URL: initdb reads it from a
file the server user can read (deleted after initdb), the client tools get it as ``PGPASSWORD``.

Calling contract:
- ``with postgres_server(procs, directory) as server:`` makes a cluster, starts it, waits (bounded) until
  it accepts connections, creates ``database`` owned by ``user`` and yields a :class:`PostgresServer`.
  On exit it is stopped. Under ``directory``, a new ``postgres-*`` directory holds ``password`` (0600,
  ours) and, when the server user can reach it, ``server/data`` (0700, the server user's); when it
  cannot (pytest's tmp dirs are 0700 root's), the data dir is made under /tmp (not $TMPDIR) and removed
  on exit.
- ``server.url`` is ``postgresql://<user>@127.0.0.1:<port>/<database>`` (no password): pass
  ``server.password`` or ``server.password_file`` next to it.
- ``server.stop()`` ends the postmaster by PID (fast shutdown: sessions are cut, not waited for) and is
  idempotent; ``server.start()`` starts it again on the same data dir and port ("the database was down").
- ``server.psql(sql)`` runs SQL through the psql binary and returns its unaligned, tuples-only output.
- ``missing_postgres()`` says why no server can be started here (or None); the ``postgres`` fixture of
  :mod:`devkit.fixtures` turns that into a skip, or a failure under CI.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from devkit.errors import CommandFailed, DevkitError, MissingProgram
from devkit.ports import LOOPBACK, free_port
from devkit.procs import ManagedProcess, ProcessTracker, StopFailed
from devkit.waits import wait_until

__all__ = ["PostgresServer", "find_bin_dir", "missing_postgres", "postgres_server", "server_user"]

POSTGRES_ROOT = Path("/usr/lib/postgresql")
DEB_PACKAGE = "postgresql"
SERVER_USER = "postgres"
SERVER_PROGRAMS = ("initdb", "postgres", "pg_isready", "psql")
SERVER_SETTINGS = ("fsync=off", "max_connections=200", "shared_buffers=32MB")
START_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.1
INITDB_TIMEOUT_SECONDS = 120.0
QUERY_TIMEOUT_SECONDS = 30.0
READY_CHECK_TIMEOUT_SECONDS = 5.0
FAST_SHUTDOWN_SECONDS = 10.0
SHARED_TMP = "/tmp"  # where a data dir goes when the caller's directory is private (root's pytest tmp dirs)
CONNECT_TIMEOUT_SECONDS = "10"  # libpq's PGCONNECT_TIMEOUT, so no client call waits on a dead server
PASSWORD_BYTES = 24
# Role and database names the URL and the SQL can carry unquoted and unescaped.
NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
VERSION = re.compile(r"\d+(\.\d+)*")


@dataclass(eq=False)
class PostgresServer:
    """One cluster and its postmaster (``process``, None before the first start). Made by
    :func:`postgres_server`; after ``stop()``, ``start()`` brings it back on the same port."""

    procs: ProcessTracker = field(repr=False)
    bin_dir: Path
    data_dir: Path
    port: int
    user: str
    database: str
    password: str = field(repr=False)
    password_file: Path
    run_as: str | None = None  # the system user it runs as; None: ourselves
    host: str = LOOPBACK
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """libpq URL of the database, without the password."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start the postmaster (no-op if it runs) and return once it accepts connections. If it exits
        first or ``timeout`` s pass, it is ended and ProcessExited / WaitTimeout carries its log tail."""
        if self.running:
            return
        self.process = self.procs.spawn(self._argv(), name="postgres", cwd=self.data_dir.parent,
                                        user=self.run_as)
        try:
            wait_until(self._accepting, timeout, POLL_SECONDS, watch=[self.process],
                       message=f"PostgreSQL on {self.host}:{self.port} to accept connections")
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = FAST_SHUTDOWN_SECONDS) -> None:
        """End the postmaster by its PID: SIGINT (fast shutdown: open sessions are cut, the cluster is
        left clean), then the tracker's SIGTERM / SIGKILL if it outlives ``grace`` s. Idempotent."""
        proc = self.process
        if proc is None:
            return
        if proc.running:
            proc.kill(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        ended = self.procs.stop(proc)
        if ended.error is not None:
            raise StopFailed([ended])

    def psql(self, sql: str, *, database: str | None = None, password: str | None = None,
             timeout: float = QUERY_TIMEOUT_SECONDS) -> str:
        """Run ``sql`` (on stdin, stopping at the first error) as ``user`` in ``database`` (default: the
        server's) with ``password`` (default: the right one). Returns the rows, ``|``-separated, one a
        line; CommandFailed (with psql's stderr) on any error, a refused login included."""
        argv = [self.bin_dir / "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.host,
                "-p", str(self.port), "-U", self.user, "-d", database or self.database, "-f", "-"]
        done = self.procs.run(argv, timeout=timeout, input=sql, env=self.client_env(password), name="psql")
        if done.returncode:
            raise CommandFailed(f"psql on {self.host}:{self.port} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout.rstrip("\n")

    def client_env(self, password: str | None = None) -> dict[str, str]:
        """Environment for a libpq client (psql, pg_dump): the password and a connect timeout."""
        return {"PGPASSWORD": self.password if password is None else password,
                "PGCONNECT_TIMEOUT": CONNECT_TIMEOUT_SECONDS}

    def _argv(self) -> list[str | Path]:
        settings = [arg for setting in SERVER_SETTINGS for arg in ("-c", setting)]
        return [self.bin_dir / "postgres", "-D", self.data_dir, "-h", self.host, "-p", str(self.port),
                "-k", "", *settings]

    def _accepting(self) -> bool:
        argv = [self.bin_dir / "pg_isready", "-q", "-h", self.host, "-p", str(self.port), "-t", "2"]
        return self.procs.run(argv, timeout=READY_CHECK_TIMEOUT_SECONDS, name="pg_isready").returncode == 0


@contextlib.contextmanager
def postgres_server(procs: ProcessTracker, directory: Path, *, database: str = "registry", user: str = "tunnel",
                    password: str | None = None) -> Iterator[PostgresServer]:
    """A new cluster under ``directory``, started, with ``database`` owned by ``user`` (whose password is
    ``password``, or a random one); stopped on exit. Raises MissingProgram when the binaries or the
    server user are missing (:func:`missing_postgres` says so beforehand)."""
    for kind, name in (("database", database), ("user", user)):
        if not NAME.fullmatch(name):
            raise ValueError(f"{kind} name {name!r} must match {NAME.pattern}")
    if password is not None and (not password or "\n" in password or "\r" in password):
        raise ValueError("password must be one non-empty line")
    secret = secrets.token_urlsafe(PASSWORD_BYTES) if password is None else password
    bin_dir, run_as = find_bin_dir(), server_user()
    directory.mkdir(parents=True, exist_ok=True)
    record = Path(tempfile.mkdtemp(prefix="postgres-", dir=directory))
    password_file = record / "password"
    _write_secret(password_file, secret)
    home, outside = _server_home(record, run_as)
    try:
        data_dir = _initdb(procs, bin_dir, home, user, secret, run_as)
        server = PostgresServer(procs, bin_dir, data_dir, free_port(), user, database, secret, password_file,
                                run_as)
        try:
            server.start()
            if database != "postgres":
                server.psql(f'CREATE DATABASE "{database}" OWNER "{user}"', database="postgres")
            yield server
        finally:
            server.stop()
    finally:
        if outside:
            shutil.rmtree(home)


def find_bin_dir(root: Path = POSTGRES_ROOT) -> Path:
    """``<root>/<version>/bin`` of the highest installed version that has every program we run."""
    versions = [entry for entry in root.iterdir() if VERSION.fullmatch(entry.name)] if root.is_dir() else []
    for version in sorted(versions, key=lambda entry: [int(part) for part in entry.name.split(".")], reverse=True):
        bin_dir = version / "bin"
        if all(os.access(bin_dir / name, os.X_OK) for name in SERVER_PROGRAMS):
            return bin_dir
    raise MissingProgram(f"no PostgreSQL server binaries ({', '.join(SERVER_PROGRAMS)}) under "
                         f"{root}/<version>/bin (Debian package {DEB_PACKAGE!r}; scripts/bootstrap.sh installs it)")


def server_user() -> str | None:
    """The system user the server runs as: None (ourselves) unless we are root, who may not run it."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError as exc:
        raise MissingProgram(f"no system user {SERVER_USER!r} to run PostgreSQL as (it refuses root); "
                             f"the Debian package {DEB_PACKAGE!r} creates it") from exc
    return SERVER_USER


def missing_postgres() -> str | None:
    """Why a PostgreSQL server cannot be started here (binaries, server user), or None."""
    try:
        find_bin_dir()
        server_user()
    except MissingProgram as exc:
        return str(exc)
    return None


def _write_secret(path: Path, text: str, owner: pwd.struct_passwd | None = None) -> None:
    """Write ``text`` to a new file, mode 0600, ours or ``owner``'s."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(fd, 0o600)  # the umask could only have removed bits; say exactly what we mean
        if owner is not None:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
        handle.write(text)


def _server_home(record: Path, run_as: str | None) -> tuple[Path, bool]:
    """A new directory (0700) of the server user's for the data dir; True if it is outside ``record``
    (the server user cannot pass through ``record``'s parents) and must be removed afterwards."""
    if run_as is None:
        home = record / "server"
        home.mkdir(mode=0o700)
        return home, False
    owner = pwd.getpwnam(run_as)
    if _searchable(record.parent, owner):
        record.chmod(0o711)  # the server user may pass through, not list; the password file stays 0600
        home, outside = record / "server", False
        home.mkdir(mode=0o700)
    else:
        # The system temp dir, not $TMPDIR: a caller's TMPDIR may itself sit in a private directory.
        home, outside = Path(tempfile.mkdtemp(prefix="devkit-postgres-", dir=SHARED_TMP)), True
        if not _searchable(home.parent, owner):
            shutil.rmtree(home)
            raise DevkitError(f"user {run_as!r} can reach neither {record} nor {home.parent}")
    os.chown(home, owner.pw_uid, owner.pw_gid)
    return home, outside


def _searchable(path: Path, owner: pwd.struct_passwd) -> bool:
    """Whether ``owner`` (primary group only, as our children run) may pass through ``path`` and every
    directory above it. ACLs are not read: at worst a reachable directory is taken for unreachable."""
    for directory in (path.resolve(), *path.resolve().parents):
        info = directory.stat()
        if info.st_uid == owner.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid == owner.pw_gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


def _initdb(procs: ProcessTracker, bin_dir: Path, home: Path, user: str, password: str,
            run_as: str | None) -> Path:
    """Make the cluster in ``home/data`` (0700) with superuser ``user``; the data dir."""
    owner = pwd.getpwnam(run_as) if run_as is not None else None
    data_dir, pwfile = home / "data", home / "initdb-password"
    data_dir.mkdir(mode=0o700)
    data_dir.chmod(0o700)
    if owner is not None:
        os.chown(data_dir, owner.pw_uid, owner.pw_gid)
    _write_secret(pwfile, password + "\n", owner)
    try:
        done = procs.run([bin_dir / "initdb", "-D", data_dir, "-U", user, "--auth=scram-sha-256",
                          f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-sync"],
                         timeout=INITDB_TIMEOUT_SECONDS, cwd=home, user=run_as, name="initdb")
    finally:
        pwfile.unlink()
    if done.returncode:
        raise CommandFailed(f"initdb exited {done.returncode}: {(done.stdout + done.stderr)[-4000:]}")
    return data_dir
