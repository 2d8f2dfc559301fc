"""A real squid (Debian package `squid`) on 127.0.0.1, as the hospital's HTTP CONNECT proxy in tests.

`running_squid(procs, root, users=...)` writes a config of its own and runs `squid -N` (foreground) as a
`ManagedProcess`, ended by PID when the block exits. The proxy it makes:
- listens on `127.0.0.1:<free port>`;
- allows only CONNECT, only to 127.0.0.1 (optionally only to `connect_ports`), anything else is 403;
- wants HTTP Basic credentials (`basic_ncsa_auth` with an htpasswd file made by `openssl passwd -apr1
  -stdin`: the password goes on stdin, never on a command line; the file is mode 0600);
- caches nothing, runs no pinger, and writes one access-log line per transaction in a fixed format
  (`SquidHandle.access_entries()`). A CONNECT is logged when its tunnel closes, not when it opens.

Squid started as root switches to `cache_effective_user` (it refuses to keep root), so when the tests
run as root every file squid reads or writes lives in a private directory under the system temp dir,
owned by that user, mode 0700, removed afterwards; its logs are copied to `root` first. Each squid gets a
unique service name (`-n`), which keeps its shared-memory segments apart from any other squid.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import missing_prerequisite
from .dcmtk import find_binary
from .ports import free_port
from .procs import ManagedProcess, ProcessTracker, wait_for_port

__all__ = ["AccessEntry", "SquidHandle", "require_squid", "running_squid"]

NCSA_HELPERS = ("/usr/lib/squid/basic_ncsa_auth", "/usr/lib/squid3/basic_ncsa_auth")
UNPRIVILEGED_USERS = ("proxy", "nobody")
# One line per transaction: time client:port status method target user server:port.
LOG_FORMAT = "tunneltest %ts %>a %>p %Ss/%>Hs %rm %ru %un %<a %<p"


@dataclass(frozen=True)
class AccessEntry:
    """One access-log line. `result` is e.g. TCP_TUNNEL/200 or TCP_DENIED/407; `target` host:port."""

    client: str
    client_port: int
    result: str
    method: str
    target: str
    user: str
    server: str
    server_port: str

    @property
    def status(self) -> int:
        return int(self.result.rsplit("/", 1)[1])


@dataclass
class SquidHandle:
    port: int
    workdir: Path
    proc: ManagedProcess

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def access_entries(self) -> list[AccessEntry]:
        try:
            lines = self.access_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        return [entry for line in lines if (entry := _parse_entry(line)) is not None]

    def connects(self, target: str) -> list[AccessEntry]:
        """The CONNECT transactions to `target` (host:port) that have ended so far."""
        return [e for e in self.access_entries() if e.method == "CONNECT" and e.target == target]


def _parse_entry(line: str) -> AccessEntry | None:
    fields = line.split()
    if len(fields) != 9:
        return None
    _ts, client, client_port, result, method, target, user, server, server_port = fields
    if "/" not in result or not client_port.isdigit():
        return None
    return AccessEntry(client, int(client_port), result, method, target, user, server, server_port)


def require_squid() -> tuple[str, str, str]:
    """Paths of squid, basic_ncsa_auth and openssl; fail under CI=true, skip elsewhere, if missing."""
    squid, openssl = find_binary("squid"), find_binary("openssl")
    helper = next((h for h in NCSA_HELPERS if os.access(h, os.X_OK)), None)
    if squid is None or helper is None or openssl is None:
        missing_prerequisite(
            "squid (with basic_ncsa_auth) and openssl are needed for the proxy tests "
            "(Debian packages 'squid' and 'openssl'; `bash scripts/bootstrap.sh` installs squid)"
        )
    return squid, helper, openssl


def _apr1_hash(openssl: str, password: str) -> str:
    done = subprocess.run([openssl, "passwd", "-apr1", "-stdin"], input=password + "\n", capture_output=True,
                          text=True, timeout=30, check=False)
    if done.returncode != 0 or not done.stdout.startswith("$apr1$"):
        raise RuntimeError(f"openssl passwd failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


def _write_private(path: Path, text: str, owner: pwd.struct_passwd | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _effective_user() -> pwd.struct_passwd | None:
    """The user squid switches to when started as root (None when not root: it stays who it is)."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError(f"running as root and none of the users {UNPRIVILEGED_USERS} exists for squid")


def _config(workdir: Path, port: int, helper: str, owner: pwd.struct_passwd | None,
            connect_ports: Sequence[int] | None) -> str:
    lines = [
        f"http_port 127.0.0.1:{port}",
        "visible_hostname tunnel-test-squid",
        f"pid_filename {workdir / 'squid.pid'}",
        f"cache_log stdio:{workdir / 'cache.log'}",
        f"logformat {LOG_FORMAT}",
        f"access_log stdio:{workdir / 'access.log'} tunneltest",
        "cache_store_log none",
        f"coredump_dir {workdir}",
        "cache deny all",
        "cache_mem 8 MB",
        "pinger_enable off",
        "shutdown_lifetime 1 seconds",
        f"auth_param basic program {helper} {workdir / 'htpasswd'}",
        "auth_param basic children 2",
        "auth_param basic realm tunnel-test",
        "acl CONNECT method CONNECT",
        "acl to_loopback dst 127.0.0.1",
        "acl authed proxy_auth REQUIRED",
        "http_access deny !CONNECT",
        "http_access deny !to_loopback",
    ]
    if connect_ports is not None:
        lines += [f"acl allowed_ports port {' '.join(str(p) for p in connect_ports) or '0'}",
                  "http_access deny !allowed_ports"]
    lines += ["http_access allow authed", "http_access deny all"]
    if owner is not None:
        lines.append(f"cache_effective_user {owner.pw_name}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_squid(procs: ProcessTracker, root: Path, *, users: Mapping[str, str],
                  connect_ports: Sequence[int] | None = None, startup_timeout: float = 20.0
                  ) -> Iterator[SquidHandle]:
    """Start squid with Basic users `users` (name -> password); stop it by PID and clean up on exit.

    `connect_ports`: when given, CONNECT only to these ports (others get 403 Forbidden).
    """
    squid, helper, openssl = require_squid()
    root.mkdir(parents=True, exist_ok=True)
    owner = _effective_user()
    workdir = Path(tempfile.mkdtemp(prefix="tunnel-squid-")) if owner is not None else root
    service = "tsq" + uuid.uuid4().hex[:12]
    proc: ManagedProcess | None = None
    try:
        if owner is not None:
            os.chown(workdir, owner.pw_uid, owner.pw_gid)
        htpasswd = "".join(f"{user}:{_apr1_hash(openssl, pw)}\n" for user, pw in users.items())
        _write_private(workdir / "htpasswd", htpasswd, owner)
        port = free_port()
        conf = workdir / "squid.conf"
        _write_private(conf, _config(workdir, port, helper, owner, connect_ports), owner)
        proc = procs.spawn([squid, "-N", "-n", service, "-f", str(conf)], name="squid")
        wait_for_port("127.0.0.1", port, startup_timeout, proc=proc)
        yield SquidHandle(port, workdir, proc)
    finally:
        if proc is not None:
            proc.stop()
        if workdir != root:
            for name in ("access.log", "cache.log"):
                with contextlib.suppress(OSError):
                    shutil.copyfile(workdir / name, root / name)
            shutil.rmtree(workdir, ignore_errors=True)
        for leftover in Path("/dev/shm").glob(f"{service}-*"):  # only after a SIGKILL; named after us
            with contextlib.suppress(OSError):
                leftover.unlink()
