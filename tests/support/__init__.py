"""Reusable helpers for tests that run real peers (dcmtk, Orthanc, subprocesses) on 127.0.0.1.

Modules:
- `procs`   ManagedProcess / spawn / the `procs` fixture, bounded waits (wait_for_port, wait_until).
- `ports`   free_port / free_ports on 127.0.0.1.
- `dcmtk`   wrappers for the dcmtk command-line tools, returning result objects.
- `orthanc` start an Orthanc of our own on free ports with a config in the test's tmp dir.

Prerequisite policy: in CI (env CI=true) a missing prerequisite fails the test; elsewhere it skips and
says why (`require`).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["in_ci", "missing_prerequisite"]


def in_ci() -> bool:
    """True when running under CI (env CI is true/1/yes), where missing prerequisites are failures."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing_prerequisite(reason: str) -> NoReturn:
    """Fail the current test under CI, skip it elsewhere; `reason` says what is missing and why."""
    if in_ci():
        pytest.fail(f"missing prerequisite (CI=true, so this fails): {reason}", pytrace=False)
    pytest.skip(f"missing prerequisite: {reason}")
