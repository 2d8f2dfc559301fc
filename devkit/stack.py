"""A real relay and real agents as processes, configured from a TOML file each, with certificates made
by the product's own CLI (``tunnel-relay ca init`` / ``site cert``) or the one-line join (``site add`` on
the relay, ``tunnel-agent enroll`` on the agent).

Calling contract, in order:

1. ``relay = make_relay(root, listener_routes=..., sites=...)`` picks free ports, writes
   ``root/relay.toml`` (state in ``root/state``) and creates the relay's CA and server certificate.
2. ``agent = make_agent(relay, site, root, routes=...)`` picks free ports and writes ``root/agent.toml``;
   it issues the site's certificate (``site cert``) unless ``enrolled=True``, which leaves relay URL and
   certificates to ``enroll_agent(relay, agent)`` once the relay runs.
3. ``start_relay(procs, relay)`` and ``start_agent(procs, agent, relay)`` start them under a
   :class:`~devkit.procs.ProcessTracker` (which ends them by PID) and return once they serve: the relay's
   admin and DICOM ports accept; the agent's status port accepts and, with ``wait_connected``, the agent
   says ``connected`` and the relay lists the site as connected. A program that exits meanwhile fails the
   wait at once with its log (:class:`~devkit.errors.ProcessExited`); a slow one fails after ``timeout``
   (:class:`~devkit.errors.WaitTimeout`).

Everything listens on 127.0.0.1, except the relay's tunnel port, which listens on ``host`` (a lab
namespace's address for WireGuard). Every CLI run has a timeout; with ``procs`` it goes through that
tracker (its PID lands in the tracker's pids file). Settings not named here keep the programs' defaults:
a benchmark measures what ships.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devkit.errors import CommandFailed
from devkit.ports import LOOPBACK, free_ports
from devkit.procs import ManagedProcess, ProcessTracker, run_command
from devkit.programs import program
from devkit.waits import wait_for_port, wait_until

__all__ = [
    "AgentHandle",
    "AgentRoute",
    "ListenerRoute",
    "RelayHandle",
    "SiteDest",
    "cli",
    "enroll",
    "enroll_agent",
    "http_json",
    "make_agent",
    "make_relay",
    "site_add",
    "start_agent",
    "start_relay",
]

CLI_TIMEOUT = 60.0
HTTP_TIMEOUT = 5.0
START_TIMEOUT = 15.0


@dataclass
class ListenerRoute:
    """A route of the relay's cloud listener: ``called_ae`` goes to ``route`` of ``site``."""

    called_ae: str
    site: str
    route: str
    allowed: list[str] = field(default_factory=lambda: ["*"])


@dataclass
class SiteDest:
    """A destination a site may send to, through the relay."""

    called_ae: str
    port: int
    allowed: list[str] = field(default_factory=lambda: ["*"])
    host: str = LOOPBACK


@dataclass
class AgentRoute:
    """A route in the agent's own config: what the relay's route name means on the hospital side."""

    name: str
    port: int
    called_ae: str | None = None
    host: str = LOOPBACK


