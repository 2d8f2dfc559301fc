"""Our tunnel under test: a real ``tunnel-relay`` and ``tunnel-agent`` (WebSocket mode) as processes,
configured from TOML files, with certificates made by the product's own CLI (``tunnel-relay ca init``,
``tunnel-relay site cert``). The mux settings are the programs' defaults: we measure what ships.

    cloud -> site:  storescu -> relay listener (HOSP_PACS | HOSP_ECHO | HOSP_ACC) -> agent route -> sink
    site -> cloud:  storescu -> agent listener (CLOUD | CLOUDECHO | CLOUDACC) -> relay destination -> sink

The WAN measurement adds agents of their own sites (``wan-0``...) whose ``relay_url`` points at a delay
proxy in front of the relay's tunnel port (the relay certificate carries IP SAN 127.0.0.1).
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tunnel_bench.errors import BenchError
from tunnel_bench.paths import BenchPath, Endpoint
from tunnel_bench.peers import Sinks
from tunnel_bench.procs import Proc, ProcessSet, free_ports, venv_bin, wait_for_port, wait_until

__all__ = ["AgentInstance", "TunnelStack", "fetch_status"]

SITE = "bench"
START_TIMEOUT_S = 20.0
# (called AE on the relay listener, agent route name, called AE on the agent listener, sink attribute)
ROUTES = (("HOSP_PACS", "pacs", "CLOUD", "bulk_port"),
          ("HOSP_ECHO", "pacsecho", "CLOUDECHO", "echo_port"),
          ("HOSP_ACC", "pacsacc", "CLOUDACC", "accept_port"))


def fetch_status(port: int, timeout: float = 5.0, token: str | None = None) -> dict:
    """GET http://127.0.0.1:port/api/status as JSON (relay admin port with its token, or agent status port)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _cli(*argv: str) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BenchError(f"{argv!r} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


@dataclass
class AgentInstance:
    site: str
    config: Path
    status_port: int
    listener_port: int
    proc: Proc | None = None

    def status(self) -> dict:
        return fetch_status(self.status_port)


