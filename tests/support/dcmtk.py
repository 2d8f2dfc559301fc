"""Thin wrappers around the dcmtk command-line tools (Debian package `dcmtk`).

Each SCU call runs one tool with an argv list, a timeout on the process (and dcmtk's own connection
and ACSE timeouts), and env TCP_NODELAY=1 (dcmtk is ~50x slower on loopback without it), and returns a
result object; `.check()` raises `DcmtkError` with the tool's output when it failed. C-FIND responses
are read from the files `findscu --extract` writes, with pydicom, never parsed from text output.

Binaries are looked up on PATH *outside* the virtualenv: pynetdicom installs Python console scripts
with the same names (echoscu, findscu, storescu, ...) into .venv/bin, and only native executables
count as dcmtk (``find_binary`` is the dev kit's ``find_native_binary``).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from devkit.programs import find_native_binary as find_binary

from . import missing_prerequisite
from .procs import ManagedProcess, ProcessTracker, require_loopback, wait_for_port

__all__ = [
    "DcmtkError",
    "DcmtkResult",
    "FindResult",
    "dcmtk_env",
    "echoscu",
    "find_binary",
    "findscu",
    "getscu",
    "movescu",
    "require_binary",
    "start_storescp",
    "storescu",
]

Keys = Mapping[str, str | None]
PathLike = str | os.PathLike[str]

FIND_MODELS = {"worklist": "-W", "patient": "-P", "study": "-S", "psonly": "-O"}
RETRIEVE_MODELS = {"patient": "-P", "study": "-S", "psonly": "-O"}
LEVELS = {"PATIENT", "STUDY", "SERIES", "IMAGE"}


class DcmtkError(Exception):
    """A dcmtk tool failed, timed out, or could not be run."""


@dataclass(frozen=True)
class DcmtkResult:
    """What one dcmtk run produced."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> DcmtkResult:
        """Return self if the tool exited 0, else raise DcmtkError carrying its output."""
        if self.returncode != 0:
            raise DcmtkError(
                f"{self.argv[0]} exited {self.returncode}\nargv: {list(self.argv)}\n"
                f"stdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-4000:]}"
            )
        return self


@dataclass(frozen=True)
class FindResult(DcmtkResult):
    """A findscu run plus its C-FIND responses (identifiers), in arrival order."""

    responses: list[Dataset] = field(default_factory=list)


def require_binary(name: str) -> str:
    """Path of native binary `name`; if missing, fail under CI=true and skip elsewhere, saying why."""
    path = find_binary(name)
    if path is None:
        package = "orthanc" if name == "Orthanc" else "dcmtk"
        missing_prerequisite(
            f"binary {name!r} not found on PATH outside the venv "
            f"(Debian package {package!r}; `bash scripts/bootstrap.sh` installs it)"
        )
    return path


def dcmtk_env() -> dict[str, str]:
    """os.environ plus TCP_NODELAY=1 (dcmtk only sets TCP_NODELAY on its sockets when asked)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def run_tool(name: str, args: Sequence[PathLike], *, timeout: float) -> DcmtkResult:
    """Run dcmtk tool `name` with `args`; kill it (by PID, via subprocess) after `timeout` s."""
    argv = (require_binary(name), *(os.fspath(arg) for arg in args))
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=dcmtk_env(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DcmtkError(f"{name} timed out after {timeout} s: {list(argv)}") from exc
    return DcmtkResult(
        argv=argv,
        returncode=done.returncode,
        stdout=done.stdout.decode(errors="replace"),
        stderr=done.stderr.decode(errors="replace"),
    )


def _association_args(host: str, called: str, calling: str, timeout: float) -> list[str]:
    """-aet/-aec plus dcmtk's connect and ACSE timeouts; peer and port go last on the command line."""
    require_loopback(host)
    seconds = str(max(1, math.ceil(timeout)))
    return ["-aet", calling, "-aec", called, "-to", seconds, "-ta", seconds]


def _key_args(level: str, keys: Keys) -> list[str]:
    """-k arguments: `Keyword=value` for a match, bare `Keyword` for an empty return key."""
    level = level.upper()
    if level not in LEVELS and level != "":
        raise ValueError(f"unknown query/retrieve level {level!r}")
    args: list[str] = []
    if level and "QueryRetrieveLevel" not in keys:
        args += ["-k", f"QueryRetrieveLevel={level}"]
    for key, value in keys.items():
        args += ["-k", key if value is None else f"{key}={value}"]
    return args


def _model_flag(model: str, models: Mapping[str, str]) -> str:
    try:
        return models[model]
    except KeyError:
        raise ValueError(f"unknown information model {model!r}; expected one of {sorted(models)}") from None


