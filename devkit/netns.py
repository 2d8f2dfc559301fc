"""A network-namespace lab: a hospital and a cloud joined by a veth pair, processes inside, all undone.

Theory of operation: a :class:`NetnsLab` owns everything it makes and removes it in :meth:`close`, also
after a failure (call it in a ``finally``; :func:`devkit.fixtures.open_lab` does for tests):

- namespaces named ``<prefix>-<tag>-<role>`` (tag unique to the lab); a veth pair is created directly
  inside two of them (``ip link add ... netns A type veth peer ... netns B``), so nothing appears in the
  host namespace; addresses come from 10.<net>.<n>.0/24, which exists only in there (so two labs, or a
  lab and the host, never clash);
- processes started inside a namespace with :meth:`spawn` (``ip netns exec`` execs, so the PID held is
  the command's own) are ended by that PID, through the lab's own :class:`~devkit.procs.ProcessTracker`;
- cleanups registered with :meth:`defer` (e.g. ``WireGuardInterface.down``) run first, newest first;
  wireguard-go sockets of interfaces named with :meth:`ifname` are unlinked as a last resort, which makes
  any surviving wireguard-go exit; namespaces are deleted once no process is left in them.

Every command is an argv list with a timeout, no shell. :func:`missing_prerequisites` says why a lab
cannot be built here (not root, no TUN device, a missing tool), or None.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from devkit.errors import CommandFailed, WaitTimeout
from devkit.procs import ManagedProcess, ProcessTracker, StopFailed
from devkit.waits import wait_until

__all__ = ["ExchangeResult", "NetnsLab", "SitePair", "interface_name", "missing_prerequisites",
           "pair_addresses"]

LAB_BINARIES = ("ip", "nft", "wg", "wireguard-go", "sysctl")
COMMAND_TIMEOUT = 15.0
UAPI_DIR = Path("/var/run/wireguard")
HOSPITAL_VETH = "veth-hosp"
CLOUD_VETH = "veth-cloud"
IFNAMSIZ = 15  # without the terminating NUL


def missing_prerequisites() -> str | None:
    """Why namespaces, nftables and WireGuard cannot be used here (root, TUN, tools), or None."""
    if os.geteuid() != 0:
        return "network namespace labs need root (ip netns, nft, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (wireguard-go needs TUN devices)"
    missing = [name for name in LAB_BINARIES if shutil.which(name) is None]
    if missing:
        return (f"{', '.join(missing)} not on PATH "
                "(apt-get install iproute2 nftables wireguard-tools wireguard-go procps)")
    return None


def pair_addresses(index: int, net: int) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    """(hospital, cloud) addresses of 10.<net>.<index>.0/24: .1 and .2."""
    if not 1 <= index <= 254 or not 0 <= net <= 255:
        raise ValueError("index must be 1..254 and net 0..255")
    subnet = ipaddress.ip_network(f"10.{net}.{index}.0/24")
    return ipaddress.ip_interface(f"{subnet[1]}/24"), ipaddress.ip_interface(f"{subnet[2]}/24")


def interface_name(stem: str, suffix: str) -> str:
    """``<stem><suffix>``, at most 15 letters, digits or '-': userspace WireGuard names must be unique on
    the host (one UAPI socket directory), so a lab's stem is its prefix and tag."""
    name = f"{stem}{suffix}"
    if not suffix or len(name) > IFNAMSIZ or not name.replace("-", "").isalnum():
        raise ValueError(f"interface name {name!r} must be 1..{IFNAMSIZ} letters, digits or '-'")
    return name


@dataclass(frozen=True)
class SitePair:
    """Two namespaces joined by a veth pair: the hospital at .1, the cloud at .2 of 10.<net>.<index>.0/24."""

    hospital: str
    cloud: str
    index: int  # the <n> of the subnet; callers may use it for their own ranges (10.202.<n>.0/24)
    hospital_addr: ipaddress.IPv4Interface
    cloud_addr: ipaddress.IPv4Interface
    hospital_veth: str = HOSPITAL_VETH
    cloud_veth: str = CLOUD_VETH

    @property
    def hospital_ip(self) -> str:
        return str(self.hospital_addr.ip)

    @property
    def cloud_ip(self) -> str:
        return str(self.cloud_addr.ip)


