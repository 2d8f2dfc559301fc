"""The paths compared, each from a storescu on 127.0.0.1 to the shared sinks: direct TCP, OpenSSH
``ssh -R`` and a stunnel pair. (Our tunnel is in :mod:`tunnel_bench.tunnelstack`.)

Every path forwards two endpoints to the sinks: ``bulk`` (storescp --fork) and ``echo`` (the
latency-probe storescp), both over the *same* tunnel where the path has one (one SSH connection with two
remote forwards; one stunnel pair with two services), so a probe during a bulk transfer measures the
tunnel's fairness. ``roles()`` names the path's own processes (for CPU and RSS per GB).

``ssh -R`` runs against an sshd of our own: its own host key, ``AuthorizedKeysFile``, config and known
hosts in a temporary directory, listening on 127.0.0.1 only. The machine's SSH set-up is never read or
changed (``ssh -F`` skips ~/.ssh/config and /etc/ssh/ssh_config; keys are ``IdentitiesOnly``). The one
system-wide thing sshd needs as root, its empty privilege-separation directory /run/sshd, is created if
missing, as the Debian init script would.
"""

from __future__ import annotations

import getpass
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from devkit.errors import DevkitError
from devkit.ports import LOOPBACK, free_ports
from devkit.procs import ManagedProcess, ProcessTracker
from devkit.programs import require_binary
from devkit.waits import wait_for_port
from tunnel_bench.errors import BenchError
from tunnel_bench.peers import Sinks, make_tls_files

__all__ = ["BenchPath", "Endpoint", "direct_path", "start_ssh_path", "start_stunnel_path"]

PRIVSEP_DIR = Path("/run/sshd")


@dataclass(frozen=True)
class Endpoint:
    """Where a storescu (or probe) connects for this path, and the called AE title it uses."""

    port: int
    called_ae: str


@dataclass
class BenchPath:
    """One path under test. ``procs`` maps a role (``relay``, ``sshd``...) to the PIDs that play it."""

    key: str
    label: str
    bulk: Endpoint
    echo: Endpoint
    procs: dict[str, list[int]] = field(default_factory=dict)
    include_children: frozenset[str] = frozenset()

    def roles(self) -> dict[str, list[psutil.Process]]:
        """psutil handles of each role's processes now (sshd's per-connection children included)."""
        out: dict[str, list[psutil.Process]] = {}
        for role, pids in self.procs.items():
            handles = [psutil.Process(pid) for pid in pids]
            if role in self.include_children:
                handles += [child for h in list(handles) for child in h.children(recursive=True)]
            out[role] = handles
        return out


def direct_path(sinks: Sinks) -> BenchPath:
    return BenchPath("direct", "direct TCP", Endpoint(sinks.bulk_port, "SINK"), Endpoint(sinks.echo_port, "ECHO"))


# --- OpenSSH ssh -R ------------------------------------------------------------------------------------


def _keygen(path: Path) -> str:
    """A new ed25519 key pair at ``path`` (no passphrase); returns the public key line."""
    keygen = require_binary("ssh-keygen", "openssh-client")
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "tunnel-bench", "-f", str(path)],
                   check=True, timeout=30, stdin=subprocess.DEVNULL, capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


def _sshd_config(root: Path, user: str, forward_ports: list[int]) -> str:
    listen = " ".join(f"127.0.0.1:{p}" for p in forward_ports)
    return "\n".join([
        "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}", "PidFile none",
        f"AuthorizedKeysFile {root / 'authorized_keys'}", "StrictModes no", "UsePAM no",
        "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", f"AllowUsers {user}", "AllowTcpForwarding remote",
        "GatewayPorts no", f"PermitListen {listen}", "X11Forwarding no", "AllowAgentForwarding no",
        "PermitTTY no", "PrintMotd no", "UseDNS no", "LogLevel ERROR", "",
    ])


def _ssh_config(root: Path, user: str, sshd_port: int) -> str:
    return "\n".join([
        "Host bench-sshd", "  HostName 127.0.0.1", f"  Port {sshd_port}", f"  User {user}",
        f"  IdentityFile {root / 'client_key'}", "  IdentitiesOnly yes", "  IdentityAgent none",
        f"  UserKnownHostsFile {root / 'known_hosts'}", "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes", "  BatchMode yes", "  ExitOnForwardFailure yes",
        "  ControlMaster no", "  ControlPath none", "  RequestTTY no", "  LogLevel ERROR", "",
    ])


def _prepare_privsep_dir() -> None:
    if os.geteuid() == 0 and not PRIVSEP_DIR.exists():
        PRIVSEP_DIR.mkdir(mode=0o755)


