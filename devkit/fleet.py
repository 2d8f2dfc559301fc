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

__all__ = ["SHARED_PKI", "make_fleet"]

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
