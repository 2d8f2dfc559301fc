"""Processes, bounded waits and the process fixtures for tests: the dev kit's, re-exported.

The one implementation is ``devkit.procs`` (ManagedProcess, ProcessTracker, spawn), ``devkit.waits``
(wait_until, wait_for_port, port_accepts) and ``devkit.fixtures`` (the ``procs`` / ``module_procs`` /
``postgres`` fixtures, PHASE_REPORTS). This module only keeps the import path the tests have always used.
"""

from __future__ import annotations

from devkit.fixtures import PHASE_REPORTS, module_procs, postgres, procs
from devkit.procs import ManagedProcess, ProcessTracker, spawn
from devkit.waits import port_accepts, require_loopback, wait_for_port, wait_until

__all__ = [
    "ManagedProcess",
    "module_procs",
    "postgres",
    "ProcessTracker",
    "procs",
    "port_accepts",
    "require_loopback",
    "spawn",
    "wait_for_port",
    "wait_until",
    "PHASE_REPORTS",
]
