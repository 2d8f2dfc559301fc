"""Where programs are: the product's console scripts next to this interpreter, native binaries elsewhere.

Calling contract: ``RELAY`` / ``AGENT`` are the paths of ``tunnel-relay`` / ``tunnel-agent`` in this
virtualenv; ``program(name, module)`` is the argv prefix to run one (its script, or ``python -m module``
where the script is missing). ``find_native_binary(name)`` finds an ELF executable on PATH or in a
system bin dir *outside* the virtualenv (pynetdicom installs Python scripts named like the dcmtk tools
into it); ``require_binary`` is the same or :class:`~devkit.errors.MissingProgram` naming the Debian
package. A child that runs one of the checkout's own modules (``python -m tunnel_bench.wanproxy``) is
started with ``cwd=CHECKOUT``: dev packages are not installed, they are found from the repository root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from devkit.errors import MissingProgram

__all__ = ["AGENT", "CHECKOUT", "RELAY", "find_native_binary", "program", "require_binary", "venv_bin"]

BIN = Path(sys.executable).parent
RELAY = str(BIN / "tunnel-relay")
AGENT = str(BIN / "tunnel-agent")
# The repository root: dev packages are not installed, they run from here.
CHECKOUT = Path(__file__).resolve().parent.parent
SYSTEM_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def program(name: str, module: str) -> list[str]:
    """argv prefix of one of the product's programs: the console script next to this interpreter."""
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def venv_bin(name: str) -> str:
    """A console script installed next to this interpreter (tunnel-relay, tunnel-agent, python)."""
    path = BIN / name
    if not path.exists():
        raise MissingProgram(f"{path} not found: install the project into this virtualenv (make bootstrap)")
    return str(path)


def find_native_binary(name: str) -> str | None:
    """Absolute path of native executable ``name`` on PATH (or a system bin dir), skipping the venv."""
    venv = Path(sys.prefix).resolve()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d] + list(SYSTEM_BIN_DIRS)
    for directory in dirs:
        candidate = Path(directory) / name
        try:
            if Path(directory).resolve().is_relative_to(venv) or candidate.resolve().is_relative_to(venv):
                continue
            if candidate.is_file() and os.access(candidate, os.X_OK):
                with open(candidate, "rb") as handle:
                    if handle.read(4) == b"\x7fELF":
                        return str(candidate)
        except OSError:
            continue
    return None


def require_binary(name: str, package: str) -> str:
    """Like :func:`find_native_binary`, or MissingProgram naming the Debian ``package`` to install."""
    path = find_native_binary(name)
    if path is None:
        raise MissingProgram(f"{name!r} not found outside the virtualenv (Debian package {package!r}; "
                             "scripts/bootstrap.sh or `make bench` installs it)")
    return path
