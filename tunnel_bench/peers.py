"""The real peers of every path: the generated workload, dcmtk storescp/storescu, the accept-all SCP,
and the TLS certificates of the stunnel pair.

Every path ends at the same three sinks (:class:`Sinks`), started once: a bulk ``storescp --fork``
(one child process per association, so 8 parallel associations are served in parallel on every path),
an echo ``storescp`` (one association at a time: the target of the latency probes) and the accept-all
SCP. dcmtk tools always run with ``TCP_NODELAY=1`` (storescp is ~50x slower on loopback without it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devkit.ports import LOOPBACK, free_ports
from devkit.procs import ManagedProcess, ProcessTracker
from devkit.programs import CHECKOUT, require_binary
from devkit.waits import wait_for_port, wait_until
from tunnel_bench.errors import BenchError

__all__ = [
    "CALLING_AE",
    "PROTOTYPE_STUDY_MB",
    "Sinks",
    "StoreJob",
    "Workload",
    "clear_dir",
    "count_files",
    "generate_workload",
    "make_tls_files",
    "start_sinks",
    "store",
]

CALLING_AE = "BENCHSCU"
DCMTK_ENV = {"TCP_NODELAY": "1"}
STORE_TIMEOUT_S = 30  # dcmtk's own connection / ACSE / DIMSE timeouts
# The prototype dataset of the issue: 13 studies of 40 MB to 1.9 GB, ~6 GB, 640x640 slices (~0.8 MB).
PROTOTYPE_STUDY_MB = (40, 60, 90, 130, 180, 250, 320, 400, 480, 560, 650, 900, 1900)
PROTOTYPE_MATRIX = 640


@dataclass(frozen=True)
class Workload:
    """The files every path carries. ``split(n)`` deals them round-robin into ``n`` lists."""

    description: str
    files: tuple[Path, ...]
    total_bytes: int

    def split(self, n: int) -> list[list[Path]]:
        return [list(self.files[i::n]) for i in range(n) if self.files[i::n]]

    def head(self, count: int) -> Workload:
        files = self.files[:count]
        return Workload(f"first {len(files)} files of: {self.description}", files,
                        sum(p.stat().st_size for p in files))


def generate_workload(root: Path, *, instances: int, prototype: bool = False) -> Workload:
    """Write the CT instances with ``tunnel_demo.dataset.generate_study`` (512x512, or the prototype shape)."""
    workload = _generate(root, instances, prototype)
    os.sync()  # write-back of the new files must not run during the first measurements
    return workload


def _generate(root: Path, instances: int, prototype: bool) -> Workload:
    from tunnel_demo.dataset import generate_study

    if not prototype:
        info = generate_study(root / "study", instances, seed=3, series_count=3)
        return Workload(f"{instances} CT instances 512x512, 1 study", tuple(info.files), info.total_bytes)
    files: list[Path] = []
    total = 0
    per_file = PROTOTYPE_MATRIX * PROTOTYPE_MATRIX * 2
    for index, megabytes in enumerate(PROTOTYPE_STUDY_MB):
        count = max(1, round(megabytes * 1_000_000 / per_file))
        info = generate_study(root / f"study{index:02d}", count, rows=PROTOTYPE_MATRIX, cols=PROTOTYPE_MATRIX,
                              seed=100 + index, patient_id=f"PROTO-{index:02d}", series_count=min(4, count))
        files += info.files
        total += info.total_bytes
    description = f"prototype shape: {len(PROTOTYPE_STUDY_MB)} studies, {len(files)} CT instances 640x640"
    return Workload(description, tuple(files), total)


def count_files(directory: Path) -> int:
    with os.scandir(directory) as entries:
        return sum(1 for e in entries if e.is_file())


def clear_dir(directory: Path) -> None:
    """Delete what a storescp wrote (keeps the tmpfs small between runs)."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file():
                os.unlink(entry.path)


@dataclass(frozen=True)
class Sinks:
    """The SCPs at the far end of every path."""

    bulk_port: int
    echo_port: int
    accept_port: int
    bulk_dir: Path


