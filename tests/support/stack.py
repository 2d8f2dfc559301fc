"""A real relay and real agents as processes on 127.0.0.1, configured from a TOML file each, with
certificates made by the product's own `tunnel-relay ca init` / `site cert` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ports import free_ports
from tests.support.procs import ManagedProcess, ProcessTracker, wait_for_port, wait_until

BIN = Path(sys.executable).parent
RELAY = str(BIN / "tunnel-relay")
AGENT = str(BIN / "tunnel-agent")


@dataclass
class ListenerRoute:
    called_ae: str
    site: str
    route: str
    allowed: list[str] = field(default_factory=lambda: ["*"])


@dataclass
class SiteDest:
    called_ae: str
    port: int
    allowed: list[str] = field(default_factory=lambda: ["*"])
    host: str = "127.0.0.1"


@dataclass
class AgentRoute:
    name: str
    port: int
    called_ae: str | None = None
    host: str = "127.0.0.1"


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


@dataclass
class RelayHandle:
    root: Path
    config: Path
    tunnel_port: int
    admin_port: int
    dicom_port: int
    proc: ManagedProcess | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def admin_token(self) -> str:
        return (self.state_dir / "admin.token").read_text().strip()

    def admin(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
        """Call the relay's admin API (with its token unless ``token`` is given)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {token or self.admin_token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as r:
            return json.load(r)

    def status(self) -> dict:
        return self.admin("GET", "/api/status")

    def site_connected(self, site: str) -> bool:
        try:
            return any(s["name"] == site and s["connected"] for s in self.status()["sites"])
        except OSError:
            return False


@dataclass
class AgentHandle:
    site: str
    root: Path
    config: Path
    status_port: int
    listener_port: int
    proc: ManagedProcess | None = None

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/api/status", timeout=5) as r:
            return json.load(r)


def make_relay(root: Path, *, listener_routes: list[ListenerRoute], sites: dict[str, list[SiteDest]],
               heartbeat: float = 10.0, artim: float = 10.0, tunnel: list[str] | None = None) -> RelayHandle:
    """Write the relay config and create its CA and server certificate with the product's CLI.
    ``tunnel``: more lines for its ``[tunnel]`` section."""
    root.mkdir(parents=True, exist_ok=True)
    handle = RelayHandle(root, root / "relay.toml", *free_ports(3))
    lines = [
        f'state_dir = "{handle.state_dir}"',
        "[tunnel]", 'host = "127.0.0.1"', f"port = {handle.tunnel_port}",
        f"heartbeat_interval = {heartbeat}", *(tunnel or []),
        "[admin]", 'host = "127.0.0.1"', f"port = {handle.admin_port}",
        "[[listeners]]", 'name = "cloud"', 'host = "127.0.0.1"', f"port = {handle.dicom_port}",
        f"artim_timeout = {artim}",
    ]
    for r in listener_routes:
        lines += ["[[listeners.routes]]", f'called_ae = "{r.called_ae}"', f'site = "{r.site}"',
                  f'route = "{r.route}"', f"allowed_calling_aes = {_toml_list(r.allowed)}"]
    for name, dests in sites.items():
        lines += ["[[sites]]", f'name = "{name}"']
        for d in dests:
            lines += ["[[sites.destinations]]", f'called_ae = "{d.called_ae}"', f'host = "{d.host}"',
                      f"port = {d.port}", f"allowed_calling_aes = {_toml_list(d.allowed)}"]
    handle.config.write_text("\n".join(lines) + "\n")
    _cli(RELAY, "ca", "init", "--config", str(handle.config), "--hostname", "127.0.0.1",
         "--hostname", "localhost")
    return handle


def make_agent(relay: RelayHandle, site: str, root: Path, *, routes: list[AgentRoute],
               heartbeat: float = 10.0, backoff_max: float = 1.0, artim: float = 10.0,
               enrolled: bool = False, extra: list[str] | None = None) -> AgentHandle:
    """Write the agent config; issue the site's certificate with the product's CLI (``site cert``), or,
    with ``enrolled=True``, leave relay URL and certificates to ``enroll_agent`` (the one-line join)."""
    root.mkdir(parents=True, exist_ok=True)
    certs = root / "certs"
    handle = AgentHandle(site, root, root / "agent.toml", *free_ports(2))
    if enrolled:
        lines = [f'state_dir = "{root / "state"}"']
    else:
        _cli(RELAY, "site", "cert", site, "--config", str(relay.config), "--out", str(certs))
        lines = [
            f'relay_url = "wss://127.0.0.1:{relay.tunnel_port}/tunnel"',
            f'cert_file = "{certs / "agent.crt"}"', f'key_file = "{certs / "agent.key"}"',
            f'ca_file = "{certs / "ca.crt"}"',
        ]
    lines += [*(extra or []),
        f"heartbeat_interval = {heartbeat}", "backoff_initial = 0.1", f"backoff_max = {backoff_max}",
        "connect_timeout = 5.0",
        "[status]", 'host = "127.0.0.1"', f"port = {handle.status_port}",
        "[listener]", 'host = "127.0.0.1"', f"port = {handle.listener_port}", f"artim_timeout = {artim}",
    ]
    for r in routes:
        lines += ["[[routes]]", f'name = "{r.name}"', f'host = "{r.host}"', f"port = {r.port}"]
        if r.called_ae:
            lines.append(f'called_ae = "{r.called_ae}"')
    handle.config.write_text("\n".join(lines) + "\n")
    return handle


def site_add(relay: RelayHandle, site: str, *extra: str) -> str:
    """``tunnel-relay site add`` against the running relay; returns the one-line token it prints."""
    result = subprocess.run([RELAY, "site", "add", site, "--config", str(relay.config), *extra],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"site add failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip()


def enroll(agent: AgentHandle, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """``tunnel-agent enroll`` with the token on standard input (never argv); returns the finished process."""
    return subprocess.run([AGENT, "enroll", "--config", str(agent.config), *extra], input=token + "\n",
                          capture_output=True, text=True, timeout=60)


def enroll_agent(relay: RelayHandle, agent: AgentHandle) -> str:
    """The one-line join: ``site add`` on the relay, ``enroll`` on the agent. Returns the token used."""
    token = site_add(relay, agent.site)
    result = enroll(agent, token)
    if result.returncode != 0:
        raise RuntimeError(f"enroll failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return token


def start_relay(procs: ProcessTracker, relay: RelayHandle) -> ManagedProcess:
    relay.proc = procs.spawn([RELAY, "serve", "--config", str(relay.config)], name="relay")
    wait_for_port("127.0.0.1", relay.admin_port, 15, proc=relay.proc)
    wait_for_port("127.0.0.1", relay.dicom_port, 15, proc=relay.proc)
    return relay.proc


def start_agent(procs: ProcessTracker, agent: AgentHandle, relay: RelayHandle | None = None,
                *, wait_connected: bool = True) -> ManagedProcess:
    agent.proc = procs.spawn([AGENT, "run", "--config", str(agent.config)], name=f"agent-{agent.site}")
    wait_for_port("127.0.0.1", agent.status_port, 15, proc=agent.proc)
    if wait_connected:
        wait_until(lambda: agent.status()["state"] == "connected", 15,
                   message=lambda: f"agent {agent.site} connected; log:\n{agent.proc.log_tail()}")
        if relay is not None:
            wait_until(lambda: relay.site_connected(agent.site), 15, message="relay sees the site")
    return agent.proc


def _cli(*argv: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=60,
                            env={**os.environ})
    if result.returncode != 0:
        raise RuntimeError(f"{argv!r} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
