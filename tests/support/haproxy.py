"""Debian's haproxy, as the L4 balancer in front of a fleet of relays (run as a plain process)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support import missing_prerequisite

__all__ = ["haproxy_binary"]


def haproxy_binary() -> str:
    """The haproxy executable; a missing one is a missing prerequisite (a failure in CI)."""
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if path is None:
        missing_prerequisite("haproxy (Debian package haproxy) is not installed")
    return str(path)
