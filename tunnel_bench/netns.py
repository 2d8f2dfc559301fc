"""Two network namespaces joined by a veth pair, for the WireGuard measurement (root only).

``cloud`` and ``hospital`` namespaces named ``tb-<tag>-cloud`` / ``tb-<tag>-hosp``, loopback up, joined by
``veth-hosp`` (10.203.<n>.1/24) and ``veth-cloud`` (10.203.<n>.2/24). Addresses exist only inside the two
namespaces. Every command is an argv list with a timeout, no shell. :meth:`NetnsPair.close` removes the
UAPI sockets of this pair's wireguard-go interfaces (a wireguard-go nobody ended exits when its socket
goes) and deletes both namespaces; call it in a ``finally`` after every process was ended by its PID.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tunnel_bench.errors import BenchError

__all__ = ["NetnsPair", "interface_name", "missing_prerequisites", "pair_addresses"]

COMMAND_TIMEOUT = 15.0
UAPI_DIR = Path("/var/run/wireguard")
BINARIES = ("ip", "wg", "wireguard-go", "nft")
HOSPITAL_VETH, CLOUD_VETH = "veth-hosp", "veth-cloud"
IFNAMSIZ = 15  # without the terminating NUL


def missing_prerequisites() -> str | None:
    """Why the namespaces cannot be built here (not root, no TUN, a missing tool), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (wireguard-go needs TUN devices)"
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return f"{', '.join(missing)} not on PATH (apt-get install iproute2 wireguard-tools wireguard-go nftables)"
    return None


def pair_addresses(index: int, net: int = 203) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    """(hospital, cloud) addresses of 10.<net>.<index>.0/24: .1 and .2."""
    if not 1 <= index <= 254 or not 0 <= net <= 255:
        raise ValueError("index must be 1..254 and net 0..255")
    subnet = ipaddress.ip_network(f"10.{net}.{index}.0/24")
    return (ipaddress.ip_interface(f"{subnet[1]}/24"), ipaddress.ip_interface(f"{subnet[2]}/24"))


def interface_name(tag: str, suffix: str) -> str:
    """``tb<tag><suffix>``: userspace WireGuard names must be unique on the host (one UAPI socket dir)."""
    name = f"tb{tag}{suffix}"
    if not suffix or len(name) > IFNAMSIZ or not name.replace("-", "").isalnum():
        raise ValueError(f"interface name {name!r} must be 1..{IFNAMSIZ} letters, digits or '-'")
    return name


class NetnsPair:
    """Build with :meth:`create`; end with :meth:`close` (idempotent, also after a failed create)."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.index = secrets.randbelow(250) + 1
        self.cloud = f"tb-{self.tag}-cloud"
        self.hospital = f"tb-{self.tag}-hosp"
        self.hospital_addr, self.cloud_addr = pair_addresses(self.index)
        self._created: list[str] = []

    @property
    def cloud_ip(self) -> str:
        return str(self.cloud_addr.ip)

    def ifname(self, suffix: str) -> str:
        return interface_name(self.tag, suffix)

    def create(self) -> NetnsPair:
        for ns in (self.hospital, self.cloud):
            _command(["ip", "netns", "add", ns])
            self._created.append(ns)
            _command(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])
        _command(["ip", "link", "add", "name", HOSPITAL_VETH, "netns", self.hospital, "type", "veth",
                  "peer", "name", CLOUD_VETH, "netns", self.cloud])
        for ns, dev, addr in ((self.hospital, HOSPITAL_VETH, self.hospital_addr),
                              (self.cloud, CLOUD_VETH, self.cloud_addr)):
            _command(["ip", "-n", ns, "address", "add", str(addr), "dev", dev])
            _command(["ip", "-n", ns, "link", "set", "dev", dev, "up"])
        return self

    @staticmethod
    def argv(ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``ns`` (``ip netns exec`` execs it: the PID is the program's own)."""
        return ["ip", "netns", "exec", ns, *map(os.fspath, argv)]

    def run(self, ns: str, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``ns``; the finished process, whatever its exit status."""
        return subprocess.run(self.argv(ns, argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)

    def close(self) -> list[str]:
        """Remove our wireguard-go sockets and delete the namespaces; returns what could not be undone."""
        problems = []
        for sock in UAPI_DIR.glob(f"tb{self.tag}*.sock"):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            problems.append(f"wireguard-go socket {sock} was left behind (removed; its process exits)")
        for ns in reversed(self._created):
            deadline = time.monotonic() + 10
            while _pids(ns) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pids := _pids(ns):
                problems.append(f"processes still in {ns}: {pids}")
            try:
                _command(["ip", "netns", "delete", ns])
            except (BenchError, subprocess.TimeoutExpired) as exc:
                problems.append(str(exc))
        self._created.clear()
        return problems


def _command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          check=False)
    if done.returncode != 0:
        raise BenchError(f"{list(argv)!r} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _pids(ns: str) -> list[int]:
    try:
        return [int(pid) for pid in _command(["ip", "netns", "pids", ns]).split()]
    except (BenchError, subprocess.TimeoutExpired, ValueError):
        return []
