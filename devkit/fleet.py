"""A fleet of relay processes for tests, the demo and the benchmark: one PostgreSQL registry, one CA.

:func:`make_fleet` writes each relay's configuration (``registry_url`` with the password in a 0600 file,
``[fleet]`` name, zone and the ``address`` its peers carry callers to) and gives every relay the first
one's CA and server certificate, as an operator deploys a fleet from one secret. Nothing is started:
``devkit.stack.start_relay`` does that, so the caller's ``ProcessTracker`` owns every process.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from devkit.postgres import PostgresServer
from devkit.procs import ProcessTracker
from devkit.stack import ListenerRoute, RelayHandle, SiteDest, make_relay

__all__ = ["SHARED_PKI", "haproxy_config", "make_fleet"]

SHARED_PKI = ("ca.crt", "ca.key", "relay.crt", "relay.key")  # what the relays of one fleet share


def make_fleet(root: Path, server: PostgresServer, names: Sequence[str], *,
               listener_routes: Sequence[ListenerRoute], sites: dict[str, list[SiteDest]], heartbeat: float = 1.0,
               fleet: Sequence[str] = (), tunnel: Sequence[str] = (), peers: bool = True,
               procs: ProcessTracker | None = None) -> dict[str, RelayHandle]:
    """Relays named ``names`` (fleet names ``relay-<name>``, zones ``zone-<name>``) under ``root``; with
    ``peers`` each announces its tunnel port as its ``[fleet] address`` and its own tunnel URL as its
    ``tunnel_url`` (agents then learn the fleet). ``fleet``, ``tunnel``: more ``[fleet]``, ``[tunnel]`` lines."""
    secret = root / "registry-password"
    root.mkdir(parents=True, exist_ok=True)
    secret.write_text(server.password + "\n")
    secret.chmod(0o600)
    extra = [f'registry_url = "{server.url}"', f'registry_password_file = "{secret}"']
    relays: dict[str, RelayHandle] = {}
    for name in names:
        lines = ["[fleet]", f'name = "relay-{name}"', f'zone = "zone-{name}"', *fleet]
        relay = make_relay(root / f"relay-{name}", listener_routes=listener_routes, sites=sites, heartbeat=heartbeat,
                           extra=extra, sections=lines, tunnel=tunnel, procs=procs)
        if peers:  # appended to the [fleet] table, the file's last
            with relay.config.open("a") as config:
                config.write(f'address = "{relay.host}:{relay.tunnel_port}"\ntunnel_url = "{relay.url}"\n')
        relays[name] = relay
    first = next(iter(relays.values()))
    for relay in relays.values():
        if relay is not first:
            for file in SHARED_PKI:
                shutil.copy2(first.state_dir / file, relay.state_dir / file)
    return relays


def haproxy_config(tunnel_port: int, dicom_port: int, relays: Sequence[RelayHandle]) -> str:
    """An L4 balancer in front of ``relays`` on 127.0.0.1, shaped as deploy/compose/haproxy.cfg is
    (least connections, a failed connect redispatched, ``/readyz`` checked every second here to keep
    tests short): ``tunnel_port`` for agents, ``dicom_port`` for cloud callers."""
    lines = ["global", "    maxconn 4000", "defaults", "    mode tcp", "    balance leastconn", "    retries 3",
             "    option redispatch", "    timeout connect 2s", "    timeout client 1h", "    timeout server 1h",
             "    timeout check 2s", "    default-server check inter 1s fall 2 rise 2"]
    for kind, port in (("tunnel", tunnel_port), ("dicom", dicom_port)):
        lines += [f"frontend {kind}", f"    bind 127.0.0.1:{port}", f"    default_backend relays-{kind}",
                  f"backend relays-{kind}", "    option httpchk",
                  "    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost",
                  "    http-check expect status 200"]
        for index, relay in enumerate(relays):
            target = relay.tunnel_port if kind == "tunnel" else relay.dicom_port
            lines.append(f"    server relay-{index} 127.0.0.1:{target} check port {relay.admin_port}")
    return "\n".join(lines) + "\n"
