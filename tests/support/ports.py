"""Free TCP ports on 127.0.0.1 (the one implementation is ``tunnel_demo.localhost``)."""

from __future__ import annotations

from tunnel_demo.localhost import LOOPBACK, free_ports

__all__ = ["LOOPBACK", "free_port", "free_ports"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]