def http_json(url: str, *, method: str = "GET", body: dict | None = None, token: str | None = None,
              timeout: float = HTTP_TIMEOUT) -> Any:
    """One HTTP request to a loopback status or admin API; the JSON answer. Raises OSError or ValueError."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


@dataclass
class RelayHandle:
    root: Path
    config: Path
    tunnel_port: int
    admin_port: int
    dicom_port: int
    proc: ManagedProcess | None = None
    host: str = LOOPBACK  # the tunnel port's address

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def url(self) -> str:
        """The tunnel URL an agent's ``relay_url`` names."""
        return f"wss://{self.host}:{self.tunnel_port}/tunnel"

    @property
    def admin_token(self) -> str:
        return (self.state_dir / "admin.token").read_text().strip()

    def admin(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
        """Call the relay's admin API (with its token unless ``token`` is given)."""
        return http_json(f"http://{LOOPBACK}:{self.admin_port}{path}", method=method, body=body,
                         token=token or self.admin_token)

    def status(self) -> dict:
        return self.admin("GET", "/api/status")

    def site_connected(self, site: str) -> bool:
        """Does the relay list ``site`` as connected now? (False while it cannot be asked.)"""
        try:
            return any(s["name"] == site and s["connected"] for s in self.status()["sites"])
        except (OSError, ValueError, KeyError):
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
        return http_json(f"http://{LOOPBACK}:{self.status_port}/api/status")

    def state(self) -> str | None:
        """The agent's ``state`` now, or None while it cannot be asked."""
        try:
            return self.status().get("state")
        except (OSError, ValueError, AttributeError):
            return None


def cli(*argv: str, procs: ProcessTracker | None = None, input: str | None = None,
        timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run one CLI command to completion; the finished process, or CommandFailed with its output."""
    done = _run(list(argv), procs, input, timeout)
    if done.returncode != 0:
        raise CommandFailed(f"{list(argv)!r} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def _relay() -> list[str]:
    return program("tunnel-relay", "relay.cli")


def _agent() -> list[str]:
    return program("tunnel-agent", "tunnel_agent.cli")


def _run(argv: list[str], procs: ProcessTracker | None, input: str | None,
         timeout: float) -> subprocess.CompletedProcess[str]:
    words = itertools.takewhile(lambda arg: not arg.startswith("-"), argv[1:3])  # "tunnel-relay site add"
    name = " ".join([os.path.basename(argv[0]), *words])
    if procs is not None:
        return procs.run(argv, name=name, input=input, timeout=timeout)
    return run_command(argv, input=input, timeout=timeout)


def _toml(value: object) -> str:
    return json.dumps(str(value))  # a JSON string of a path or AE title is a valid TOML basic string


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(_toml(item) for item in items) + "]"


def _endpoint(host: str, port: int) -> list[str]:
    return [f"host = {_toml(host)}", f"port = {port}"]


def relay_toml(relay: RelayHandle, *, listener_routes: Sequence[ListenerRoute], sites: dict[str, list[SiteDest]],
               heartbeat: float, artim: float, tunnel: Sequence[str], sections: Sequence[str],
               extra: Sequence[str] = ()) -> str:
    """The relay's configuration: one cloud listener and the sites (see deploy/relay.example.toml)."""
    lines = [f"state_dir = {_toml(relay.state_dir)}", *extra,
             "[tunnel]", *_endpoint(relay.host, relay.tunnel_port), f"heartbeat_interval = {heartbeat}", *tunnel,
             "[admin]", *_endpoint(LOOPBACK, relay.admin_port),
             "[[listeners]]", 'name = "cloud"', *_endpoint(LOOPBACK, relay.dicom_port), f"artim_timeout = {artim}"]
    for r in listener_routes:
        lines += ["[[listeners.routes]]", f"called_ae = {_toml(r.called_ae)}", f"site = {_toml(r.site)}",
                  f"route = {_toml(r.route)}", f"allowed_calling_aes = {_toml_list(r.allowed)}"]
    for name, dests in sites.items():
        lines += ["[[sites]]", f"name = {_toml(name)}"]
        for d in dests:
            lines += ["[[sites.destinations]]", f"called_ae = {_toml(d.called_ae)}", *_endpoint(d.host, d.port),
                      f"allowed_calling_aes = {_toml_list(d.allowed)}"]
    return "\n".join([*lines, *sections]) + "\n"


def make_relay(root: Path, *, listener_routes: Sequence[ListenerRoute], sites: dict[str, list[SiteDest]],
               heartbeat: float = 10.0, artim: float = 10.0, tunnel: Sequence[str] | None = None,
               sections: Sequence[str] | None = None, extra: Sequence[str] | None = None, host: str = LOOPBACK,
               procs: ProcessTracker | None = None) -> RelayHandle:
    """Write the relay config and create its CA and server certificate with the product's CLI.

    ``tunnel``: more lines for its ``[tunnel]`` section; ``sections``: more tables at the end
    (``[wireguard]``...); ``extra``: more top-level lines (``registry_url = ...``); ``host``: the tunnel
    port's address (and the certificate's)."""
    root.mkdir(parents=True, exist_ok=True)
    relay = RelayHandle(root, root / "relay.toml", *free_ports(3), host=host)
    relay.config.write_text(relay_toml(relay, listener_routes=listener_routes, sites=sites, heartbeat=heartbeat,
                                       artim=artim, tunnel=tunnel or [], sections=sections or [],
                                       extra=extra or []))
    hostnames = [host] if host == "localhost" else [host, "localhost"]
    cli(*_relay(), "ca", "init", "--state-dir", str(relay.state_dir),
        *[arg for name in hostnames for arg in ("--hostname", name)], procs=procs)
    return relay


def make_agent(relay: RelayHandle, site: str, root: Path, *, routes: Sequence[AgentRoute],
               heartbeat: float = 10.0, backoff_initial: float = 0.1, backoff_max: float = 1.0,
               connect_timeout: float = 5.0, artim: float = 10.0, enrolled: bool = False,
               extra: Sequence[str] | None = None, sections: Sequence[str] | None = None,
               relay_url: str | None = None, procs: ProcessTracker | None = None) -> AgentHandle:
    """Write the agent config; issue the site's certificate with the product's CLI (``site cert``), or,
    with ``enrolled=True``, leave relay URL and certificates to :func:`enroll_agent` (the one-line join).

    ``extra``: more top-level lines; ``sections``: more tables at the end; ``relay_url``: instead of the
    relay's own (a proxy in front of it, say)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)  # the agent's keys live under it
    agent = AgentHandle(site, root, root / "agent.toml", *free_ports(2))
    if enrolled:
        lines = [f"state_dir = {_toml(root / 'state')}"]
    else:
        certs = root / "certs"
        cli(*_relay(), "site", "cert", site, "--state-dir", str(relay.state_dir), "--out", str(certs), procs=procs)
        lines = [f"relay_url = {_toml(relay_url or relay.url)}", f"cert_file = {_toml(certs / 'agent.crt')}",
                 f"key_file = {_toml(certs / 'agent.key')}", f"ca_file = {_toml(certs / 'ca.crt')}"]
    lines += [*(extra or []), f"heartbeat_interval = {heartbeat}", f"backoff_initial = {backoff_initial}",
              f"backoff_max = {backoff_max}", f"connect_timeout = {connect_timeout}",
              "[status]", *_endpoint(LOOPBACK, agent.status_port),
              "[listener]", *_endpoint(LOOPBACK, agent.listener_port), f"artim_timeout = {artim}"]
    for r in routes:
        lines += ["[[routes]]", f"name = {_toml(r.name)}", *_endpoint(r.host, r.port)]
        if r.called_ae:
            lines.append(f"called_ae = {_toml(r.called_ae)}")
    agent.config.write_text("\n".join([*lines, *(sections or [])]) + "\n")
    return agent


def site_add(relay: RelayHandle, site: str, *extra: str, procs: ProcessTracker | None = None) -> str:
    """``tunnel-relay site add`` against the running relay; returns the one-line token it prints."""
    return cli(*_relay(), "site", "add", site, "--config", str(relay.config), *extra, procs=procs).stdout.strip()


def enroll(agent: AgentHandle, token: str, *extra: str,
           procs: ProcessTracker | None = None) -> subprocess.CompletedProcess[str]:
    """``tunnel-agent enroll`` with the token on standard input (never argv); returns the finished process."""
    return _run([*_agent(), "enroll", "--config", str(agent.config), *extra], procs, token + "\n", CLI_TIMEOUT)


def enroll_agent(relay: RelayHandle, agent: AgentHandle, *, procs: ProcessTracker | None = None) -> str:
    """The one-line join: ``site add`` on the relay, ``enroll`` on the agent. Returns the token used."""
    token = site_add(relay, agent.site, procs=procs)
    result = enroll(agent, token, procs=procs)
    if result.returncode != 0:
        raise CommandFailed(f"enroll failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return token


def start_relay(procs: ProcessTracker, relay: RelayHandle, *, args: Sequence[str] = (), name: str = "relay",
                timeout: float = START_TIMEOUT) -> ManagedProcess:
    """Start ``tunnel-relay serve`` (``args`` appended); return once its admin and DICOM ports accept."""
    relay.proc = procs.spawn([*_relay(), "serve", "--config", str(relay.config), *args], name=name)
    wait_for_port(LOOPBACK, relay.admin_port, timeout, proc=relay.proc)
    wait_for_port(LOOPBACK, relay.dicom_port, timeout, proc=relay.proc)
    return relay.proc


def start_agent(procs: ProcessTracker, agent: AgentHandle, relay: RelayHandle | None = None, *,
                wait_connected: bool = True, wait_listener: bool = False, args: Sequence[str] = (),
                name: str | None = None, timeout: float = START_TIMEOUT) -> ManagedProcess:
    """Start ``tunnel-agent run`` (``args`` appended); return once its status port accepts, and with
    ``wait_connected`` once it is connected (and ``relay``, if given, lists the site as connected); with
    ``wait_listener`` once its DICOM listener accepts too."""
    agent.proc = procs.spawn([*_agent(), "run", "--config", str(agent.config), *args],
                             name=name or f"agent-{agent.site}")
    watch = [agent.proc, relay.proc if relay is not None else None]
    wait_for_port(LOOPBACK, agent.status_port, timeout, proc=agent.proc)
    if wait_connected:
        wait_until(lambda: agent.state() == "connected", timeout, message=f"agent {agent.site} connected",
                   watch=watch)
        if relay is not None:
            wait_until(lambda: relay.site_connected(agent.site), timeout,
                       message=f"the relay to see site {agent.site} connected", watch=watch)
    if wait_listener:
        wait_for_port(LOOPBACK, agent.listener_port, timeout, proc=agent.proc)
    return agent.proc
