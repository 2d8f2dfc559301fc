"""The agent's tunnels to several relays of a fleet (``[fleet] tunnels``), replaced make-before-break.

Theory of operation. The *primary* tunnel goes to ``relay_url``, usually the fleet's load balancer, exactly
as with one tunnel. Every relay answers a tunnel upgrade with the fleet it belongs to (``Tunnel-Fleet``,
``tunnel_core.discovery``), itself first, so the agent learns which relay each tunnel reached and which
others it may dial. :class:`Fleet` keeps ``tunnels - 1`` *extra* tunnels to other serving relays, chosen
by ``choose_relays`` (other zones first), each a :class:`~tunnel_agent.tunnel.Tunnel` of its own (its
backoff, its reconnect loop) dialing the relay's ``url`` directly with the same certificate, pinned CA and
proxy rules, the relay's certificate checked against ``relay_url``'s host (a fleet's relays share one).

- A malformed or missing list changes nothing: the agent keeps the tunnels it has (with none known:
  the primary only). Every upgrade refreshes the list, and the tunnels are looked at again at once.
- A GOAWAY ``GOING_AWAY`` means the relay drains: that run of it (its name and ``since``) is avoided for
  ``AVOID_FOR`` seconds at most, and a replacement is opened at once, to another relay from the list,
  while the old tunnel finishes its streams until the relay closes it. For the primary that replacement
  is a *stand-in*, one extra tunnel more while the primary drains (or is down); the primary itself dials
  ``relay_url`` again once its connection has ended (dialing it sooner could reach the draining relay
  while a balancer still sends there, and a relay keeps one tunnel per agent name: the new one would
  replace the old one). Once the primary is back, the extra tunnel carrying the fewest streams is let go
  gently (our GOAWAY: it closes when its streams are done). A later list naming the drained relay with
  another ``since`` shows it restarted: it is a candidate again at once. The primary reaching a relay that
  lists itself serving ends the avoidance of that relay (a draining relay lists itself draining).
- The one other reason for that GOAWAY: the relay keeps one tunnel per agent name, and the primary,
  through the balancer, reached the relay an extra tunnel is on; the relay then sends the older one GOAWAY
  and closes it once idle. That relay serves: it is not avoided. The agent moves the extra tunnel to
  another relay as soon as the primary's upgrade says where it landed (the extra is told GOAWAY, takes no
  new stream and closes once its streams are done), whichever of the two it hears first.
- An extra tunnel whose relay left the list, stopped serving or is avoided is *retired*: it does not
  reconnect, and one still serving is closed; one where the primary landed is retired gently (above).
  There are never more than ``tunnels`` tunnels besides the draining ones, and at most ``MAX_RETIRED``
  of those.
- An extra tunnel whose relay is gone without a word (killed: no GOAWAY, still listed as serving) is
  *given up* once it has failed to connect ``GIVE_UP_AFTER`` times in a row, or for ``GIVE_UP_WITHIN``
  seconds, whichever comes first: that run of the relay is avoided for ``GIVE_UP_AVOID`` seconds and a
  replacement is chosen among the others at once. The primary is never given up (``relay_url`` is the
  balancer: its next attempt may reach another relay).
- While the agent holds fewer live, non-draining tunnels on distinct relays than it wants and knows a
  fleet, no upgrade may come to refresh its list (its tunnels stay up): ``tunnel_agent.fleetpoll`` then
  fetches the list through ``relay_url`` every ``FLEET_POLL`` seconds, and it is chosen from as an
  upgrade's list is.
- Streams the agent opens take the live, non-draining tunnel with the fewest streams (:meth:`pick`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit

from tunnel_agent.config import AgentSettings
from tunnel_agent.fleetpoll import FleetPoll
from tunnel_agent.status import TunnelStatus
from tunnel_agent.tunnel import PRIMARY, Tunnel
from tunnel_agent.wgtransport import WireGuardTransport
from tunnel_core.codes import ErrorCode
from tunnel_core.discovery import FLEET_HEADER, DiscoveryError, FleetEntry, choose_relays, parse_fleet
from tunnel_link.aio import cancel_and_wait
from tunnel_link.session import MuxSession, TunnelStream

__all__ = ["AVOID_FOR", "GIVE_UP_AFTER", "GIVE_UP_AVOID", "GIVE_UP_WITHIN", "Fleet"]

log = logging.getLogger("agent")

AVOID_FOR = 60.0  # seconds at most a relay's run that said it drains is not dialed again
RECONCILE_EVERY = 1.0  # seconds between looks at the tunnels when nothing else wakes the supervisor
GIVE_UP_AFTER = 3  # failed attempts in a row after which an extra tunnel's relay is taken for gone...
GIVE_UP_WITHIN = 5.0  # ...or seconds of failing, whichever comes first
GIVE_UP_AVOID = 30.0  # seconds a relay's run given up is not dialed again
MAX_RETIRED = 8  # retired extra tunnels still finishing; beyond it, the oldest is closed
SHOWN = 80  # characters of a malformed header a log line may repeat


class Fleet:
    """Build with the settings and what a tunnel needs; ``await run()`` until ``stopping`` (or cancelled),
    ``await close(reason)`` to end every tunnel. ``primary`` is the tunnel to ``relay_url``."""

    def __init__(self, settings: AgentSettings, *, on_stream: Callable[[TunnelStream], Awaitable[None]],
                 site_name: Callable[[], str], stopping: asyncio.Event,
                 wireguard: WireGuardTransport | None = None, rand: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.wanted = settings.fleet.tunnels
        self.entries: list[FleetEntry] = []  # the latest list a relay sent, its own entry first
        self.extras: dict[str, Tunnel] = {}  # by relay name: the extra tunnels kept up
        self.retired: list[Tunnel] = []  # extra tunnels that no longer reconnect, finishing their streams
        self._on_stream = on_stream
        self._site_name = site_name
        self._stopping = stopping
        self._rand = rand
        self._clock = clock
        self._avoid: dict[str, tuple[str, float]] = {}  # relay name -> (the run avoided, "" for any; until)
        self._changed = asyncio.Event()
        self._tasks: dict[Tunnel, asyncio.Task[None]] = {}
        self.primary = Tunnel(settings, on_stream=on_stream, site_name=site_name, stopping=stopping,
                              wireguard=wireguard, rand=rand, on_upgrade=self._heard, on_goaway=self._going_away)
        self.poll = FleetPoll(settings, short=self.short, heard=self._listed)

    # --- the agent's entry points ----------------------------------------------------------------------

    async def run(self) -> None:
        """The primary's loop and, with ``tunnels`` above 1, the supervisor of the extra tunnels."""
        if self.wanted == 1:
            await self.primary.run()
            return
        primary = asyncio.create_task(self.primary.run())
        poll = asyncio.create_task(self.poll.run())
        try:
            while not self._stopping.is_set():
                self._reconcile()
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=RECONCILE_EVERY)
                except TimeoutError:
                    pass
            await primary
        finally:
            for task in [primary, poll, *self._tasks.values()]:
                await cancel_and_wait(task)

    async def close(self, reason: str) -> None:
        """End every tunnel with GOAWAY ``GOING_AWAY``, each bounded by its session's close timeout."""
        tunnels = [self.primary, *self.extras.values(), *self.retired]
        for tunnel in tunnels[1:]:
            tunnel.stop()
        await asyncio.gather(*(t.close(reason) for t in tunnels))

    def tunnels(self) -> list[Tunnel]:
        """The primary, the extra tunnels, then the retired ones."""
        return [self.primary, *self.extras.values(), *self.retired]

    def pick(self) -> MuxSession | None:
        """The live, non-draining session with the fewest streams (the primary's on a tie), or None."""
        live = [s for s in (t.session for t in self.tunnels()) if s is not None and not s.draining]
        return min(live, key=lambda s: s.active_streams) if live else None

    def avoided(self) -> dict[str, str]:
        """The relays avoided now: name -> the run (``since``) avoided, "" when any run of it is."""
        now = self._clock()
        return {name: since for name, (since, until) in self._avoid.items() if until > now}

    def sessions(self) -> list[MuxSession]:
        """Every connection still up, draining ones included (health reports go to each)."""
        return [s for s in (t.session for t in self.tunnels()) if s is not None and not s.closing]

    @property
    def connected(self) -> int:
        """Tunnels up and taking new streams."""
        return sum(1 for t in self.tunnels() if t.session is not None and not t.session.draining)

    def short(self) -> bool:
        """A fleet is known and fewer live, non-draining tunnels on distinct relays than wanted are held."""
        relays = {t.relay or PRIMARY if t is self.primary else t.name
                  for t in [self.primary, *self.extras.values()] if _up(t)}
        return bool(self.entries) and len(relays) < self.wanted

    def status(self) -> tuple[TunnelStatus, ...]:
        return tuple(_status_row(tunnel) for tunnel in self.tunnels())

    # --- what the tunnels report -----------------------------------------------------------------------

    def _heard(self, tunnel: Tunnel, headers: Mapping[str, str]) -> None:
        """An upgrade answer: learn which relay ``tunnel`` reached and the fleet's list, if well-formed."""
        tunnel.relay, tunnel.relay_since = None, ""
        if (entries := _fleet_of(tunnel, headers, quiet=self.wanted == 1)) is None:
            return
        reached = entries[0]
        tunnel.relay, tunnel.relay_since = reached.name, reached.since
        if tunnel.name != PRIMARY and tunnel.relay != tunnel.name:
            log.warning("tunnel %s: the relay at %s says it is %s", tunnel.name, tunnel.target, tunnel.relay)
        if tunnel is self.primary and reached.serving and self._avoid.pop(reached.name, None) is not None:
            log.info("tunnel %s: reached relay %s, which serves; no longer avoiding it", tunnel.name, reached.name)
        self.entries = entries
        self._changed.set()  # the supervisor looks again at once, with this list

    def _listed(self, entries: list[FleetEntry]) -> None:
        """A list fetched on demand (``tunnel_agent.fleetpoll``): chosen from as an upgrade's list is."""
        self.entries = entries
        self._changed.set()

    def _going_away(self, tunnel: Tunnel, session: MuxSession) -> None:
        """``tunnel``'s relay sent GOAWAY ``GOING_AWAY``: it drains (avoid that run of it), or it took the
        primary instead (:func:`_beside`); either way the tunnel is replaced elsewhere."""
        if session.goaway_code is not ErrorCode.GOING_AWAY or self.wanted == 1:
            return
        name = tunnel.relay if tunnel.name == PRIMARY else tunnel.name
        if tunnel is not self.primary and _beside(self.primary, tunnel):
            log.info("tunnel %s: the relay took the primary tunnel instead; moving this one elsewhere", name)
        else:
            if name is not None:
                self._avoid[name] = (tunnel.relay_since, self._clock() + AVOID_FOR)
            log.info("tunnel %s: relay %s (run %s) is going away; avoiding it for %.0f s at most and opening a "
                     "replacement", tunnel.name, name or "(unknown)", tunnel.relay_since or "-", AVOID_FOR)
        if tunnel is not self.primary and self.extras.get(tunnel.name) is tunnel:
            self._retire(tunnel, close=False)
        self._changed.set()

    # --- keeping the extra tunnels -----------------------------------------------------------------------

    def _reconcile(self) -> None:
        """Give up the extras whose relay is gone, retire those that must go, open the missing ones."""
        for tunnel in [t for t in self.extras.values() if _gone(t, self._clock())]:
            self._give_up(tunnel)
        runs = self.avoided()
        self._avoid = {name: self._avoid[name] for name in runs}
        here = self.primary.relay
        allowed = {e.name for e in choose_relays(self.entries, len(self.entries), current=None, avoid=runs)}
        for name, tunnel in list(self.extras.items()):
            if self._tasks[tunnel].done():
                del self.extras[name]
            elif name == here:
                self._let_go(tunnel, "the primary tunnel reached this relay too; moving this one elsewhere")
            elif name not in allowed:
                log.info("tunnel %s: no longer a relay to hold a tunnel to; retiring it", name)
                self._retire(tunnel, close=name not in runs)
        for tunnel in [t for t in self.retired if self._tasks[t].done()]:
            self.retired.remove(tunnel)
        kept = {*self.extras.values(), *self.retired}
        for tunnel, task in list(self._tasks.items()):
            if task.done() and tunnel not in kept:
                del self._tasks[tunnel]
        wanted = self.wanted - (1 if _up(self.primary) else 0)  # a stand-in while the primary drains or is down
        if len(self.extras) > wanted:
            newest_first = reversed(self.extras.values())  # on a tie the newest goes: the stand-in
            self._let_go(min(newest_first, key=lambda t: t.session.active_streams if t.session else -1),
                         "one tunnel more than [fleet] tunnels")
        chosen = choose_relays(self.entries, wanted + 1, current=here, avoid=runs, keep=set(self.extras))
        for entry in [e for e in chosen if e.name != here][:wanted]:
            if entry.name not in self.extras and len(self.extras) < wanted:
                self._start(entry)

    def _give_up(self, tunnel: Tunnel) -> None:
        """``tunnel`` failed too often: avoid its relay's run (as the list names it) and forget the tunnel."""
        listed = next((e.since for e in self.entries if e.name == tunnel.name), tunnel.relay_since)
        self._avoid[tunnel.name] = (listed, self._clock() + GIVE_UP_AVOID)
        log.info("tunnel %s: %d attempts in a row failed; giving it up, avoiding that relay (run %s) for %.0f s "
                 "and opening a replacement", tunnel.name, tunnel.failures, listed or "-", GIVE_UP_AVOID)
        del self.extras[tunnel.name]
        self._tasks[tunnel].cancel()  # it has no connection; awaited by run() at its end, forgotten once done

    def _let_go(self, tunnel: Tunnel, why: str) -> None:
        """An extra tunnel to end gently (one too many, or on the primary's relay): closed once idle."""
        log.info("tunnel %s: %s; letting it go once idle", tunnel.name, why)
        self._retire(tunnel, close=False)
        if tunnel.session is not None:
            tunnel.session.go_away(ErrorCode.GOING_AWAY, why)

    def _start(self, entry: FleetEntry) -> None:
        tunnel = Tunnel(self.settings, on_stream=self._on_stream, site_name=self._site_name,
                        stopping=asyncio.Event(), rand=self._rand, url=entry.url,
                        server_hostname=self.settings.relay_host, name=entry.name,
                        on_upgrade=self._heard, on_goaway=self._going_away,
                        on_failed=lambda _tunnel: self._changed.set(), clock=self._clock)
        log.info("tunnel %s: opening an extra tunnel to %s (zone %s)", entry.name, entry.url, entry.zone or "-")
        self.extras[entry.name] = tunnel
        self._tasks[tunnel] = asyncio.create_task(tunnel.run())

    def _retire(self, tunnel: Tunnel, *, close: bool) -> None:
        """``tunnel`` no longer reconnects; with ``close`` a connection still serving is ended now."""
        self.extras.pop(tunnel.name, None)
        self.retired.append(tunnel)
        tunnel.stop()
        session = tunnel.session
        if close and session is not None and not session.draining:
            session.close_nowait(ErrorCode.GOING_AWAY, "this relay is no longer chosen")
        while len(self.retired) > MAX_RETIRED:
            oldest = self.retired.pop(0)
            if oldest.session is not None:
                oldest.session.close_nowait(ErrorCode.GOING_AWAY, "too many draining tunnels")
            self._tasks[oldest].cancel()  # awaited by run() at its end; forgotten by _reconcile once done


