"""Our tunnel under test: a real ``tunnel-relay`` and ``tunnel-agent`` (WebSocket mode) as processes,
brought up by the dev kit (:mod:`devkit.stack`: TOML files, certificates made by the product's own CLI,
start and wait). The mux settings are the programs' defaults: we measure what ships.

    cloud -> site:  storescu -> relay listener (HOSP_PACS | HOSP_ECHO | HOSP_ACC) -> agent route -> sink
    site -> cloud:  storescu -> agent listener (CLOUD | CLOUDECHO | CLOUDACC) -> relay destination -> sink

The WAN measurement adds agents of their own sites (``wan-0``...) whose ``relay_url`` points at a delay
proxy in front of the relay's tunnel port (the relay certificate carries IP SAN 127.0.0.1); each also has a
spool destination (``CLOUDSPOOL``, forwarded to the same bulk sink).
"""

from __future__ import annotations

from pathlib import Path

from devkit.procs import ProcessTracker
from devkit.stack import (
    AgentHandle,
    AgentRoute,
    ListenerRoute,
    RelayHandle,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)
from tunnel_bench.paths import BenchPath, Endpoint
from tunnel_bench.peers import Sinks

__all__ = ["SPOOL_AE", "TunnelStack"]

SITE = "bench"
SPOOL_AE = "CLOUDSPOOL"  # a WAN agent's spool destination (mode = "spool"), forwarded to the bulk sink
START_TIMEOUT_S = 20.0
AGENT_CONNECT_TIMEOUT_S = 10.0
# (called AE on the relay listener, agent route name, called AE on the agent listener, sink attribute)
ROUTES = (("HOSP_PACS", "pacs", "CLOUD", "bulk_port"),
          ("HOSP_ECHO", "pacsecho", "CLOUDECHO", "echo_port"),
          ("HOSP_ACC", "pacsacc", "CLOUDACC", "accept_port"))


class TunnelStack:
    """Relay + the bench agent; ``start()``, ``restart()``, and ``wan_agent()`` for the WAN sites.

    ``relay`` and ``agent`` are the dev kit's handles (ports, config, ``proc``, ``status()``)."""

    def __init__(self, procs: ProcessTracker, root: Path, sinks: Sinks, *, wan_sites: int = 0) -> None:
        self.procs = procs
        self.root = root
        self.sinks = sinks
        self.wan_sites = [f"wan-{i}" for i in range(wan_sites)]
        self.relay = self._make_relay()
        self.agent = self._make_agent(SITE, [AgentRoute(route, getattr(sinks, attr)) for _, route, _, attr in ROUTES])

    # --- configuration ---------------------------------------------------------------------------------

    def _make_relay(self) -> RelayHandle:
        """The relay's config (one listener route per sink, the bench site, the WAN sites) and its CA."""
        routes = [ListenerRoute(relay_ae, SITE, route) for relay_ae, route, _, _ in ROUTES]
        sites = {SITE: [SiteDest(agent_ae, getattr(self.sinks, attr)) for _, _, agent_ae, attr in ROUTES]}
        sites.update({site: [SiteDest("CLOUD", self.sinks.bulk_port), SiteDest(SPOOL_AE, self.sinks.bulk_port)]
                      for site in self.wan_sites})
        return make_relay(self.root / "relay", listener_routes=routes, sites=sites, procs=self.procs)

    def _make_agent(self, site: str, routes: list[AgentRoute], relay_url: str | None = None, *,
                    spool: bool = False) -> AgentHandle:
        root = self.root / f"agent-{site}"
        extra = [f'state_dir = "{root / "state"}"'] if spool else []
        sections = ["[[destinations]]", 'name = "cloud-spool"', f'called_ae = "{SPOOL_AE}"', 'mode = "spool"',
                    "[spool]", "min_free_bytes = 0"] if spool else []
        return make_agent(self.relay, site, root, routes=routes, relay_url=relay_url, extra=extra,
                          sections=sections, connect_timeout=AGENT_CONNECT_TIMEOUT_S, procs=self.procs)

    @property
    def tunnel_port(self) -> int:
        return self.relay.tunnel_port

    @property
    def admin_port(self) -> int:
        return self.relay.admin_port

    @property
    def dicom_port(self) -> int:
        return self.relay.dicom_port

    # --- processes -------------------------------------------------------------------------------------

    def start(self) -> None:
        start_relay(self.procs, self.relay, timeout=START_TIMEOUT_S)
        self.start_agent(self.agent)

    def start_agent(self, agent: AgentHandle) -> None:
        start_agent(self.procs, agent, self.relay, wait_listener=True, timeout=START_TIMEOUT_S)

    def stop_agent(self, agent: AgentHandle) -> None:
        if agent.proc is not None:
            self.procs.stop(agent.proc)
            agent.proc = None

    def restart(self) -> None:
        """Fresh relay and agent processes (same configuration and ports)."""
        self.stop_agent(self.agent)
        if self.relay.proc is not None:
            self.procs.stop(self.relay.proc)
            self.relay.proc = None
        self.start()

    def wan_agent(self, index: int, proxy_port: int) -> AgentHandle:
        """An agent for site ``wan-<index>`` whose relay_url is the delay proxy at ``proxy_port``. Its
        listener carries ``CLOUD`` through (passthrough) and answers ``SPOOL_AE`` from its spool."""
        return self._make_agent(self.wan_sites[index], [], f"wss://127.0.0.1:{proxy_port}/tunnel", spool=True)

    # --- the two paths ---------------------------------------------------------------------------------

    def _pids(self) -> dict[str, list[int]]:
        assert self.relay.proc is not None and self.agent.proc is not None
        return {"relay": [self.relay.proc.pid], "agent": [self.agent.proc.pid]}

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
