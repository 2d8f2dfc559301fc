"""The agent's version, from one source: the ``version`` of ``pyproject.toml``.

Installed (a wheel, or ``pip install -e .``), that is the distribution's metadata. Run from a checkout that
was never installed, the checkout's own ``pyproject.toml`` is read. Only when neither is there does the
agent call itself ``0+unknown`` (a PEP 440 local version that sorts before every release).
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

__all__ = ["DISTRIBUTION", "__version__"]

DISTRIBUTION = "dicom-tunnel"
UNKNOWN = "0+unknown"


def _version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return UNKNOWN
    version = project.get("version") if project.get("name") == DISTRIBUTION else None
    return version if isinstance(version, str) else UNKNOWN


__version__ = _version()
