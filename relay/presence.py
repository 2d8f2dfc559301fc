"""This relay's place in the fleet: its row and its sites' presence in the registry, kept under a lease.

Theory of operation: :class:`PresenceKeeper` looks at the site table every ``TICK`` (memory only) and
announces the relay (``FleetRows.announce``: its state and the sites whose tunnels it holds now) when that
set changed, and otherwise every ``lease / 3`` so the lease never runs out while the relay lives. One
transaction per announcement, whatever the number of sites; nothing per heartbeat. When the registry
cannot be written the keeper says so once and tries again at the next tick: the other relays then see
this relay's rows age out, which is what a relay that cannot reach the registry should look like to
them. :meth:`PresenceKeeper.leave` (a clean stop) removes the relay's presence at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from relay.registry import RegistryError
from relay.registrygate import AsyncRegistry
from relay.sites import SiteTable

__all__ = ["TICK", "PresenceKeeper"]

log = logging.getLogger("relay")

TICK = 0.5  # seconds between looks at the site table
LEAVE_TIMEOUT = 3.0  # seconds a stopping relay gives the registry to take its withdrawal


class PresenceKeeper:
    """Build with the registry's gateway, the site table and this relay's fleet name, zone and lease;
    ``await run()`` until cancelled, then ``await leave()``."""

    def __init__(self, registry: AsyncRegistry, sites: SiteTable, *, name: str, zone: str, lease: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.sites = sites
        self.name = name
        self.zone = zone
        self.lease = lease
        self.clock = clock
        self.state = "serving"
        self._announced: tuple[str, frozenset[str]] | None = None
        self._announced_at = float("-inf")
        self._failing = False

    async def run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(TICK)

    async def tick(self) -> bool:
        """Announce if the sites or the state changed, or a third of the lease went by; True if written."""
        now = self.clock()
        current = (self.state, frozenset(self.sites.online()))
        if current == self._announced and now - self._announced_at < self.lease / 3:
            return False
        state, held = current
        try:
            await self.registry.call(lambda r: r.announce(self.name, self.zone, state, held, now, self.lease))
        except RegistryError as exc:
            if not self._failing:
                log.error("fleet presence not written (other relays will see this one's lease run out): %s", exc)
            self._failing = True
            return False
        if self._failing:
            log.info("fleet presence written again")
        self._failing = False
        self._announced, self._announced_at = current, now
        return True

    async def leave(self) -> None:
        try:
            await self.registry.call(lambda r: r.leave(self.name), timeout=LEAVE_TIMEOUT)
        except RegistryError as exc:
            log.warning("fleet presence not withdrawn (it runs out with its lease): %s", exc)