def echoscu(host: str, port: int, called: str, calling: str, *, timeout: float = 30.0) -> DcmtkResult:
    """One C-ECHO in one association."""
    args = _association_args(host, called, calling, timeout) + [host, str(port)]
    return run_tool("echoscu", args, timeout=timeout)


def _read_responses(out_dir: Path) -> list[Dataset]:
    def number(path: Path) -> int:
        match = re.search(r"(\d+)", path.stem)
        return int(match.group(1)) if match else 0

    files = sorted(out_dir.glob("rsp*.dcm"), key=number)
    return [pydicom.dcmread(path, force=True) for path in files]


def findscu(
    host: str,
    port: int,
    called: str,
    calling: str,
    level: str,
    keys: Keys,
    model: str = "study",
    *,
    timeout: float = 60.0,
) -> FindResult:
    """One C-FIND at `level` with `keys`; the responses are parsed from the files `--extract` writes."""
    with tempfile.TemporaryDirectory(prefix="findscu-") as tmp:
        args = _association_args(host, called, calling, timeout)
        args += [_model_flag(model, FIND_MODELS), "-X", "-od", tmp]
        args += _key_args(level, keys) + [host, str(port)]
        result = run_tool("findscu", args, timeout=timeout)
        responses = _read_responses(Path(tmp))
    return FindResult(
        argv=result.argv,
        returncode=result.returncode,
        stdout=result.stdout,
        stderr=result.stderr,
        responses=responses,
    )


def movescu(
    host: str,
    port: int,
    called: str,
    calling: str,
    dest_ae: str,
    keys: Keys,
    level: str,
    port_for_incoming: int | None = None,
    *,
    out_dir: PathLike | None = None,
    model: str = "study",
    timeout: float = 120.0,
) -> DcmtkResult:
    """One C-MOVE of what `keys` match at `level` to `dest_ae`.

    With `port_for_incoming`, movescu itself listens there for the sub-operations (then `dest_ae` must
    map to that port in the SCP's config) and stores into `out_dir` (received and dropped if None).
    """
    args = _association_args(host, called, calling, timeout)
    args += [_model_flag(model, RETRIEVE_MODELS), "-aem", dest_ae]
    if port_for_incoming is not None:
        args += ["+P", str(port_for_incoming)]
        args += ["--ignore"] if out_dir is None else ["-od", os.fspath(out_dir)]
    args += _key_args(level, keys) + [host, str(port)]
    return run_tool("movescu", args, timeout=timeout)


def getscu(
    host: str,
    port: int,
    called: str,
    calling: str,
    keys: Keys,
    level: str,
    out_dir: PathLike,
    *,
    model: str = "study",
    timeout: float = 120.0,
) -> DcmtkResult:
    """One C-GET of what `keys` match at `level`; the instances arrive on the same association."""
    args = _association_args(host, called, calling, timeout)
    args += [_model_flag(model, RETRIEVE_MODELS), "-od", os.fspath(out_dir)]
    args += _key_args(level, keys) + [host, str(port)]
    return run_tool("getscu", args, timeout=timeout)


def storescu(
    host: str,
    port: int,
    called: str,
    calling: str,
    files_or_dir: PathLike | Sequence[PathLike],
    extra_args: Sequence[str] = (),
    *,
    timeout: float = 300.0,
) -> DcmtkResult:
    """C-STORE files (or every file under a directory, recursively) in one association."""
    inputs = [files_or_dir] if isinstance(files_or_dir, str | os.PathLike) else list(files_or_dir)
    if not inputs:
        raise ValueError("storescu needs at least one file or directory")
    args = _association_args(host, called, calling, timeout)
    if any(Path(item).is_dir() for item in inputs):
        args += ["+sd", "+r"]
    args += list(extra_args) + [host, str(port)] + [os.fspath(item) for item in inputs]
    return run_tool("storescu", args, timeout=timeout)


def start_storescp(
    procs: ProcessTracker,
    port: int,
    ae_title: str,
    out_dir: PathLike,
    extra_args: Sequence[str] = (),
    *,
    startup_timeout: float = 10.0,
) -> ManagedProcess:
    """Start `storescp` (bit-preserving, AE `ae_title`, files into `out_dir`) and wait for its port.

    It is tracked by `procs`, so it is ended by PID at teardown. storescp listens on all interfaces
    (dcmtk 3.6.7 has no bind-address option); tests only ever connect to it on 127.0.0.1.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    argv = [require_binary("storescp"), "--bit-preserving", "-aet", ae_title, "-od", os.fspath(out_dir)]
    argv += list(extra_args) + [str(port)]
    proc = procs.spawn(argv, env={"TCP_NODELAY": "1"}, name=f"storescp-{port}")
    wait_for_port("127.0.0.1", port, startup_timeout, proc=proc)
    return proc
