"""A relay's drain: how it leaves the fleet gently, within ``[fleet] drain_deadline``.

In order: readiness fails (a balancer stops sending it callers and agents); the fleet's presence says
"draining" (the other relays stop carrying callers here, and the relay lists itself draining to agents);
the DICOM listeners stop taking callers; every agent tunnel and every peer relay's link hears GOAWAY
``GOING_AWAY`` (agents open a tunnel elsewhere before this one closes — make-before-break — and peers
carry nothing new here); then the cloud associations in flight, the relay's own callers' and those peers
carried here, get until the deadline to finish (a second stop request ends the wait). What is left then
ends with the tunnels as the relay stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.peering import FleetView, PeerEndpoint
from relay.presence import PresenceKeeper
from relay.sites import SiteTable
from relay.status import StatusSource
from tunnel_core.codes import ErrorCode
from tunnel_link.pipe import PipeServer

__all__ = ["DRAIN_POLL", "Drain"]

log = logging.getLogger("relay")

DRAIN_POLL = 0.1  # seconds between looks at the associations still in flight


class Accepting(Protocol):
    """The tunnel endpoints (``relay.tunnel``): while draining, an agent that connects is sent away at once."""

    draining: bool


@dataclass(frozen=True, slots=True)
class Drain:
    """The started relay's parts a drain acts on; ``await run()`` once."""

    status: StatusSource
    view: FleetView
    presence: PresenceKeeper
    listeners: Sequence[PipeServer]
    tunnels: Accepting
    peers: PeerEndpoint
    table: SiteTable
    deadline: float
    hurry: asyncio.Event

    def in_flight(self) -> int:
        return sum(server.active for server in self.listeners) + self.peers.active

    async def run(self) -> None:
        if self.status.draining:
            return
        self.status.draining = True
        self.view.set_draining()
        self.presence.state = "draining"
        await self.presence.tick()
        for server in self.listeners:
            server.stop_accepting()
        self.tunnels.draining = True
        self.peers.go_away_all()
        for _site, tunnel in self.table.live_tunnels():
            tunnel.session.go_away(ErrorCode.GOING_AWAY, "relay draining")
        log.info("relay draining: %d cloud associations in flight, %.0f s for them to finish",
                 self.in_flight(), self.deadline)
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.deadline):
                while self.in_flight() and not self.hurry.is_set():
                    await asyncio.sleep(DRAIN_POLL)
        left = self.in_flight()
        log.info("relay drained in %.1f s; %s", time.monotonic() - started,
                 f"{left} cloud associations left, ended now" if left else "no cloud association left")
