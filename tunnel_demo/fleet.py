"""The demo's fleet step: two relays on one PostgreSQL registry, a site whose tunnel one of them holds.

What it shows, briefly: a real PostgreSQL (``devkit.postgres``) as the registry both relays share; the
site joined and its C-ECHO carried through relay b; the same C-ECHO sent to relay a, which has no tunnel
to the site, carried one hop to relay b (its round trip beside the direct one); ``tunnel-relay fleet`` on
relay a listing both relays and which holds the site's tunnel; a revocation written through relay a
closing the tunnel on relay b; and relay b drained by SIGTERM, then listed as gone. Its own site, relays
and agent: the other steps' relay and agent are not touched. Every process is the demo's
``ProcessTracker``'s, ended by PID.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devkit.fleet import make_fleet
from devkit.postgres import postgres_server
from devkit.procs import ProcessTracker
from devkit.programs import program
from devkit.stack import (
    AgentRoute,
    ListenerRoute,
    RelayHandle,
    enroll_agent,
    make_agent,
    start_agent,
    start_relay,
)
from devkit.waits import wait_until

__all__ = ["FLEET_CALLED_AE", "FLEET_SITE", "FleetStep"]

FLEET_SITE = "hospital-c"
FLEET_CALLED_AE = "HOSP_C_PACS"
REVOKE_BOUND_S = 5.0  # the fleet's promise: a revocation counts on every relay within this
TIMEOUT_S = 30.0


@dataclass
class FleetStep:
    """Run with :meth:`run` inside the demo's step; ``stack`` owns the PostgreSQL server's clean-up."""

    procs: ProcessTracker
    stack: contextlib.ExitStack
    root: Path
    pacs_port: int
    pacs_ae: str
    cloud_ae: str
    echo: Callable[[int, str], float]  # (relay DICOM port, called AE) -> C-ECHO round trip, or raises
    say: Callable[[str], None]

    def run(self) -> str:
        relay_a, relay_b = self._relays()
        agent = make_agent(relay_b, FLEET_SITE, self.root / "agent",
                           routes=[AgentRoute("pacs", self.pacs_port, self.pacs_ae)], enrolled=True, heartbeat=1.0,
                           sections=["[fleet]", "tunnels = 1"], procs=self.procs)  # relay b's alone
        enroll_agent(relay_b, agent, procs=self.procs)
        start_agent(self.procs, agent, relay_b, name="fleet-agent", timeout=TIMEOUT_S)
        round_trip = self.echo(relay_b.dicom_port, FLEET_CALLED_AE)
        self.say(f"site {FLEET_SITE} joined through relay-b; C-ECHO through it: round trip {round_trip * 1000:.1f} ms")
        wait_until(lambda: relay_a.admin("GET", "/api/fleet")["presence"].get(FLEET_SITE) == ["relay-b"],
                   TIMEOUT_S, message="relay a to see relay b holding the site's tunnel")
        hop = self.echo(relay_a.dicom_port, FLEET_CALLED_AE)
        self.say(f"the same C-ECHO sent to relay-a, which has no tunnel to the site: carried one hop to relay-b, "
                 f"round trip {hop * 1000:.1f} ms (direct to relay-b: {round_trip * 1000:.1f} ms)")
        self._fleet_listing(relay_a)

        revoked = time.monotonic()
        relay_a.admin("POST", f"/api/sites/{FLEET_SITE}/revoke", {"reason": "demo"})
        wait_until(lambda: not relay_b.site_connected(FLEET_SITE), REVOKE_BOUND_S,
                   message="relay b to close the tunnel of a site revoked through relay a")
        closed_after = time.monotonic() - revoked
        self.say(f"revoked through relay-a: relay-b closed the site's tunnel {closed_after:.1f} s later")

        assert relay_b.proc is not None
        relay_b.proc.kill(signal.SIGTERM)  # a drain: readiness fails, listeners close, then it exits
        relay_b.proc.wait(TIMEOUT_S)
        states = {r["name"]: r["state"] for r in relay_a.admin("GET", "/api/fleet")["relays"]}
        self.say(f"relay-b drained on SIGTERM and exited; relay-a now lists it as {states.get('relay-b')!r}")
        return (f"2 relays on one PostgreSQL; a caller carried one hop; revocation across them in "
                f"{closed_after:.1f} s; drain")

    def _relays(self) -> tuple[RelayHandle, RelayHandle]:
        server = self.stack.enter_context(postgres_server(self.procs, self.root))
        routes = [ListenerRoute(FLEET_CALLED_AE, FLEET_SITE, "pacs", [self.cloud_ae])]
        relays = make_fleet(self.root, server, ("a", "b"), listener_routes=routes, sites={FLEET_SITE: []},
                            fleet=["drain_deadline = 5"], procs=self.procs)
        for name, relay in relays.items():
            start_relay(self.procs, relay, name=f"fleet-relay-{name}", timeout=TIMEOUT_S)
        self.say(f"PostgreSQL {server.url} (password from a 0600 file) is the registry of relay-a and relay-b")
        return relays["a"], relays["b"]

    def _fleet_listing(self, relay: RelayHandle) -> None:
        argv = [*program("tunnel-relay", "relay.cli"), "fleet", "--config", str(relay.config)]
        done = self.procs.run(argv, name="tunnel-relay fleet", timeout=TIMEOUT_S)
        self.say("$ tunnel-relay fleet   (on relay-a)")
        for line in done.stdout.rstrip().splitlines():
            self.say("  " + line)