def start_ssh_path(procs: ProcessTracker, root: Path, sinks: Sinks) -> BenchPath:
    """Our own sshd ("cloud") and an ``ssh -N -R`` client ("hospital") forwarding bulk and echo."""
    sshd_bin = require_binary("sshd", "openssh-server")
    ssh_bin = require_binary("ssh", "openssh-client")
    root.mkdir(parents=True, exist_ok=True)
    user = getpass.getuser()
    sshd_port, bulk_port, echo_port = free_ports(3)
    host_pub = _keygen(root / "host_key")
    (root / "authorized_keys").write_text(_keygen(root / "client_key") + "\n")
    (root / "known_hosts").write_text(f"[127.0.0.1]:{sshd_port} {host_pub}\n")
    (root / "sshd_config").write_text(_sshd_config(root, user, [bulk_port, echo_port]))
    (root / "ssh_config").write_text(_ssh_config(root, user, sshd_port))
    _prepare_privsep_dir()
    sshd = procs.spawn([sshd_bin, "-D", "-e", "-f", str(root / "sshd_config"), "-p", str(sshd_port)], name="sshd")
    wait_for_port(LOOPBACK, sshd_port, proc=sshd)
    forwards = [f"127.0.0.1:{bulk_port}:127.0.0.1:{sinks.bulk_port}",
                f"127.0.0.1:{echo_port}:127.0.0.1:{sinks.echo_port}"]
    argv = [ssh_bin, "-N", "-F", str(root / "ssh_config")]
    for spec in forwards:
        argv += ["-R", spec]
    client = procs.spawn(argv + ["bench-sshd"], name="ssh-R")
    for port in (bulk_port, echo_port):
        wait_for_port(LOOPBACK, port, proc=client)
    return BenchPath("ssh", "OpenSSH ssh -R", Endpoint(bulk_port, "SINK"), Endpoint(echo_port, "ECHO"),
                     {"sshd": [sshd.pid], "ssh": [client.pid]}, frozenset({"sshd"}))


# --- stunnel pair --------------------------------------------------------------------------------------


def _stunnel_config(services: list[tuple[str, int, int]], tls: dict[str, Path], *, client: bool) -> str:
    role = "client" if client else "server"
    lines = ["foreground = yes", "pid =", "syslog = no", "debug = warning",
             "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1"]
    for name, accept, connect in services:
        lines += [f"[{name}]", f"accept = 127.0.0.1:{accept}", f"connect = 127.0.0.1:{connect}",
                  f"cert = {tls[role + '_cert']}", f"key = {tls[role + '_key']}", f"CAfile = {tls['ca']}",
                  "verifyChain = yes"]
        if client:
            lines += ["client = yes", "checkIP = 127.0.0.1"]
    return "\n".join(lines) + "\n"


def start_stunnel_path(procs: ProcessTracker, root: Path, sinks: Sinks) -> BenchPath:
    """A client-side stunnel (plain TCP in, mutual TLS out) and a server-side stunnel (TLS in, to the sinks)."""
    binary = require_binary("stunnel4", "stunnel4")
    root.mkdir(parents=True, exist_ok=True)
    tls = make_tls_files(root / "tls")
    bulk_in, echo_in, bulk_tls, echo_tls = free_ports(4)
    server_cfg, client_cfg = root / "server.conf", root / "client.conf"
    server_cfg.write_text(_stunnel_config(
        [("bulk", bulk_tls, sinks.bulk_port), ("echo", echo_tls, sinks.echo_port)], tls, client=False))
    client_cfg.write_text(_stunnel_config(
        [("bulk", bulk_in, bulk_tls), ("echo", echo_in, echo_tls)], tls, client=True))
    server = procs.spawn([binary, str(server_cfg)], name="stunnel-server")
    _wait_ports(server, [bulk_tls, echo_tls])
    client = procs.spawn([binary, str(client_cfg)], name="stunnel-client")
    _wait_ports(client, [bulk_in, echo_in])
    return BenchPath("stunnel", "stunnel pair (TLS)", Endpoint(bulk_in, "SINK"), Endpoint(echo_in, "ECHO"),
                     {"stunnel-client": [client.pid], "stunnel-server": [server.pid]})


def _wait_ports(proc: ManagedProcess, ports: list[int]) -> None:
    try:
        for port in ports:
            wait_for_port(LOOPBACK, port, proc=proc)
    except DevkitError as exc:
        raise BenchError(f"{proc.name} did not start: {exc}") from exc
