"""Child processes that are always ended, by their own PID, with their output in a log file.

Theory of operation: every long-running child is a :class:`ManagedProcess`, started with its stdout and
stderr in one log file and in a session of its own (a terminal's Ctrl-C reaches only its parent, which
then ends it in order). :meth:`ManagedProcess.stop` ends it: SIGTERM to its PID, up to ``grace`` seconds,
then SIGKILL to its PID. Nothing is ever killed by name. The signals go through the ``Popen`` object,
which has not reaped the child yet, so the PID cannot have been reused by another process.

A :class:`ProcessTracker` owns the children of one test, demo run or benchmark run:

- ``spawn(argv, name=...)`` starts one (log ``<log_dir>/<name>.log``) and returns it;
- ``run(argv, name=..., timeout=...)`` runs a short command to completion (ended by PID if it overruns);
- ``stop(proc)`` ends one now; ``stop_all()`` ends the rest, newest first, and is called in a ``finally``
  (the ``procs`` fixtures of :mod:`devkit.fixtures` do it). It tries every child before raising
  :class:`StopFailed`, and returns how each one ended.
- With ``pids_file``, every PID is appended to that file (``<pid> <name>``) as soon as it exists, so a
  caller's caller can check afterwards that none survived.

``spawn()`` (a context manager) is the one-process form. ``raise_nofile_limit`` lifts this process's
descriptor limit, which every child started afterwards inherits.

``user=`` (``ManagedProcess``, ``spawn``/``run`` of a tracker, ``run_command``) runs the child as that
system user, with that user's primary group and no supplementary groups: a server that refuses to run as
root (PostgreSQL) started while we are root. Naming the user we already are changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import resource
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devkit.errors import DevkitError

__all__ = [
    "Ended",
    "ManagedProcess",
    "ProcessTracker",
    "StopFailed",
    "raise_nofile_limit",
    "run_command",
    "spawn",
]

STOP_GRACE_SECONDS = 5.0
KILL_WAIT_SECONDS = 5.0
LOG_TAIL_CHARS = 4000

Argv = Sequence[str | os.PathLike[str]]
Env = Mapping[str, str] | None


def _identity(user: str | None) -> dict[str, Any]:
    """Popen's user=/group=/extra_groups= for running a child as ``user`` (None or ourselves: nothing)."""
    if user is None:
        return {}
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise DevkitError(f"no system user {user!r} to run a child process as") from exc
    if entry.pw_uid == os.geteuid() and entry.pw_gid == os.getegid():
        return {}  # already that user; setgroups() would need privileges we may not have
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@dataclass(frozen=True)
class Ended:
    """How one child ended: its exit status (negative: that signal), whether SIGKILL was needed, or why
    it could not be ended (``error``)."""

    name: str
    pid: int
    returncode: int | None
    killed: bool = False
    error: str | None = None

    def __str__(self) -> str:
        if self.error is not None:
            how = f"could not be ended: {self.error}"
        elif self.killed:
            how = "did not stop on SIGTERM, killed"
        else:
            how = f"exit status {self.returncode}"
        return f"{self.name} (pid {self.pid}): {how}"


class StopFailed(DevkitError, RuntimeError):
    """Some children could not be ended; ``ended`` says how every one of them ended (or did not)."""

    def __init__(self, ended: Sequence[Ended]) -> None:
        self.ended = list(ended)
        failed = [str(e) for e in self.ended if e.error is not None]
        super().__init__(f"could not end {len(failed)} process(es): " + "; ".join(failed))


class ManagedProcess:
    """A child process with a log file, ended by PID. Call :meth:`stop` (or use ``with``) when done."""

    def __init__(self, argv: Argv, *, log_path: Path, name: str | None = None, env: Env = None,
                 cwd: str | os.PathLike[str] | None = None, user: str | None = None) -> None:
        """Start ``argv`` now. ``env`` is layered over os.environ (None: inherit it unchanged); ``user``:
        run it as that system user (its primary group, no supplementary groups)."""
        self.argv = [os.fspath(arg) for arg in argv]
        self.name = name or Path(self.argv[0]).name
        self.log_path = Path(log_path)
        self.killed = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self._popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, env=None if env is None else {**os.environ, **env},
                                           cwd=cwd, start_new_session=True, **_identity(user))

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} returncode={self.returncode}>"

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
        """Send ``sig`` to this process's PID if it is still running (SIGSTOP/SIGCONT freeze and thaw it)."""
        self._popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for exit; return the status or raise ``subprocess.TimeoutExpired``."""
        return self._popen.wait(timeout=timeout)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """End the process: SIGTERM, wait up to ``grace`` s, then SIGKILL. Idempotent. Returns the status.

        Raises ``subprocess.TimeoutExpired`` only if it outlives SIGKILL by KILL_WAIT_SECONDS."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGTERM)
            try:
                return self._popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.killed = True
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
        """A paragraph for failure messages: name, PID, status, argv, and the tail of its log."""
        return (f"{self.name} pid={self.pid} returncode={self.returncode} argv={self.argv!r}\n"
                f"--- last lines of {self.log_path} ---\n{self.log_tail()}")


