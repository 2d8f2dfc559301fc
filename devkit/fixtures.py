"""The dev kit's pytest side: process fixtures, a lab for a fixture, and the prerequisite policy.

Calling contract:
- ``procs`` (function scope) and ``module_procs`` (module scope) are fixtures yielding a
  :class:`~devkit.procs.ProcessTracker`; every process started through them is ended by PID at teardown,
  also when the test failed. Make them visible to a test module by importing them into a conftest.
- They print the processes' log tails when the test failed, which they learn from the reports a
  conftest hook stores under ``PHASE_REPORTS`` (``item.stash.setdefault(PHASE_REPORTS, {})[when] = rep``).
- ``open_lab(request, tmp_path)`` is a context manager for a fixture: it checks the lab's prerequisites
  (``require_lab``), yields a :class:`~devkit.netns.NetnsLab` and closes it, printing its processes' logs
  if the test failed.
- ``postgres`` (function scope) is a fixture yielding a started :class:`~devkit.postgres.PostgresServer` of
  the test's own (new cluster, free port on 127.0.0.1, database ``registry`` owned by ``tunnel``, random
  password), its postmaster started through ``procs`` and ended by PID at teardown. Without the Debian
  package ``postgresql`` (binaries, the ``postgres`` user when root) it is a missing prerequisite.
- ``small_tmpfs(directory, size)`` is a context manager: a tmpfs of ``size`` (``"1m"``) mounted at a new
  ``directory`` (root only: else a missing prerequisite), unmounted on every exit path.
- ``missing_prerequisite(reason)``: under CI (env CI true/1/yes) a missing prerequisite fails the test;
  elsewhere the test is skipped and says why.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from devkit.netns import NetnsLab, missing_prerequisites
from devkit.postgres import PostgresServer, missing_postgres, postgres_server
from devkit.procs import ProcessTracker

__all__ = ["PHASE_REPORTS", "in_ci", "missing_prerequisite", "module_procs", "open_lab", "postgres", "procs",
           "require_lab", "small_tmpfs"]

# A conftest hook stores each test phase's report here so fixtures can tell whether the test failed.
PHASE_REPORTS: pytest.StashKey[dict[str, pytest.TestReport]] = pytest.StashKey()


def in_ci() -> bool:
    """True when running under CI (env CI is true/1/yes), where missing prerequisites are failures."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing_prerequisite(reason: str) -> NoReturn:
    """Fail the current test under CI, skip it elsewhere; ``reason`` says what is missing and why."""
    if in_ci():
        pytest.fail(f"missing prerequisite (CI=true, so this fails): {reason}", pytrace=False)
    pytest.skip(f"missing prerequisite: {reason}")


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(rep.failed for rep in request.node.stash.get(PHASE_REPORTS, {}).values())


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessTracker]:
    """Function-scoped process tracker: ``procs.spawn(argv, ...)``; all are ended at teardown.

    When the test failed, the processes' log tails are printed (pytest shows them with the failure)."""
    tracker = ProcessTracker(tmp_path / "procs")
    try:
        yield tracker
    finally:
        try:
            tracker.stop_all()
        finally:
            if tracker.processes and _failed(request):
                print(f"--- processes started by this test ---\n{tracker.report()}")


@pytest.fixture(scope="module")
def module_procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessTracker]:
    """Module-scoped tracker, for a peer shared by a module's tests (Orthanc takes ~3.5 s to stop)."""
    tracker = ProcessTracker(tmp_path_factory.mktemp("module-procs"))
    try:
        yield tracker
    finally:
        tracker.stop_all()


@pytest.fixture
def postgres(procs: ProcessTracker, tmp_path: Path) -> Iterator[PostgresServer]:
    """A started PostgreSQL server of this test's own (see :func:`devkit.postgres.postgres_server`):
    ``postgres.url``, ``postgres.password``, ``postgres.psql(sql)``; stopped, by PID, at teardown."""
    reason = missing_postgres()
    if reason is not None:
        missing_prerequisite(reason)
    with postgres_server(procs, tmp_path) as server:
        yield server


def require_lab() -> None:
    """Fail (CI) or skip (elsewhere) unless namespaces, nftables and WireGuard tools are usable here."""
    reason = missing_prerequisites()
    if reason is not None:
        missing_prerequisite(reason)


@contextlib.contextmanager
def open_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NetnsLab]:
    """For a fixture: check prerequisites, yield a lab, close it; print process logs if the test failed."""
    require_lab()
    lab = NetnsLab(tmp_path / "netns")
    try:
        yield lab
    finally:
        try:
            lab.close()
        finally:
            if lab.tracker.processes and _failed(request):
                print(f"--- processes started in the lab's namespaces ---\n{lab.report()}")


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's syntax, e.g. ``"2m"``) at ``directory`` (created, 0700), for tests that
    need a filesystem to fill up; lazily unmounted on every exit path."""
    if os.geteuid() != 0:
        missing_prerequisite(f"mounting a {size} tmpfs needs root")
    directory.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode:
        pytest.fail(f"mount -t tmpfs failed as root: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30, check=True)