class TunnelStack:
    """Relay + the bench agent; ``start()``, ``restart()``, and ``wan_agent()`` for the WAN sites."""

    def __init__(self, procs: ProcessSet, root: Path, sinks: Sinks, *, wan_sites: int = 0) -> None:
        self.procs = procs
        self.root = root
        self.sinks = sinks
        self.wan_sites = [f"wan-{i}" for i in range(wan_sites)]
        self.tunnel_port, self.admin_port, self.dicom_port = free_ports(3)
        self.relay_config = root / "relay" / "relay.toml"
        self.relay: Proc | None = None
        self.agent: AgentInstance | None = None

    # --- configuration ---------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Write the relay config, create its CA with the product CLI, issue the bench agent's certificate."""
        self.relay_config.parent.mkdir(parents=True, exist_ok=True)
        self.relay_config.write_text(self._relay_toml())
        _cli(venv_bin("tunnel-relay"), "ca", "init", "--config", str(self.relay_config),
             "--hostname", "127.0.0.1", "--hostname", "localhost")
        routes = [(route, getattr(self.sinks, attr)) for _, route, _, attr in ROUTES]
        self.agent = self._make_agent(SITE, f"wss://127.0.0.1:{self.tunnel_port}/tunnel", routes)

    def _relay_toml(self) -> str:
        lines = [f'state_dir = "{self.root / "relay" / "state"}"',
                 "[tunnel]", 'host = "127.0.0.1"', f"port = {self.tunnel_port}",
                 "[admin]", 'host = "127.0.0.1"', f"port = {self.admin_port}",
                 "[[listeners]]", 'name = "cloud"', 'host = "127.0.0.1"', f"port = {self.dicom_port}"]
        for relay_ae, route, _, _ in ROUTES:
            lines += ["[[listeners.routes]]", f'called_ae = "{relay_ae}"', f'site = "{SITE}"',
                      f'route = "{route}"', 'allowed_calling_aes = ["*"]']
        lines += ["[[sites]]", f'name = "{SITE}"']
        for _, _, agent_ae, attr in ROUTES:
            lines += self._destination(agent_ae, getattr(self.sinks, attr))
        for site in self.wan_sites:
            lines += ["[[sites]]", f'name = "{site}"', *self._destination("CLOUD", self.sinks.bulk_port)]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _destination(called_ae: str, port: int) -> list[str]:
        return ["[[sites.destinations]]", f'called_ae = "{called_ae}"', 'host = "127.0.0.1"',
                f"port = {port}", 'allowed_calling_aes = ["*"]']

    def _make_agent(self, site: str, relay_url: str, routes: list[tuple[str, int]]) -> AgentInstance:
        root = self.root / f"agent-{site}"
        certs = root / "certs"
        _cli(venv_bin("tunnel-relay"), "site", "cert", site, "--config", str(self.relay_config),
             "--out", str(certs))
        status_port, listener_port = free_ports(2)
        lines = [f'relay_url = "{relay_url}"', f'cert_file = "{certs / "agent.crt"}"',
                 f'key_file = "{certs / "agent.key"}"', f'ca_file = "{certs / "ca.crt"}"',
                 "backoff_initial = 0.1", "backoff_max = 1.0", "connect_timeout = 10.0",
                 "[status]", 'host = "127.0.0.1"', f"port = {status_port}",
                 "[listener]", 'host = "127.0.0.1"', f"port = {listener_port}"]
        for name, port in routes:
            lines += ["[[routes]]", f'name = "{name}"', 'host = "127.0.0.1"', f"port = {port}"]
        config = root / "agent.toml"
        config.write_text("\n".join(lines) + "\n")
        return AgentInstance(site, config, status_port, listener_port)

    # --- processes -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.agent is None:
            self.prepare()
        self.relay = self.procs.spawn([venv_bin("tunnel-relay"), "serve", "--config", str(self.relay_config)],
                                      name="relay")
        wait_for_port(self.admin_port, START_TIMEOUT_S, proc=self.relay)
        wait_for_port(self.dicom_port, START_TIMEOUT_S, proc=self.relay)
        self.start_agent(self.agent)

    def start_agent(self, agent: AgentInstance) -> None:
        agent.proc = self.procs.spawn([venv_bin("tunnel-agent"), "run", "--config", str(agent.config)],
                                      name=f"agent-{agent.site}")
        wait_for_port(agent.status_port, START_TIMEOUT_S, proc=agent.proc)
        wait_for_port(agent.listener_port, START_TIMEOUT_S, proc=agent.proc)
        wait_until(lambda: self.site_connected(agent.site), START_TIMEOUT_S,
                   what=lambda: f"site {agent.site} connected to the relay\n{agent.proc.log_tail()}")

    def stop_agent(self, agent: AgentInstance) -> None:
        if agent.proc is not None:
            self.procs.stop(agent.proc)
            agent.proc = None

    def restart(self) -> None:
        """Fresh relay and agent processes (same configuration and ports)."""
        self.stop_agent(self.agent)
        if self.relay is not None:
            self.procs.stop(self.relay)
        self.start()

    def site_connected(self, site: str) -> bool:
        try:
            sites = fetch_status(self.admin_port, token=self.admin_token)["sites"]
            return any(s["name"] == site and s["connected"] for s in sites)
        except (OSError, ValueError, KeyError):
            return False

    def wan_agent(self, index: int, proxy_port: int) -> AgentInstance:
        """An agent for site ``wan-<index>`` whose relay_url is the delay proxy at ``proxy_port``."""
        return self._make_agent(self.wan_sites[index], f"wss://127.0.0.1:{proxy_port}/tunnel", [])

    # --- the two paths ---------------------------------------------------------------------------------

    def _pids(self) -> dict[str, list[int]]:
        assert self.relay is not None and self.agent is not None and self.agent.proc is not None
        return {"relay": [self.relay.pid], "agent": [self.agent.proc.pid]}

    def cloud_to_site(self) -> BenchPath:
        return BenchPath("tunnel_c2s", "our tunnel, cloud->site", Endpoint(self.dicom_port, "HOSP_PACS"),
                         Endpoint(self.dicom_port, "HOSP_ECHO"), self._pids())

    def site_to_cloud(self) -> BenchPath:
        port = self.agent.listener_port
        return BenchPath("tunnel_s2c", "our tunnel, site->cloud", Endpoint(port, "CLOUD"),
                         Endpoint(port, "CLOUDECHO"), self._pids())

    def accept_endpoints(self) -> list[Endpoint]:
        """The accept-all SCP through the tunnel, cloud->site then site->cloud."""
        return [Endpoint(self.dicom_port, "HOSP_ACC"), Endpoint(self.agent.listener_port, "CLOUDACC")]

    def status_ports(self) -> dict[str, int]:
        return {"relay": self.admin_port, "agent": self.agent.status_port}

    @property
    def admin_token(self) -> str:
        """The relay's admin API token (created by ``ca init`` in the relay's state directory)."""
        return (self.root / "relay" / "state" / "admin.token").read_text().strip()

