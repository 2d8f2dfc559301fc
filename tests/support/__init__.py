"""Reusable helpers for tests that run real peers (dcmtk, Orthanc, subprocesses) on 127.0.0.1.

Modules:
- `procs`, `ports`, `netns`, `stack`: the dev kit's (`devkit/`) processes, waits, ports, namespace lab
  and relay + agent bring-up, re-exported under the paths the tests have always used.
- `dcmtk`   wrappers for the dcmtk command-line tools, returning result objects.
- `orthanc` start an Orthanc of our own on free ports with a config in the test's tmp dir.

Prerequisite policy: in CI (env CI=true) a missing prerequisite fails the test; elsewhere it skips and
says why (`require`).
"""

from __future__ import annotations

# The prerequisite policy is the dev kit's (its lab fixture applies it too); re-exported here.
from devkit.fixtures import in_ci, missing_prerequisite

__all__ = ["in_ci", "missing_prerequisite"]