def _end(proc: ManagedProcess, grace: float) -> Ended:
    try:
        status = proc.stop(grace)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Ended(proc.name, proc.pid, proc.returncode, proc.killed, repr(exc))
    return Ended(proc.name, proc.pid, status, proc.killed)


class ProcessTracker:
    """Starts children (logs under ``log_dir``) and ends them all, newest first, in :meth:`stop_all`."""

    def __init__(self, log_dir: Path, *, pids_file: Path | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.pids_file = pids_file
        self.processes: list[ManagedProcess] = []  # every child ever started, for reports
        self._live: list[ManagedProcess] = []  # those not ended yet, oldest first

    def spawn(self, argv: Argv, *, env: Env = None, cwd: str | os.PathLike[str] | None = None,
              name: str | None = None, log_path: str | os.PathLike[str] | None = None,
              user: str | None = None) -> ManagedProcess:
        """Start ``argv`` (log: ``<log_dir>/<name>.log`` unless ``log_path``; as ``user`` if given); it is
        ended by stop_all()."""
        name = name or Path(os.fspath(argv[0])).name
        proc = ManagedProcess(argv, log_path=Path(log_path) if log_path else self._log_path(name), name=name,
                              env=env, cwd=cwd, user=user)
        self.processes.append(proc)
        self._live.append(proc)
        self._record(proc.pid, name)
        return proc

    def run(self, argv: Argv, *, timeout: float, name: str | None = None, input: str | None = None,
            env: Env = None, cwd: str | os.PathLike[str] | None = None,
            user: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a short command to completion; see :func:`run_command`. Its PID goes to the pids file too."""
        label = name or Path(os.fspath(argv[0])).name
        return run_command(argv, timeout=timeout, input=input, env=env, cwd=cwd, user=user,
                           on_start=lambda pid: self._record(pid, label))

    def stop(self, proc: ManagedProcess, grace: float = STOP_GRACE_SECONDS) -> Ended:
        """End one child now (it is not ended again by stop_all)."""
        if proc in self._live:
            self._live.remove(proc)
        return _end(proc, grace)

    def stop_all(self, grace: float = STOP_GRACE_SECONDS) -> list[Ended]:
        """End every child not ended yet, newest first; how each ended. Raises StopFailed (after trying
        every one) if any could not be ended."""
        ended = []
        while self._live:
            ended.append(_end(self._live.pop(), grace))
        if any(e.error is not None for e in ended):
            raise StopFailed(ended)
        return ended

    def report(self) -> str:
        """Every child's :meth:`ManagedProcess.describe`, for a failure message."""
        return "\n\n".join(proc.describe() for proc in self.processes)

    def _log_path(self, name: str) -> Path:
        taken = {proc.log_path for proc in self.processes}
        path = self.log_dir / f"{name}.log"
        return path if path not in taken else self.log_dir / f"{name}-{len(self.processes)}.log"

    def _record(self, pid: int, name: str) -> None:
        if self.pids_file is not None:
            with open(self.pids_file, "a", encoding="utf-8") as handle:
                handle.write(f"{pid} {name}\n")


def run_command(argv: Argv, *, timeout: float, input: str | None = None, env: Env = None,
                cwd: str | os.PathLike[str] | None = None,
                on_start: Callable[[int], object] | None = None,
                user: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion: ``input`` on its standard input (secrets go there, never into argv),
    stdout and stderr captured as text, as system ``user`` if given. Returns the finished process
    whatever its exit status.

    After ``timeout`` s it is ended by its PID (SIGTERM, grace, SIGKILL) and ``subprocess.TimeoutExpired``
    is raised. ``on_start(pid)`` is called as soon as the PID exists."""
    full_env = None if env is None else {**os.environ, **env}
    stdin = subprocess.DEVNULL if input is None else subprocess.PIPE
    popen = subprocess.Popen([os.fspath(a) for a in argv], stdin=stdin, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd, start_new_session=True,
                             **_identity(user))
    try:
        if on_start is not None:
            on_start(popen.pid)
        out, err = popen.communicate(input=input, timeout=timeout)
    except BaseException:  # the timeout, or a Ctrl-C while it runs: it must not outlive us
        _stop_popen(popen)
        for stream in (popen.stdin, popen.stdout, popen.stderr):
            if stream is not None:
                stream.close()
        raise
    return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)


def _stop_popen(popen: subprocess.Popen[str]) -> None:
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=STOP_GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            popen.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=KILL_WAIT_SECONDS)


@contextlib.contextmanager
def spawn(argv: Argv, *, env: Env = None, cwd: str | os.PathLike[str] | None = None,
          log_path: str | os.PathLike[str] | None = None) -> Iterator[ManagedProcess]:
    """Start ``argv`` and end it by PID when the block exits, however it exits.

    Without ``log_path`` the log goes to a new temporary file (tests: prefer the ``procs`` fixture, which
    puts logs under the test's tmp dir)."""
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="proc-", suffix=".log")
        os.close(fd)
        log_path = name
    proc = ManagedProcess(argv, log_path=Path(log_path), env=env, cwd=cwd)
    try:
        yield proc
    finally:
        proc.stop()


def raise_nofile_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (children inherit it). Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)
