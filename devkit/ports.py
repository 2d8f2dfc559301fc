"""Free TCP ports on 127.0.0.1, for the tests, the demo and the benchmark.

The kernel picks a port for a socket bound to port 0; we close it and hand the number out. Another
process could take it in between: a small race that local tools accept. A port free here is free in a
network namespace made afterwards too (a new namespace has nothing listening).
"""

from __future__ import annotations

import socket

__all__ = ["LOOPBACK", "free_port", "free_ports"]

LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 (all held open together while choosing)."""
    if not 1 <= count <= 64:
        raise ValueError(f"count must be in 1..64, got {count}")
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """One TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]
