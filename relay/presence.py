"""This relay's place in the fleet: its row and its sites' presence in the registry, kept under a lease.

Theory of operation: :class:`PresenceKeeper` looks at the site table every ``TICK`` (memory only) and
announces the relay (``FleetRows.announce``: its state and the sites whose tunnels it holds now) when that
set changed, and otherwise every ``lease / 3`` so the lease never runs out while the relay lives. One
transaction per announcement, whatever the number of sites; nothing per heartbeat. When the registry
cannot be written the keeper says so once and tries again at the next tick: the other relays then see
this relay's rows age out, which is what a relay that cannot reach the registry should look like to
them. :meth:`PresenceKeeper.leave` (a clean stop) removes the relay's presence at once.

It also reads the others' presence back every ``REFRESH`` into the :class:`~relay.peering.FleetView`
the DICOM listeners carry callers by (one read, whatever the number of sites). While the registry cannot
be read the view keeps what it last saw: hops to a relay that left fail over to the next holder.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from relay.peering import FleetView
from relay.registry import RegistryError
from relay.registrygate import AsyncRegistry
from relay.sites import SiteTable

__all__ = ["REFRESH", "TICK", "PresenceKeeper"]

log = logging.getLogger("relay")

TICK = 0.1  # seconds between looks at the site table (memory only; a write only when it changed)
REFRESH = 1.0  # seconds between reads of the other relays' presence
LOOK_AGAIN = 0.25  # seconds between the reads callers for a site not seen anywhere ask for
LOOK_AGAIN_TIMEOUT = 1.0  # seconds such a caller waits for that read at most
READ_TIMEOUT = 2.0  # seconds one read of the others' presence may take before the view keeps what it has
LEAVE_TIMEOUT = 3.0  # seconds a stopping relay gives the registry to take its withdrawal


class PresenceKeeper:
    """Build with the registry's gateway, the site table and this relay's fleet name, zone and lease;
    ``await run()`` until cancelled, then ``await leave()``."""

    def __init__(self, registry: AsyncRegistry, sites: SiteTable, *, name: str, zone: str, lease: float,
                 address: str = "", tunnel_url: str = "", view: FleetView | None = None,
                 started: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.sites = sites
        self.name = name
        self.zone = zone
        self.lease = lease
        self.address = address
        self.tunnel_url = tunnel_url
        self.started = started
        self.view = view
        self._read_started_at = float("-inf")  # when the last read of the others' presence began
        self._reading: asyncio.Task[None] | None = None
        self.clock = clock
        self.state = "serving"
        self._announced: tuple[str, dict[str, tuple[str, ...]]] | None = None
        self._announced_at = float("-inf")
        self._failing = False

    async def run(self) -> None:
        while True:
            await self.tick()
            await self.refresh()
            await asyncio.sleep(TICK)

    async def look_again(self) -> None:
        """A caller's site is held nowhere this relay knows of: wait for a read of the fleet's presence that
        started after this call (its tunnel may have come up on another relay since the last one). Reads
        start at least ``LOOK_AGAIN`` apart and concurrent callers share them, so callers for an offline
        site cost at most four reads a second, whatever their number; none waits longer than
        ``LOOK_AGAIN_TIMEOUT``."""
        if self.view is None:
            return
        asked = self.clock()
        try:
            async with asyncio.timeout(LOOK_AGAIN_TIMEOUT):
                while self._read_started_at < asked:
                    if self._reading is None or self._reading.done():
                        delay = max(0.0, self._read_started_at + LOOK_AGAIN - self.clock())
                        self._reading = asyncio.create_task(self._read(delay))
                    await asyncio.shield(self._reading)
        except TimeoutError:
            pass

    def hint(self) -> None:
        """Another relay wrote its presence (a NOTIFY hint, ``relay.notify``): read the fleet's soon, at most
        one read per ``LOOK_AGAIN`` whatever the number of hints."""
        if self.view is None or (self._reading is not None and not self._reading.done()):
            return
        delay = max(0.0, self._read_started_at + LOOK_AGAIN - self.clock())
        self._reading = asyncio.create_task(self._read(delay))

    async def refresh(self) -> None:
        """Read which relays hold which sites' tunnels into the view, if ``REFRESH`` went by."""
        if self.view is not None and self.clock() - self._read_started_at >= REFRESH:
            await self._read(0.0)

    async def _read(self, delay: float) -> None:
        await asyncio.sleep(delay)
        started = self.clock()
        try:
            holders, relays = await self.registry.call(lambda r: (r.holders(started), r.fleet(started)),
                                                       timeout=READ_TIMEOUT)
        except RegistryError:
            await asyncio.sleep(LOOK_AGAIN)  # said by the announcement or the gateway; the view keeps what it had
            return
        assert self.view is not None
        self.view.update(holders, relays)
        self._read_started_at = max(self._read_started_at, started)

    async def tick(self) -> bool:
        """Announce if the sites or the state changed, or a third of the lease went by; True if written."""
        now = self.clock()
        current = (self.state, self.sites.online_agents())
        if current == self._announced and now - self._announced_at < self.lease / 3:
            return False
        state, held = current
        try:
            await self.registry.call(lambda r: r.announce(self.name, self.zone, state, held, now, self.lease,
                                                                self.address, self.tunnel_url, self.started))
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