def start_sinks(procs: ProcessTracker, sink_root: Path) -> Sinks:
    storescp = require_binary("storescp", "dcmtk")
    bulk_port, echo_port, accept_port = free_ports(3)
    bulk_dir, echo_dir = sink_root / "bulk", sink_root / "echo"
    for directory in (bulk_dir, echo_dir):
        directory.mkdir(parents=True, exist_ok=True)
    timeouts = ["-ta", str(STORE_TIMEOUT_S), "-ts", str(STORE_TIMEOUT_S)]
    bulk = procs.spawn([storescp, "--fork", "-aet", "SINK", "-od", str(bulk_dir), *timeouts, str(bulk_port)],
                       name="storescp-bulk", env=DCMTK_ENV)
    echo = procs.spawn([storescp, "-aet", "ECHO", "-od", str(echo_dir), *timeouts, str(echo_port)],
                       name="storescp-echo", env=DCMTK_ENV)
    accept = procs.spawn([sys.executable, "-m", "tunnel_bench.acceptscp", "--port", str(accept_port)],
                         name="acceptscp", cwd=CHECKOUT)
    for port, proc in ((bulk_port, bulk), (echo_port, echo), (accept_port, accept)):
        wait_for_port(LOOPBACK, port, proc=proc)
    return Sinks(bulk_port, echo_port, accept_port, bulk_dir)


class StoreJob:
    """``storescu`` processes sending file lists to one port at once (one association each).

    ``start()`` launches them; ``wait()`` waits for all and raises BenchError if one failed; ``stop()``
    ends any still running by PID, at once (a sender that overran gets no grace period). Use as a context
    manager so they are ended on every exit path.
    """

    def __init__(self, port: int, called_ae: str, file_lists: Sequence[Sequence[Path]], log_dir: Path) -> None:
        self.port = port
        self.called_ae = called_ae
        self.file_lists = [list(files) for files in file_lists]
        self.log_dir = log_dir
        self._procs: list[ManagedProcess] = []

    def __enter__(self) -> StoreJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> StoreJob:
        storescu = require_binary("storescu", "dcmtk")
        timeouts = ["-to", str(STORE_TIMEOUT_S), "-ta", str(STORE_TIMEOUT_S), "-td", str(STORE_TIMEOUT_S)]
        for index, files in enumerate(self.file_lists):
            argv = [storescu, "-aet", CALLING_AE, "-aec", self.called_ae, *timeouts, LOOPBACK, str(self.port)]
            self._procs.append(ManagedProcess(argv + [str(f) for f in files], name=f"storescu-{index}",
                                              log_path=self.log_dir / f"storescu-{index}.log", env=DCMTK_ENV))
        return self

    @property
    def running(self) -> bool:
        return any(p.running for p in self._procs)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"storescu to port {self.port} still running after {timeout:.0f} s") from exc
            if code != 0:
                raise BenchError(f"storescu to port {self.port} (AE {self.called_ae}) exited {code}:\n"
                                 f"{proc.log_tail(2000)}")

    def stop(self) -> None:
        for proc in self._procs:
            proc.stop(grace=0.0)


def store(port: int, called_ae: str, file_lists: Sequence[Sequence[Path]], sink_dir: Path, *,
          expected: int, timeout: float, log_dir: Path) -> float:
    """Send every list in parallel; return the seconds until storescu exited and the sink holds all files."""
    clear_dir(sink_dir)
    started = time.perf_counter()
    with StoreJob(port, called_ae, file_lists, log_dir) as job:
        job.start().wait(timeout)
    wait_until(lambda: count_files(sink_dir) >= expected, 30,
               message=lambda: f"{expected} files in {sink_dir} (have {count_files(sink_dir)})")
    elapsed = time.perf_counter() - started
    clear_dir(sink_dir)
    return elapsed


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A CA, a server and a client certificate (EC P-256, IP SAN 127.0.0.1) as PEM files, keys 0600."""
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("bench CA", ca_key, ca_key, None, is_ca=True)
    files = {"ca": _write_pem(directory / "ca.pem", ca_cert)}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"bench {role}", key, ca_key, ca_cert, is_ca=False)
        files[f"{role}_cert"] = _write_pem(directory / f"{role}.pem", cert)
        files[f"{role}_key"] = _write_pem(directory / f"{role}.key", key)
    return files


def _certificate(common_name: str, key, signer_key, signer_cert, *, is_ca: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(signer_cert.subject if signer_cert else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if not is_ca:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                           x509.DNSName("localhost")])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(signer_key, hashes.SHA256())


def _write_pem(path: Path, obj) -> Path:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "private_bytes"):
        data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    return path

