"""Free TCP ports on 127.0.0.1, for the tests, the demo and the benchmark.

The kernel picks a port for a socket bound to port 0; we close it and hand the number out. Another
process could take it in between: a small race that local tools accept. The kernel may also pick the same
number again for the next caller before the first has bound it (one test's relay admin port and its agent's
listener were once the same), so a number handed out here is not handed out again while it is among the
last ``REMEMBERED`` ones. A port free here is free in a network namespace made afterwards too (a new
namespace has nothing listening).
"""

from __future__ import annotations

import collections
import socket
import threading

__all__ = ["LOOPBACK", "free_port", "free_ports"]

LOOPBACK = "127.0.0.1"
REMEMBERED = 4096  # recent numbers never handed out twice (the ephemeral range holds ~28,000)
_ATTEMPTS = 64  # binds tried per port wanted before giving up

_recent: collections.deque[int] = collections.deque(maxlen=REMEMBERED)
_recent_lock = threading.Lock()


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 (all held open together while choosing)."""
    if not 1 <= count <= 64:
        raise ValueError(f"count must be in 1..64, got {count}")
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        with _recent_lock:
            for _ in range(count * _ATTEMPTS):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)  # held open until all are chosen: the kernel skips it meanwhile
                sock.bind((LOOPBACK, 0))
                port = sock.getsockname()[1]
                if port not in _recent:
                    ports.append(port)
                    if len(ports) == count:
                        _recent.extend(ports)
                        return ports
        raise OSError(f"no {count} fresh TCP ports on {LOOPBACK} after {count * _ATTEMPTS} tries")
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """One TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]
