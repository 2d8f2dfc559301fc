"""Subprocesses that are always ended, by their own PID, and bounded waits.

Theory of operation: every process a test starts is a `ManagedProcess`. It writes stdout and stderr
to one log file (under the test's tmp dir when started through the `procs` fixture) and is ended by
`stop()`: SIGTERM to its PID, up to 5 s to exit, then SIGKILL to its PID. Nothing is ever killed by
name. `spawn()` (a context manager) and the function-scoped `procs` fixture call `stop()` in a
`finally`, so a failing test still ends what it started. The signals go through the `Popen` object,
which has not reaped the child yet, so the PID cannot have been reused by another process.

Waiting is polling with a deadline (`wait_until`, `wait_for_port`), never a bare sleep.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

__all__ = [
    "ManagedProcess",
    "module_procs",
    "ProcessTracker",
    "procs",
    "port_accepts",
    "require_loopback",
    "spawn",
    "wait_for_port",
    "wait_until",
    "PHASE_REPORTS",
]

T = TypeVar("T")

STOP_GRACE_SECONDS = 5.0
KILL_WAIT_SECONDS = 5.0
LOG_TAIL_CHARS = 4000

# conftest.py stores each test phase's report here so fixtures can tell whether the test failed.
PHASE_REPORTS: pytest.StashKey[dict[str, pytest.TestReport]] = pytest.StashKey()


class ManagedProcess:
    """A child process with a log file, ended by PID. Call `stop()` (or use `with`) when done."""

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        """Start `argv` now. `env` is layered over os.environ (None: inherit it unchanged)."""
        self.argv = [os.fspath(arg) for arg in argv]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = None if env is None else {**os.environ, **env}
        with open(self.log_path, "wb") as log:
            # The child keeps its own copy of the descriptor; ours can close right away.
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,  # a terminal's Ctrl-C goes to pytest, which then stops us
            )

    def __repr__(self) -> str:
        return f"<ManagedProcess pid={self.pid} {self.argv[0]!r} returncode={self.returncode}>"

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (negative: killed by that signal), else None."""
        return self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen.poll() is None

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to this process's PID if it is still running."""
        self._popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for exit; return the status or raise subprocess.TimeoutExpired."""
        return self._popen.wait(timeout=timeout)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """End the process: SIGTERM, wait up to `grace` s, then SIGKILL. Idempotent. Returns the status."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                return self._popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._popen.kill()
        return self._popen.wait(timeout=KILL_WAIT_SECONDS)

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log_text()[-chars:]

    def describe(self) -> str:
        """A one-paragraph summary for failure messages: argv, status, log path and its tail."""
        return (
            f"{self.argv!r} pid={self.pid} returncode={self.returncode}\n"
            f"log {self.log_path}:\n{self.log_tail()}"
        )


@contextlib.contextmanager
def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> Iterator[ManagedProcess]:
    """Start `argv` and end it by PID when the block exits, however it exits.

    Without `log_path` the log goes to a new temporary file (prefer the `procs` fixture in tests: it
    puts logs under the test's tmp dir).
    """
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="proc-", suffix=".log")
        os.close(fd)
        log_path = name
    proc = ManagedProcess(argv, log_path=Path(log_path), env=env, cwd=cwd)
    try:
        yield proc
    finally:
        proc.stop()


class ProcessTracker:
    """Starts processes for one test and ends them all, newest first, in `stop_all()`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.processes: list[ManagedProcess] = []

    def spawn(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
    ) -> ManagedProcess:
        """Start `argv` (log: <tmp>/procs/<name>-<n>.log unless `log_path`); it is ended at teardown."""
        if log_path is None:
            stem = name or Path(os.fspath(argv[0])).name
            log_path = self.log_dir / f"{stem}-{len(self.processes)}.log"
        proc = ManagedProcess(argv, log_path=Path(log_path), env=env, cwd=cwd)
        self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        """End every tracked process by PID; raise only after trying all of them."""
        errors: list[BaseException] = []
        for proc in reversed(self.processes):
            try:
                proc.stop()
            except Exception as exc:  # keep ending the others; report below
                errors.append(exc)
        if errors:
            raise RuntimeError(f"could not end {len(errors)} process(es): {errors!r}")

    def report(self) -> str:
        return "\n\n".join(proc.describe() for proc in self.processes)


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessTracker]:
    """Function-scoped process tracker: `procs.spawn(argv, ...)`; all are ended at teardown.

    When the test failed, the processes' log tails are printed (pytest shows them with the failure).
    """
    tracker = ProcessTracker(tmp_path / "procs")
    try:
        yield tracker
    finally:
        try:
            tracker.stop_all()
        finally:
            reports = request.node.stash.get(PHASE_REPORTS, {})
            if tracker.processes and any(rep.failed for rep in reports.values()):
                print(f"--- processes started by this test ---\n{tracker.report()}")


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessTracker]:
    """Module-scoped tracker, for a peer shared by a module's tests (Orthanc takes ~3.5 s to stop)."""
    tracker = ProcessTracker(tmp_path_factory.mktemp("module-procs"))
    try:
        yield tracker
    finally:
        tracker.stop_all()


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    *,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll `predicate` until it returns something truthy (returned) or `timeout` s pass (TimeoutError).

    `message` (or a callable producing it, evaluated only on timeout) names what was awaited.
    """
    if timeout <= 0 or interval <= 0:
        raise ValueError("timeout and interval must be positive")
    deadline = time.monotonic() + timeout
    max_polls = int(timeout / interval) + 2  # bounded in count as well as in time
    for _ in range(max_polls):
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
    text = message() if callable(message) else message
    raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {text}")


def require_loopback(host: str) -> None:
    if host == "localhost":
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"tests only connect to loopback addresses, not {host!r}")


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connect to host:port (loopback only) succeeds now."""
    require_loopback(host)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0, *, proc: ManagedProcess | None = None) -> None:
    """Wait until host:port (loopback only) accepts a TCP connection, at most `timeout` s.

    With `proc`, fail at once (with its log) if that process exits before the port opens.
    """
    require_loopback(host)

    def ready() -> bool:
        if proc is not None and not proc.running:
            raise RuntimeError(f"process exited before {host}:{port} opened:\n{proc.describe()}")
        return port_accepts(host, port, timeout=0.5)

    def why() -> str:
        extra = f"\n{proc.describe()}" if proc is not None else ""
        return f"{host}:{port} to accept connections{extra}"

    wait_until(ready, timeout, interval=0.02, message=why)
