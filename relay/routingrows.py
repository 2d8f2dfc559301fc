"""The registry's routing rows: listener routes (called AE on a relay listener -> a site's route) and site
destinations (cloud SCPs a site may send to).

They come from two sources: the config file, whose rows are replaced at every start-up
(:meth:`RoutingRows.sync_config_routing`), and the admin API, whose rows persist and cannot shadow or
remove a config row. The relay builds its routing tables from these rows (``relay.sites``), and rebuilds
them when another process writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from relay.store import RegistryError, Store

__all__ = ["DestinationRecord", "RouteRecord", "RoutingRows"]


@dataclass(frozen=True, slots=True)
class RouteRecord:
    """A listener entry: called AE ``called_ae`` on ``listener`` leads to ``route`` at ``site``."""

    listener: str
    called_ae: str
    site: str
    route: str
    allowed: tuple[str, ...]
    source: str = "api"

    def as_dict(self) -> dict[str, object]:
        return {"listener": self.listener, "called_ae": self.called_ae, "site": self.site, "route": self.route,
                "allowed_calling_aes": list(self.allowed), "source": self.source}


@dataclass(frozen=True, slots=True)
class DestinationRecord:
    """A cloud SCP that ``site``'s agent may send to, by called AE."""

    site: str
    called_ae: str
    host: str
    port: int
    allowed: tuple[str, ...]
    source: str = "api"

    def as_dict(self) -> dict[str, object]:
        return {"site": self.site, "called_ae": self.called_ae, "host": self.host, "port": self.port,
                "allowed_calling_aes": list(self.allowed), "source": self.source}


class RoutingRows(Store):
    """Listener routes and site destinations (part of ``relay.registry.Registry``)."""

    def sync_config_routing(self, routes: Iterable[RouteRecord], destinations: Iterable[DestinationRecord],
                            now: float) -> None:
        """Make the 'config' rows equal to the config file's; an API row with the same key is replaced."""
        with self._tx():
            self._db.execute("DELETE FROM listener_routes WHERE source = 'config'")
            self._db.execute("DELETE FROM site_destinations WHERE source = 'config'")
            for r in routes:
                self._ensure_site_row(r.site, now)
                self._db.execute("INSERT INTO listener_routes VALUES (?,?,?,?,?, 'config') "
                                 "ON CONFLICT (listener, called_ae) DO UPDATE SET site = excluded.site, "
                                 "route = excluded.route, allowed_calling_aes = excluded.allowed_calling_aes, "
                                 "source = excluded.source",
                                 (r.listener, r.called_ae, r.site, r.route, json.dumps(sorted(r.allowed))))
            for d in destinations:
                self._ensure_site_row(d.site, now)
                self._db.execute("INSERT INTO site_destinations VALUES (?,?,?,?,?, 'config') "
                                 "ON CONFLICT (site, called_ae) DO UPDATE SET host = excluded.host, "
                                 "port = excluded.port, allowed_calling_aes = excluded.allowed_calling_aes, "
                                 "source = excluded.source",
                                 (d.site, d.called_ae, d.host, d.port, json.dumps(sorted(d.allowed))))

    def routes(self) -> list[RouteRecord]:
        rows = self._db.execute("SELECT listener, called_ae, site, route, allowed_calling_aes, source "
                                "FROM listener_routes ORDER BY listener, called_ae").fetchall()
        return [RouteRecord(li, ae, site, route, tuple(json.loads(allowed)), source)
                for li, ae, site, route, allowed, source in rows]

    def destinations(self) -> list[DestinationRecord]:
        rows = self._db.execute("SELECT site, called_ae, host, port, allowed_calling_aes, source "
                                "FROM site_destinations ORDER BY site, called_ae").fetchall()
        return [DestinationRecord(site, ae, host, port, tuple(json.loads(allowed)), source)
                for site, ae, host, port, allowed, source in rows]

    def add_route(self, r: RouteRecord, now: float, actor: str) -> None:
        with self._tx():
            self._require_live_site(r.site)
            if self._db.execute("SELECT 1 FROM listener_routes WHERE listener = ? AND called_ae = ?",
                                (r.listener, r.called_ae)).fetchone():
                raise RegistryError(f"listener {r.listener!r} already routes called AE {r.called_ae!r}")
            self._db.execute("INSERT INTO listener_routes VALUES (?,?,?,?,?, 'api')",
                             (r.listener, r.called_ae, r.site, r.route, json.dumps(sorted(r.allowed))))
            self._audit(now, actor, "route_added", r.site, {"listener": r.listener, "called_ae": r.called_ae,
                                                            "route": r.route, "allowed": sorted(r.allowed)})

    def remove_route(self, listener: str, called_ae: str, now: float, actor: str) -> str:
        with self._tx():
            row = self._db.execute("SELECT site, source FROM listener_routes WHERE listener = ? AND called_ae = ?",
                                   (listener, called_ae)).fetchone()
            if row is None:
                raise RegistryError(f"listener {listener!r} has no route for called AE {called_ae!r}")
            if row[1] == "config":
                raise RegistryError("that route is defined in the relay's config file; remove it there")
            self._db.execute("DELETE FROM listener_routes WHERE listener = ? AND called_ae = ?", (listener, called_ae))
            self._audit(now, actor, "route_removed", row[0], {"listener": listener, "called_ae": called_ae})
        return row[0]

    def add_destination(self, d: DestinationRecord, now: float, actor: str) -> None:
        with self._tx():
            self._require_live_site(d.site)
            if self._db.execute("SELECT 1 FROM site_destinations WHERE site = ? AND called_ae = ?",
                                (d.site, d.called_ae)).fetchone():
                raise RegistryError(f"site {d.site!r} already has a destination {d.called_ae!r}")
            self._db.execute("INSERT INTO site_destinations VALUES (?,?,?,?,?, 'api')",
                             (d.site, d.called_ae, d.host, d.port, json.dumps(sorted(d.allowed))))
            self._audit(now, actor, "destination_added", d.site, {"called_ae": d.called_ae, "host": d.host,
                                                                  "port": d.port, "allowed": sorted(d.allowed)})

    def remove_destination(self, site: str, called_ae: str, now: float, actor: str) -> None:
        with self._tx():
            row = self._db.execute("SELECT source FROM site_destinations WHERE site = ? AND called_ae = ?",
                                   (site, called_ae)).fetchone()
            if row is None:
                raise RegistryError(f"site {site!r} has no destination {called_ae!r}")
            if row[0] == "config":
                raise RegistryError("that destination is defined in the relay's config file; remove it there")
            self._db.execute("DELETE FROM site_destinations WHERE site = ? AND called_ae = ?", (site, called_ae))
            self._audit(now, actor, "destination_removed", site, {"called_ae": called_ae})

