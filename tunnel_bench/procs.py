"""Processes the benchmark starts, always ended by their own PID; bounded waits; ports; descriptor limit.

Theory of operation: every child is a :class:`Proc` registered in one :class:`ProcessSet` that the
benchmark ends in a ``finally`` (newest first: SIGTERM to the PID, a grace period, then SIGKILL to the
PID). Nothing is ever killed by name. Signals go through the ``Popen`` object, which has not reaped
the child yet, so the PID cannot have been reused. Waiting is polling with a deadline, never a bare sleep.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from tunnel_bench.errors import BenchError
from tunnel_demo.localhost import LOOPBACK, free_ports

__all__ = [
    "LOOPBACK",
    "Proc",
    "ProcessSet",
    "find_native_binary",
    "free_ports",
    "port_accepts",
    "raise_nofile_limit",
    "require_binary",
    "venv_bin",
    "wait_for_port",
    "wait_until",
]

T = TypeVar("T")
STOP_GRACE_SECONDS = 5.0
SYSTEM_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class Proc:
    """One child process with its own log file. End it with :meth:`stop` (or through its ProcessSet)."""

    def __init__(self, argv: Sequence[str], *, name: str, log_path: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self._popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=None if env is None else {**os.environ, **env}, start_new_session=True)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def running(self) -> bool:
        return self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for exit; raises ``subprocess.TimeoutExpired``."""
        return self._popen.wait(timeout=timeout)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """SIGTERM the PID, wait up to ``grace`` s, then SIGKILL the PID. Idempotent; returns the status."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                return self._popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._popen.kill()
        return self._popen.wait(timeout=STOP_GRACE_SECONDS)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def describe(self) -> str:
        return f"{self.name} pid={self.pid} rc={self.returncode} argv={self.argv!r}\n{self.log_tail()}"


class ProcessSet:
    """Starts children (logs under ``log_dir``) and ends them all, newest first, in :meth:`stop_all`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[Proc] = []

    def spawn(self, argv: Sequence[str], *, name: str, env: Mapping[str, str] | None = None) -> Proc:
        proc = Proc(argv, name=name, log_path=self.log_dir / f"{name}-{len(self._procs)}.log", env=env)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """End one child now and forget it."""
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> list[str]:
        """End every child by PID; returns a description of each one that could not be ended."""
        problems = []
        for proc in reversed(self._procs):
            try:
                proc.stop()
            except (OSError, subprocess.TimeoutExpired) as exc:
                problems.append(f"{proc.name} pid={proc.pid}: {exc!r}")
        self._procs.clear()
        return problems


def wait_until(predicate: Callable[[], T], timeout: float, *, interval: float = 0.02,
               what: str | Callable[[], str] = "condition") -> T:
    """Poll ``predicate`` until truthy (returned) or ``timeout`` s pass (BenchError naming ``what``)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    result = predicate()
    if result:
        return result
    raise BenchError(f"timed out after {timeout:.1f} s waiting for {what() if callable(what) else what}")


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 15.0, *, proc: Proc | None = None) -> None:
    """Wait until 127.0.0.1:``port`` accepts; with ``proc``, fail at once (with its log) if it exits."""

    def ready() -> bool:
        if proc is not None and not proc.running:
            raise BenchError(f"process exited before port {port} opened:\n{proc.describe()}")
        return port_accepts(port)

    wait_until(ready, timeout, what=lambda: f"port {port}" + (f"\n{proc.describe()}" if proc else ""))


def raise_nofile_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (children inherit it). Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def find_native_binary(name: str) -> str | None:
    """Absolute path of ELF executable ``name`` on PATH or a system bin dir, skipping this virtualenv
    (pynetdicom installs Python scripts named like the dcmtk tools there)."""
    venv = Path(sys.prefix).resolve()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d] + list(SYSTEM_BIN_DIRS)
    for directory in dirs:
        candidate = Path(directory) / name
        try:
            if candidate.resolve().is_relative_to(venv) or not candidate.is_file():
                continue
            with open(candidate, "rb") as handle:
                if handle.read(4) == b"\x7fELF" and os.access(candidate, os.X_OK):
                    return str(candidate)
        except OSError:
            continue
    return None


def require_binary(name: str, package: str) -> str:
    path = find_native_binary(name)
    if path is None:
        raise BenchError(f"{name!r} not found (Debian package {package!r}; `make bench` installs it)")
    return path


def venv_bin(name: str) -> str:
    """A console script installed next to this interpreter (tunnel-relay, tunnel-agent)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise BenchError(f"{path} not found: install the project into this virtualenv (make bootstrap)")
    return str(path)