def _up(tunnel: Tunnel) -> bool:
    return tunnel.session is not None and not tunnel.session.draining


def _fleet_of(tunnel: Tunnel, headers: Mapping[str, str], *, quiet: bool) -> list[FleetEntry] | None:
    """The well-formed ``Tunnel-Fleet`` list of an upgrade's answer, or None (said in the log)."""
    value = headers.get(FLEET_HEADER)
    if value is None:
        if not quiet:
            log.info("tunnel %s: the relay sent no %s; keeping the tunnels there are", tunnel.name, FLEET_HEADER)
        return None
    try:
        return parse_fleet(value)
    except DiscoveryError as exc:
        shown = "".join(ch if " " <= ch <= "~" else "?" for ch in value[:SHOWN])
        log.warning("tunnel %s: ignored the relay's %s (%s): %r%s", tunnel.name, FLEET_HEADER, exc, shown,
                    "..." if len(value) > SHOWN else "")
        return None


def _gone(extra: Tunnel, now: float) -> bool:
    """``extra`` has no connection and failed ``GIVE_UP_AFTER`` attempts in a row, or for ``GIVE_UP_WITHIN``
    seconds (not counting a refusal: that is the registry's answer, the same on every relay)."""
    failing = extra.session is None and extra.down_since is not None
    return failing and (extra.failures >= GIVE_UP_AFTER or now - (extra.down_since or now) > GIVE_UP_WITHIN)


def _status_row(tunnel: Tunnel) -> TunnelStatus:
    host = urlsplit(tunnel.target).hostname or ""
    reached = tunnel.relay if tunnel.name == PRIMARY else None
    session = tunnel.session
    state = "draining" if session is not None and session.draining else tunnel.state.value
    return TunnelStatus(tunnel.name, reached, host, state, tunnel.connects, tunnel.last_error,
                        session.active_streams if session else 0, session.connected_at if session else None)


def _beside(primary: Tunnel, extra: Tunnel) -> bool:
    """``primary`` is up, not draining, on the relay ``extra`` is on: a GOAWAY to ``extra`` is the relay
    replacing our older tunnel there (were the relay draining, the primary would hear it too, and avoid it)."""
    session = primary.session
    return session is not None and not session.draining and primary.relay == extra.name
