"""The registry's fleet rows: the relays that share it, and which of them holds each site's tunnel.

Every relay keeps one ``relays`` row (name, zone, state, a lease) and one ``presence`` row per site whose
tunnel it holds, each with the same lease. :meth:`FleetRows.announce` writes them all in one short
transaction, every few seconds and when its set of sites changed: never one write per heartbeat, and
however many sites a relay holds. A relay that stops cleanly says so (:meth:`FleetRows.leave`); one that
dies is "gone" once its lease has run out, and its presence rows count for nothing from then on, so the
table needs no cleaner. These writes are not registry *changes*: they take no write lock and do not move
the version the relays reload their routing on (``relay.engines``), and they leave no audit row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from relay.store import Store

__all__ = ["RELAY_STATES", "FleetRows", "Holder", "RelayRecord"]

RELAY_STATES = ("serving", "draining", "gone")


@dataclass(frozen=True, slots=True)
class Holder:
    """A relay whose lease on a site's tunnel is live, and where the fleet reaches it for a hop."""

    relay: str
    zone: str
    state: str  # serving or draining
    address: str  # host:port of its tunnel port for peers; empty: it takes no hops


@dataclass(frozen=True, slots=True)
class RelayRecord:
    """A relay of the fleet as the registry has it; ``state`` is "gone" once its lease ran out."""

    name: str
    zone: str
    state: str
    started_at: float
    lease_until: float
    sites: int  # sites whose tunnel it holds (0 when gone)
    address: str = ""
    tunnel_url: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "zone": self.zone, "state": self.state, "address": self.address,
                "tunnel_url": self.tunnel_url, "started_at": self.started_at, "lease_until": self.lease_until,
                "sites": self.sites}


class FleetRows(Store):
    """Relays and presence (part of ``relay.registry.Registry``)."""

    def announce(self, relay: str, zone: str, state: str, sites: Iterable[str] | Mapping[str, Sequence[str]],
                 now: float, lease: float, address: str = "", tunnel_url: str = "",
                 started_at: float | None = None) -> None:
        """This relay is ``state`` and holds the tunnels of exactly ``sites`` (each with the names of the
        agents whose tunnels they are, when a mapping), until ``now + lease``; peers reach it at
        ``address``, agents at ``tunnel_url``. ``started_at``: when this run of the relay began (it tells
        agents a restarted relay from the one that drained); None: kept from the row unless the relay was
        gone, else ``now``."""
        if state not in RELAY_STATES[:2]:
            raise ValueError(f"a relay announces itself serving or draining, not {state!r}")
        agents = {site: ",".join(sorted(names)) for site, names in sites.items()} \
            if isinstance(sites, Mapping) else {site: "" for site in sites}
        held, until = set(agents), now + lease
        with self._tx(change=False):
            self._db.execute(
                "INSERT INTO relays(name, zone, state, started_at, lease_until, address, tunnel_url) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT (name) DO UPDATE SET zone = excluded.zone, "
                "state = excluded.state, lease_until = excluded.lease_until, address = excluded.address, "
                "tunnel_url = excluded.tunnel_url, started_at = CASE "
                "WHEN ? OR relays.state = 'gone' OR relays.lease_until < ? THEN excluded.started_at "
                "ELSE relays.started_at END",
                (relay, zone, state, now if started_at is None else started_at, until, address, tunnel_url,
                 started_at is not None, now))
            listed = {row[0] for row in self._db.execute("SELECT site FROM presence WHERE relay = ?", (relay,))}
            for site in listed - held:
                self._db.execute("DELETE FROM presence WHERE relay = ? AND site = ?", (relay, site))
            for site in held - listed:
                self._db.execute("INSERT INTO presence(site, relay, since, lease_until, agents) VALUES (?,?,?,?,?)",
                                 (site, relay, now, until, agents[site]))
            self._db.execute("UPDATE presence SET lease_until = ? WHERE relay = ?", (until, relay))
            for site in held & listed:
                self._db.execute("UPDATE presence SET agents = ? WHERE relay = ? AND site = ? AND agents <> ?",
                                 (agents[site], relay, site, agents[site]))

    def leave(self, relay: str) -> None:
        """This relay stops: it holds nothing and is gone at once (not after its lease)."""
        with self._tx(change=False):
            self._db.execute("DELETE FROM presence WHERE relay = ?", (relay,))
            self._db.execute("UPDATE relays SET state = 'gone' WHERE name = ?", (relay,))

    def fleet(self, now: float) -> list[RelayRecord]:
        rows = self._db.execute(
            "SELECT r.name, r.zone, r.state, r.started_at, r.lease_until, "
            "(SELECT COUNT(*) FROM presence p WHERE p.relay = r.name AND p.lease_until > ?), r.address, "
            "r.tunnel_url FROM relays r ORDER BY r.name", (now,)).fetchall()
        return [RelayRecord(name, zone, "gone" if until <= now else state, started, until,
                            0 if until <= now else count, address, tunnel_url)
                for name, zone, state, started, until, count, address, tunnel_url in rows]

    def presence(self, now: float) -> dict[str, list[str]]:
        """Site -> the relays whose lease on its tunnel is live, by name."""
        holders: dict[str, list[str]] = {}
        for site, relay in self._db.execute(
                "SELECT p.site, p.relay FROM presence p JOIN relays r ON r.name = p.relay "
                "WHERE p.lease_until > ? AND r.state <> 'gone' ORDER BY p.site, p.relay", (now,)):
            holders.setdefault(site, []).append(relay)
        return holders

    def paths(self, now: float) -> dict[str, list[tuple[str, list[str]]]]:
        """Site -> (relay, the agents whose tunnels it holds) for every live lease: the site's paths."""
        paths: dict[str, list[tuple[str, list[str]]]] = {}
        for site, relay, agents in self._db.execute(
                "SELECT p.site, p.relay, p.agents FROM presence p JOIN relays r ON r.name = p.relay "
                "WHERE p.lease_until > ? AND r.state <> 'gone' ORDER BY p.site, p.relay", (now,)):
            paths.setdefault(site, []).append((relay, [a for a in agents.split(",") if a]))
        return paths

    def holders(self, now: float) -> dict[str, list[Holder]]:
        """Site -> the live relays holding its tunnel, serving ones first, with their peer addresses."""
        holders: dict[str, list[Holder]] = {}
        for site, relay, zone, state, address in self._db.execute(
                "SELECT p.site, p.relay, r.zone, r.state, r.address FROM presence p "
                "JOIN relays r ON r.name = p.relay WHERE p.lease_until > ? AND r.lease_until > ? "
                "AND r.state <> 'gone' ORDER BY p.site, r.state DESC, p.relay", (now, now)):
            holders.setdefault(site, []).append(Holder(relay, zone, state, address))
        return holders