@dataclass(frozen=True)
class ExchangeResult:
    """What a TCP client inside a namespace saw: the echoed bytes, or why it failed."""

    ok: bool
    echoed: bytes = b""
    error: str = ""


# A tiny TCP echo server and client, run inside a namespace with this interpreter.
_ECHO_SERVER = textwrap.dedent(
    """
    import socket, sys, threading
    host, port = sys.argv[1], int(sys.argv[2])
    srv = socket.create_server((host, port))
    print("READY", flush=True)
    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    """
)
_ECHO_CLIENT = textwrap.dedent(
    """
    import json, socket, sys
    host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    payload = sys.stdin.buffer.read()
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                got += chunk
        print(json.dumps({"ok": got == payload, "echoed": got.hex(), "error": "" if got == payload else "short"}))
    except OSError as exc:
        print(json.dumps({"ok": False, "echoed": "", "error": type(exc).__name__ + ": " + str(exc)}))
    """
)
_CONNECT = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])).close()"


class NetnsLab:
    """Namespaces, veths, processes and cleanups of one test or measurement; :meth:`close` removes them.

    ``prefix`` (2 letters) names the lab's namespaces and interfaces (``dt`` tests, ``tb`` the benchmark);
    ``net`` is the second octet of its veth subnets."""

    def __init__(self, log_dir: Path, *, prefix: str = "dt", net: int = 201) -> None:
        if len(prefix) != 2 or not prefix.isalpha():
            raise ValueError("prefix must be 2 letters")
        self.prefix, self.net = prefix, net
        self.tag = secrets.token_hex(4)
        self.log_dir = Path(log_dir)
        self.tracker = ProcessTracker(self.log_dir)
        self.namespaces: list[str] = []
        self._cleanups: list[Callable[[], object]] = []
        self._subnet_index = secrets.randbelow(250) + 1

    # -- building ----------------------------------------------------------------------------------

    def ifname(self, suffix: str) -> str:
        """An interface name unique to this lab (≤ 15 chars): ``<prefix><tag><suffix>``, suffix ≤ 5 chars."""
        return interface_name(f"{self.prefix}{self.tag}", suffix)

    def add_namespace(self, role: str) -> str:
        """Create ``<prefix>-<tag>-<role>`` with loopback up; it is deleted in close()."""
        name = f"{self.prefix}-{self.tag}-{role}"
        self.command(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.command(["ip", "-n", name, "link", "set", "dev", "lo", "up"])
        return name

    def site_pair(self, label: str = "", *, ipv6: bool = False) -> SitePair:
        """A hospital and a cloud namespace joined by a veth pair (addresses from 10.<net>.<n>.0/24).

        ``label`` tells several pairs of one lab apart. Without ``ipv6`` the namespaces have IPv6 disabled,
        so no neighbour discovery chatter reaches a firewall's counters."""
        hospital, cloud = self.add_namespace(f"{label}hosp"), self.add_namespace(f"{label}cloud")
        if not ipv6:
            for ns in (hospital, cloud):
                self.run(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                              "net.ipv6.conf.default.disable_ipv6=1"])
        index = self._subnet_index
        self._subnet_index = index % 250 + 1
        hospital_addr, cloud_addr = pair_addresses(index, self.net)
        pair = SitePair(hospital, cloud, index, hospital_addr, cloud_addr)
        self.command(["ip", "link", "add", "name", pair.hospital_veth, "netns", hospital, "type", "veth",
                      "peer", "name", pair.cloud_veth, "netns", cloud])
        for ns, dev, addr in ((hospital, pair.hospital_veth, hospital_addr), (cloud, pair.cloud_veth, cloud_addr)):
            self.command(["ip", "-n", ns, "address", "add", str(addr), "dev", dev])
            self.command(["ip", "-n", ns, "link", "set", "dev", dev, "up"])
        return pair

    def defer(self, cleanup: Callable[[], object]) -> None:
        """Run ``cleanup`` in close(), before processes are ended and namespaces deleted (newest first)."""
        self._cleanups.append(cleanup)

    # -- running -----------------------------------------------------------------------------------

    @staticmethod
    def argv(ns: str, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` run inside ``ns`` (``ip netns exec`` execs it: the PID is the program's own)."""
        return ["ip", "netns", "exec", ns, *map(os.fspath, argv)]

    def command(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``argv`` in the host namespace; return stdout, raise CommandFailed with stderr on failure."""
        done = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout, check=False,
                              stdin=None if input is not None else subprocess.DEVNULL)
        if done.returncode != 0:
            raise CommandFailed(f"{list(argv)!r} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
        return done.stdout.decode(errors="replace")

    def run(self, ns: str, argv: Sequence[str], *, input: bytes | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``argv`` inside namespace ``ns`` and return its stdout (see :meth:`command`)."""
        return self.command(self.argv(ns, argv), input=input, timeout=timeout)

    def execute(self, ns: str, argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``ns``; the finished process (text), whatever its exit status."""
        return subprocess.run(self.argv(ns, argv), capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL, env=None if env is None else {**os.environ, **env})

    def spawn(self, ns: str, argv: Sequence[str], *, name: str, env: dict[str, str] | None = None) -> ManagedProcess:
        """Start ``argv`` inside ``ns`` as a managed process, ended by its PID in close()."""
        return self.tracker.spawn(self.argv(ns, argv), name=name, env=env)

    def stop(self, proc: ManagedProcess) -> None:
        """End one of the lab's processes now, by its PID."""
        self.tracker.stop(proc)

    def port_accepts(self, ns: str, host: str, port: int, timeout: float = 1.0) -> bool:
        """Does a TCP connect from inside ``ns`` to host:port succeed within ``timeout`` s?"""
        argv = [sys.executable, "-c", _CONNECT, host, str(port), str(timeout)]
        return self.execute(ns, argv, timeout=timeout + 15).returncode == 0

    def echo_server(self, ns: str, host: str, port: int) -> ManagedProcess:
        """A TCP echo server on host:port inside ``ns``, returned once it listens."""
        proc = self.spawn(ns, [sys.executable, "-c", _ECHO_SERVER, host, str(port)], name=f"echo-{port}")
        wait_until(lambda: "READY" in proc.log_text(), 15.0, message=f"echo server in {ns} on {host}:{port}",
                   watch=[proc])
        return proc

    def tcp_exchange(self, ns: str, host: str, port: int, payload: bytes, *, timeout: float = 5.0) -> ExchangeResult:
        """From inside ``ns``, connect to host:port, send ``payload`` and read it back (bounded by ``timeout``)."""
        argv = [sys.executable, "-c", _ECHO_CLIENT, host, str(port), str(timeout)]
        out = self.run(ns, argv, input=payload, timeout=timeout * 2 + 10)
        result = json.loads(out.strip().splitlines()[-1])
        return ExchangeResult(result["ok"], bytes.fromhex(result["echoed"]), result["error"])

    # -- teardown ----------------------------------------------------------------------------------

    def report(self) -> str:
        return self.tracker.report()

    def close(self) -> None:
        """Undo everything: cleanups, processes, stray wireguard-go sockets, namespaces. Idempotent; raises
        CommandFailed at the end, naming everything that could not be undone."""
        errors: list[str] = []
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as exc:  # keep cleaning; reported below
                errors.append(f"cleanup {cleanup!r}: {exc}")
        self._cleanups.clear()
        try:
            self.tracker.stop_all()
        except StopFailed as exc:
            errors.append(str(exc))
        for sock in UAPI_DIR.glob(f"{self.prefix}{self.tag}*.sock"):  # a wireguard-go nobody stopped exits
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            errors.append(f"wireguard-go socket {sock} was left behind")
        for ns in reversed(self.namespaces):
            errors.extend(self._delete_namespace(ns))
        self.namespaces.clear()
        if errors:
            raise CommandFailed("netns lab teardown: " + "; ".join(errors))

    def _delete_namespace(self, ns: str) -> list[str]:
        errors = []
        try:
            wait_until(lambda: not self._pids(ns), 10.0, interval=0.1, message=f"processes in {ns} to exit")
        except WaitTimeout:
            errors.append(f"processes still in {ns}: {self._pids(ns)}")
        try:
            self.command(["ip", "netns", "delete", ns])
        except (CommandFailed, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
        return errors

    def _pids(self, ns: str) -> list[int]:
        try:
            return [int(pid) for pid in self.command(["ip", "netns", "pids", ns]).split()]
        except (CommandFailed, subprocess.TimeoutExpired, ValueError):
            return []
