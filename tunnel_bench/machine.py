"""A description of the machine and software a run measured (for the README and the JSON)."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import psutil

from devkit.programs import find_native_binary

__all__ = ["describe_machine"]

REPO = Path(__file__).resolve().parent.parent
PY_PACKAGES = ("aiohttp", "pynetdicom", "pydicom", "cryptography", "psutil", "uvloop", "matplotlib")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def _first_line(argv: list[str], pattern: str) -> str:
    """The first output line (stdout or stderr) of ``argv`` matching ``pattern``, else 'unknown'."""
    binary = find_native_binary(argv[0])
    if binary is None:
        return "not installed"
    try:
        done = subprocess.run([binary, *argv[1:]], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        if re.search(pattern, line):
            return line.strip()
    return "unknown"


def _debian_version(package: str) -> str:
    """The installed Debian package version, or '' when dpkg does not know the package."""
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                              timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _tool(package: str, argv: list[str], pattern: str) -> str:
    """What the tool says its version is, plus the Debian package version when there is one."""
    line = _first_line(argv, pattern).strip("$ ")
    version = _debian_version(package)
    return f"{line} (Debian {package} {version})" if version else line


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "unknown")
    except OSError:
        return "unknown"


def _python_packages() -> dict[str, str]:
    out = {}
    for name in PY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe_machine() -> dict:
    changed = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_model": _cpu_model(),
        "cores": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_name(),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "dcmtk": _tool("dcmtk", ["storescu", "--version"], r"storescu"),
        "openssh": _tool("openssh-server", ["ssh", "-V"], r"OpenSSH"),
        "stunnel": _tool("stunnel4", ["stunnel4", "-version"], r"^stunnel "),
        "openssl": _first_line(["openssl", "version"], r"OpenSSL"),
        "python_packages": _python_packages(),
        "git_commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "git_modified_files": len(changed.splitlines()) if changed else 0,
    }
