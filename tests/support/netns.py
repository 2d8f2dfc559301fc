"""Network namespaces for tests: a hospital and a cloud joined by a veth pair, a hospital firewall.

Theory of operation: a `NetnsLab` (use `open_lab` in a fixture) owns everything it makes and removes it
in `close()`, also when the test failed:
- namespaces with names unique to the lab (``dt-<tag>-hosp``, ``dt-<tag>-cloud``); a veth pair is
  created directly inside them (``ip link add ... netns A type veth peer ... netns B``), so nothing
  appears in the host namespace; addresses come from 10.201.<n>.0/24, which exists only in there;
- processes started inside a namespace with `spawn` (``ip netns exec`` execs, so the PID we hold is the
  command's own) are ended by that PID (tests/support/procs.py ProcessTracker);
- cleanups registered with `defer` (e.g. ``WireGuardInterface.down``) run first, newest first.
  wireguard-go sockets of interfaces named with the lab's prefix (`ifname`) are unlinked as a last
  resort, which makes any surviving wireguard-go exit.

`HospitalFirewall` is an nftables table in the hospital namespace: inbound packets on its veth are
accepted only when they belong to a connection the hospital opened (ct state established,related);
everything else inbound is dropped and counted in named counters, read back from ``nft -j``. Outbound
UDP can be blocked to force a fallback from WireGuard to the WebSocket transport.

Prerequisites (`require_lab`): root, /dev/net/tun, ip, nft, wg, wireguard-go, sysctl. Under CI=true a missing one
fails the test; elsewhere the test is skipped and says why.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import missing_prerequisite
from tests.support.procs import PHASE_REPORTS, ManagedProcess, ProcessTracker, wait_until

__all__ = [
    "ExchangeResult",
    "HospitalFirewall",
    "NetnsLab",
    "NftCounter",
    "SitePair",
    "open_lab",
    "parse_nft_counters",
    "require_lab",
]

LAB_BINARIES = ("ip", "nft", "wg", "wireguard-go", "sysctl")
COMMAND_TIMEOUT = 15.0
UAPI_DIR = Path("/var/run/wireguard")
FIREWALL_TABLE = "dt_guard"
HOSPITAL_VETH = "veth-hosp"
CLOUD_VETH = "veth-cloud"


def require_lab() -> None:
    """Fail (CI) or skip (elsewhere) unless namespaces, nftables and WireGuard tools are usable here."""
    if os.geteuid() != 0:
        missing_prerequisite("network namespace tests need root (ip netns, nft, TUN devices)")
    if not os.path.exists("/dev/net/tun"):
        missing_prerequisite("/dev/net/tun is missing (wireguard-go needs TUN devices)")
    missing = [name for name in LAB_BINARIES if shutil.which(name) is None]
    if missing:
        missing_prerequisite(
            f"{', '.join(missing)} not on PATH (apt-get install iproute2 nftables wireguard-tools wireguard-go procps)"
        )


@dataclass(frozen=True)
class SitePair:
    """Two namespaces joined by a veth pair: the hospital at .1, the cloud at .2 of `subnet`."""

    hospital: str
    cloud: str
    index: int  # the <n> of 10.201.<n>.0/24; tests may use it for their own ranges (10.202.<n>.0/24)
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


@dataclass(frozen=True)
class NftCounter:
    packets: int
    bytes: int


def parse_nft_counters(text: str, table: str = FIREWALL_TABLE) -> dict[str, NftCounter]:
    """Named counters of `table` from ``nft -j list ruleset`` (or ``list counters``) output."""
    document = json.loads(text)
    counters: dict[str, NftCounter] = {}
    for item in document.get("nftables", []):
        counter = item.get("counter") if isinstance(item, dict) else None
        if counter and counter.get("table") == table:
            counters[counter["name"]] = NftCounter(int(counter["packets"]), int(counter["bytes"]))
    return counters


# A tiny TCP echo server and client, run inside a namespace with the venv's Python.
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


class NetnsLab:
    """Namespaces, veths, processes and cleanups of one test; `close()` removes them all."""

    def __init__(self, log_dir: Path) -> None:
        self.tag = secrets.token_hex(4)
        self.log_dir = Path(log_dir)
        self.tracker = ProcessTracker(self.log_dir)
        self.namespaces: list[str] = []
        self._cleanups: list[Callable[[], object]] = []
        self._subnet_index = secrets.randbelow(250) + 1

    # -- building ----------------------------------------------------------------------------------

    def ifname(self, suffix: str) -> str:
        """An interface name unique to this lab (≤ 15 chars): ``dt<tag><suffix>``, suffix ≤ 5 chars."""
        if not 0 < len(suffix) <= 5:
            raise ValueError("suffix must be 1-5 characters")
        return f"dt{self.tag}{suffix}"

    def add_namespace(self, role: str) -> str:
        """Create ``dt-<tag>-<role>`` with loopback up; it is deleted in close()."""
        name = f"dt-{self.tag}-{role}"
        self.command(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.command(["ip", "-n", name, "link", "set", "dev", "lo", "up"])
        return name

    def site_pair(self, label: str = "", *, ipv6: bool = False) -> SitePair:
        """A hospital and a cloud namespace joined by a veth pair (addresses from 10.201.<n>.0/24).

        `label` tells several pairs of one lab apart. Without `ipv6` the namespaces have IPv6 disabled,
        so no neighbour discovery chatter reaches the firewall's counters.
        """
        hospital, cloud = self.add_namespace(f"{label}hosp"), self.add_namespace(f"{label}cloud")
        if not ipv6:
            for ns in (hospital, cloud):
                self.run(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                              "net.ipv6.conf.default.disable_ipv6=1"])  # fmt: skip
        index = self._subnet_index
        subnet = ipaddress.ip_network(f"10.201.{index}.0/24")
        self._subnet_index = index % 250 + 1
        pair = SitePair(
            hospital=hospital,
            cloud=cloud,
            index=index,
            hospital_addr=ipaddress.ip_interface(f"{subnet[1]}/{subnet.prefixlen}"),
            cloud_addr=ipaddress.ip_interface(f"{subnet[2]}/{subnet.prefixlen}"),
        )
        self.command(
            ["ip", "link", "add", "name", pair.hospital_veth, "netns", hospital, "type", "veth"]
            + ["peer", "name", pair.cloud_veth, "netns", cloud]
        )
        for ns, dev, addr in (
            (hospital, pair.hospital_veth, pair.hospital_addr),
            (cloud, pair.cloud_veth, pair.cloud_addr),
        ):
            self.command(["ip", "-n", ns, "address", "add", str(addr), "dev", dev])
            self.command(["ip", "-n", ns, "link", "set", "dev", dev, "up"])
        return pair

    def defer(self, cleanup: Callable[[], object]) -> None:
        """Run `cleanup` in close(), before processes are ended and namespaces deleted (newest first)."""
        self._cleanups.append(cleanup)

    # -- running -----------------------------------------------------------------------------------

    def command(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run `argv` in the host namespace; return stdout, raise RuntimeError with stderr on failure."""
        done = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{list(argv)!r} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
        return done.stdout.decode(errors="replace")

    def run(self, ns: str, argv: Sequence[str], *, input: bytes | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run `argv` inside namespace `ns` and return its stdout (see `command`)."""
        return self.command(["ip", "netns", "exec", ns, *argv], input=input, timeout=timeout)

    def spawn(self, ns: str, argv: Sequence[str], *, name: str, env: dict[str, str] | None = None) -> ManagedProcess:
        """Start `argv` inside `ns` as a managed process, ended by its PID in close()."""
        return self.tracker.spawn(["ip", "netns", "exec", ns, *argv], name=name, env=env)

    def echo_server(self, ns: str, host: str, port: int) -> ManagedProcess:
        """A TCP echo server on host:port inside `ns`, returned once it listens."""
        proc = self.spawn(ns, [sys.executable, "-c", _ECHO_SERVER, host, str(port)], name=f"echo-{port}")

        def ready() -> bool:
            if not proc.running:
                raise RuntimeError(f"echo server exited:\n{proc.describe()}")
            return "READY" in proc.log_text()

        wait_until(ready, 15.0, message=lambda: f"echo server in {ns} on {host}:{port}\n{proc.describe()}")
        return proc

    def tcp_exchange(self, ns: str, host: str, port: int, payload: bytes, *, timeout: float = 5.0) -> ExchangeResult:
        """From inside `ns`, connect to host:port, send `payload` and read it back (bounded by `timeout`)."""
        argv = [sys.executable, "-c", _ECHO_CLIENT, host, str(port), str(timeout)]
        out = self.run(ns, argv, input=payload, timeout=timeout * 2 + 10)
        result = json.loads(out.strip().splitlines()[-1])
        return ExchangeResult(result["ok"], bytes.fromhex(result["echoed"]), result["error"])

    # -- teardown ----------------------------------------------------------------------------------

    def report(self) -> str:
        return self.tracker.report()

    def close(self) -> None:
        """Undo everything: cleanups, processes, stray wireguard-go sockets, namespaces. Raises at the end."""
        errors: list[str] = []
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as exc:  # keep cleaning; reported below
                errors.append(f"cleanup {cleanup!r}: {exc}")
        self._cleanups.clear()
        try:
            self.tracker.stop_all()
        except Exception as exc:
            errors.append(str(exc))
        for sock in UAPI_DIR.glob(f"dt{self.tag}*.sock"):  # a wireguard-go nobody stopped exits on this
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            errors.append(f"wireguard-go socket {sock} was left behind")
        for ns in reversed(self.namespaces):
            errors.extend(self._delete_namespace(ns))
        self.namespaces.clear()
        if errors:
            raise RuntimeError("netns lab teardown: " + "; ".join(errors))

    def _delete_namespace(self, ns: str) -> list[str]:
        errors = []
        try:
            wait_until(lambda: not self._pids(ns), 10.0, interval=0.1, message=f"processes in {ns} to exit")
        except TimeoutError:
            errors.append(f"processes still in {ns}: {self._pids(ns)}")
        try:
            self.command(["ip", "netns", "delete", ns])
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
        return errors

    def _pids(self, ns: str) -> list[int]:
        try:
            return [int(pid) for pid in self.command(["ip", "netns", "pids", ns]).split()]
        except (RuntimeError, subprocess.TimeoutExpired):
            return []


@dataclass
class HospitalFirewall:
    """The hospital's nftables table: inbound only for connections it opened; counters; optional UDP block.

    Counters: ``inbound_established`` (accepted replies), ``inbound_new_drops`` (new connections
    dropped), ``inbound_other_drops`` (invalid/untracked dropped), ``udp_out_drops`` (while UDP is blocked).
    """

    lab: NetnsLab
    ns: str
    veth: str = HOSPITAL_VETH
    table: str = FIREWALL_TABLE
    udp_blocked: bool = field(default=False, init=False)

    def install(self) -> HospitalFirewall:
        veth = json.dumps(self.veth)
        script = textwrap.dedent(
            f"""
            table inet {self.table} {{
              counter inbound_established {{ }}
              counter inbound_new_drops {{ }}
              counter inbound_other_drops {{ }}
              counter udp_out_drops {{ }}
              chain input {{
                type filter hook input priority filter; policy accept;
                iifname {veth} ct state established,related counter name "inbound_established" accept
                iifname {veth} ct state new counter name "inbound_new_drops" drop
                iifname {veth} counter name "inbound_other_drops" drop
              }}
              chain output {{
                type filter hook output priority filter; policy accept;
              }}
            }}
            """
        )
        self.lab.run(self.ns, ["nft", "-f", "-"], input=script.encode())
        return self

    def block_udp(self) -> None:
        """Drop every UDP packet leaving through the veth (WireGuard cannot get out)."""
        self.lab.run(
            self.ns,
            [
                "nft",
                "add",
                "rule",
                "inet",
                self.table,
                "output",
                "oifname",
                self.veth,
                "meta",
                "l4proto",
                "udp",
                "counter",
                "name",
                "udp_out_drops",
                "drop",
            ],
        )
        self.udp_blocked = True

    def unblock_udp(self) -> None:
        self.lab.run(self.ns, ["nft", "flush", "chain", "inet", self.table, "output"])
        self.udp_blocked = False

    def counters(self) -> dict[str, NftCounter]:
        return parse_nft_counters(self.lab.run(self.ns, ["nft", "-j", "list", "ruleset"]), self.table)

    def counter(self, name: str) -> NftCounter:
        counters = self.counters()
        if name not in counters:
            raise KeyError(f"no counter {name!r} in table {self.table} (have {sorted(counters)})")
        return counters[name]


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
            reports = request.node.stash.get(PHASE_REPORTS, {})
            if lab.tracker.processes and any(rep.failed for rep in reports.values()):
                print(f"--- processes started in the lab's namespaces ---\n{lab.report()}")
