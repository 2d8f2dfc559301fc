"""Suite-wide fixtures and hooks.

- `procs`: function-scoped tracker of subprocesses, each ended by its own PID at teardown
  (the dev kit's, devkit/fixtures.py, via tests/support/procs.py); `module_procs` is the same for peers
  shared by a module's tests.
- `postgres`: a started PostgreSQL server of the test's own on 127.0.0.1 (devkit/postgres.py), ended by
  its PID at teardown; a missing `postgresql` package is a missing prerequisite.
- `ct_study_small`: a small generated CT study (session-scoped, read-only for tests).
- `in_ci()`: under CI=true a missing prerequisite fails instead of skipping.

Import helpers as `tests.support...` (the repository root is put on sys.path here, so this works
however pytest is started; it is also how the development packages devkit, tunnel_demo and tunnel_bench,
which are not installed, are found).
"""

from __future__ import annotations

import sys
from collections.abc import Generator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import in_ci, missing_prerequisite  # noqa: E402
from tests.support.procs import PHASE_REPORTS, module_procs, postgres, procs  # noqa: E402

__all__ = ["in_ci", "procs", "module_procs", "postgres", "ct_study_small"]

pytest_plugins = ["pytester"]

CT_SMALL_INSTANCES = 10
CT_SMALL_ROWS = 64
CT_SMALL_COLS = 64


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item so fixtures can tell at teardown whether the test failed."""
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    return report


@pytest.fixture(scope="session")
def ct_study_small(tmp_path_factory: pytest.TempPathFactory):  # -> tunnel_demo.dataset.StudyInfo
    """A generated single-series CT study: CT_SMALL_INSTANCES files of 64x64 pixels. Do not modify."""
    try:
        from tunnel_demo.dataset import generate_study
    except ImportError as exc:
        missing_prerequisite(f"tunnel_demo.dataset.generate_study is not importable: {exc}")
    out_dir = tmp_path_factory.mktemp("ct_study_small")
    return generate_study(out_dir, CT_SMALL_INSTANCES, rows=CT_SMALL_ROWS, cols=CT_SMALL_COLS)
