"""Live tunnels follow the registry: a revoked site or certificate, or an expired one, loses its tunnel.

Theory of operation: the registry is the source of truth for who may connect, and any process may write
it (the admin API, the CLI on the same state directory). :class:`RevocationSweep` re-checks every live
tunnel against it and the clock once a second (``SWEEP_INTERVAL``), rebuilds the routing tables when
another process wrote, and keeps the WireGuard peers equal to the registry's. The admin API runs
:meth:`RevocationSweep.enforce` itself after a revocation, so the tunnel is gone when the command returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from relay.registry import RegistryUnavailable
from relay.registrygate import AsyncRegistry
from relay.sites import SiteTable, reload_routing
from tunnel_core.codes import ErrorCode
from tunnel_link.aio import wait_for_events
from tunnel_link.session import CLOSE_TIMEOUT, MuxSession

__all__ = ["SWEEP_INTERVAL", "PeerSync", "RevocationSweep"]

log = logging.getLogger("relay")

SWEEP_INTERVAL = 1.0  # seconds between re-checks of live tunnels against the registry and the clock
MIN_SWEEP_GAP = 0.05  # seconds a hint-woken sweep waits, so that the hints of one burst share it


class PeerSync(Protocol):
    """The WireGuard peers (``relay.wgtransport.RelayWireGuard``)."""

    async def sync(self) -> None:
        """Make the interface's peers equal to the registry's."""

    async def refresh(self) -> None:
        """Read the peers' handshakes and bytes for status and metrics."""


class RevocationSweep:
    """Build with the site table, the open registry and the WireGuard peers (None without ``[wireguard]``);
    ``await run()`` until cancelled."""

    def __init__(self, sites: SiteTable, registry: AsyncRegistry, wireguard: PeerSync | None = None) -> None:
        self.sites = sites
        self.registry = registry
        self.wireguard = wireguard
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Another relay changed the registry (a NOTIFY hint, ``relay.notify``): sweep now, not at the next tick."""
        self._wake.set()

    async def enforce(self, now: float | None = None, *, sync_wireguard: bool = True,
                      wait: bool = True) -> list[str]:
        """Close every live tunnel whose certificate is revoked, whose site is revoked, or that expired; and
        (``sync_wireguard``) bring the WireGuard peers in line with the registry first. Returns the sites
        closed.

        Closing sends GOAWAY ``REVOKED`` and never waits on the peer (``MuxSession.close_nowait``), so one
        stalled site cannot delay this for the others. Only WireGuard removals wait, all together and for
        at most ``CLOSE_TIMEOUT``, so that the GOAWAY leaves through the tunnel before its peer goes.
        With ``wait`` (the admin API: the tunnel is gone when the command returns) it then waits, again
        for all together and bounded, until the closed sessions have ended; the sweep does not wait."""
        now = time.time() if now is None else now
        closed = await self._close_removed_wireguard_peers(sync_wireguard)
        ending: list[MuxSession] = []
        live = {t.serial: (site, t) for site, t in self.sites.live_tunnels()
                if not t.session.closing and t.serial is not None}
        unavailable: RegistryUnavailable | None = None
        try:
            refused = await self.registry.call(lambda r: r.refused_among(live))
        except RegistryUnavailable as exc:  # expiry is the clock's to judge: it still closes tunnels
            refused, unavailable = {}, exc
        for serial, (site, tunnel) in live.items():
            if serial in refused:
                reason = f"certificate {serial} refused: {refused[serial].value}"
            elif tunnel.not_after is not None and now >= tunnel.not_after:
                reason = f"certificate {serial} expired"
            else:
                continue
            log.warning("tunnel=%s closing: %s", site.name, reason, extra={"tunnel": site.name, "reason": reason})
            tunnel.session.close_nowait(ErrorCode.REVOKED, reason)
            ending.append(tunnel.session)
            closed.append(site.name)
        if wait and ending:
            await wait_for_events([s.ended for s in ending], 2 * CLOSE_TIMEOUT)
        if unavailable is not None:
            raise unavailable
        return closed

    async def _close_removed_wireguard_peers(self, sync: bool) -> list[str]:
        """WireGuard tunnels of sites the registry no longer lists as peers, closed (awaited, bounded) before
        the peers are synced; returns their sites."""
        if self.wireguard is None:
            return []
        allowed = {site for site, _key, _address in await self.registry.call(lambda r: r.wg_peers())}
        closing = [(site, t) for site, t in self.sites.live_tunnels() if not t.session.closing
                   and t.transport == "wireguard" and site.name not in allowed]
        for site, _tunnel in closing:
            log.warning("tunnel=%s closing: WireGuard peer removed", site.name, extra={"tunnel": site.name})
        await asyncio.gather(*(t.session.close(ErrorCode.REVOKED, "WireGuard peer removed (site revoked)")
                               for _site, t in closing))
        if sync or closing:
            await self.wireguard.sync()
        return sorted({site.name for site, _tunnel in closing})

    async def run(self) -> None:
        outage = False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SWEEP_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(MIN_SWEEP_GAP)  # a burst of hints is one sweep
            try:
                changed = await reload_routing(self.sites, self.registry, only_if_changed=True)  # another wrote
                await self.enforce(sync_wireguard=changed, wait=False)
                if self.wireguard is not None:
                    await self.wireguard.refresh()
            except RegistryUnavailable as exc:  # tunnels stay as they are; said once per outage, not per sweep
                if not outage:
                    log.error("revocation sweep: %s; live tunnels and routing stay as they are", exc)
                outage = True
                continue
            except Exception:  # a broken registry must not kill the sweeper; say so and retry
                log.exception("revocation sweep failed")
            if outage:
                log.info("revocation sweep: the registry answers again")
            outage = False
