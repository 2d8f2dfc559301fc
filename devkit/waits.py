"""Bounded waits: poll a condition until it holds or a deadline passes. Never a bare sleep.

Calling contract: ``wait_until(predicate, timeout, ...)`` returns the predicate's first truthy result or
raises :class:`~devkit.errors.WaitTimeout` (a ``TimeoutError``) naming what was awaited. With ``watch``,
it raises :class:`~devkit.errors.ProcessExited` (a ``RuntimeError``) at once when one of those processes
exits first, with every watched process's log tail, so a crashed program is reported as such and not
as a slow one. ``wait_for_port`` is the same for a TCP port on a loopback address.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from devkit.errors import ProcessExited, WaitTimeout
from devkit.procs import ManagedProcess

__all__ = ["port_accepts", "require_loopback", "wait_for_port", "wait_until"]

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.02, *,
               message: str | Callable[[], str] = "condition",
               watch: Sequence[ManagedProcess | None] = ()) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` s pass.

    ``message`` (or a callable producing it, evaluated only on failure) names what was awaited."""
    if timeout <= 0 or interval <= 0:
        raise ValueError("timeout and interval must be positive")
    watched = [proc for proc in watch if proc is not None]
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):  # bounded in count as well as in time
        result = _poll(predicate, watched, message)
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    result = _poll(predicate, watched, message)
    if result:
        return result
    raise WaitTimeout(f"timed out after {timeout:.1f} s waiting for {_text(message)}{_logs(watched)}")


def _poll(predicate: Callable[[], T], watched: list[ManagedProcess], message: str | Callable[[], str]) -> T:
    for proc in watched:
        if not proc.running:
            raise ProcessExited(f"{proc.name} exited (status {proc.returncode}) while waiting for "
                                f"{_text(message)}{_logs(watched)}")
    return predicate()


def _text(message: str | Callable[[], str]) -> str:
    return message() if callable(message) else message


def _logs(watched: list[ManagedProcess]) -> str:
    return "".join(f"\n{proc.describe()}" for proc in watched)


def require_loopback(host: str) -> None:
    """Raise ValueError unless ``host`` is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the dev kit only connects to loopback addresses, not {host!r}")


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connect to host:port (loopback only) succeeds now."""
    require_loopback(host)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 15.0, *, proc: ManagedProcess | None = None) -> None:
    """Wait until host:port (loopback only) accepts a TCP connection, at most ``timeout`` s.

    With ``proc``, fail at once (with its log) if that process exits before the port opens."""
    require_loopback(host)
    wait_until(lambda: port_accepts(host, port), timeout, message=f"{host}:{port} to accept connections",
               watch=[proc])
