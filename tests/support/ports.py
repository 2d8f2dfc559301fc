"""Free TCP ports on 127.0.0.1 for tests: the dev kit's (``devkit.ports``), re-exported."""

from __future__ import annotations

from devkit.ports import LOOPBACK, free_port, free_ports

__all__ = ["LOOPBACK", "free_port", "free_ports"]
