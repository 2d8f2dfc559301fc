"""Several agents per site (issue 13, item 4): relay.sites keeps one tunnel per agent, a new connection from
the same agent replaces only its own, and a new association takes the usable tunnel with the fewest streams
in flight, skipping an agent whose C-ECHO to that route is failing while another's is not.

The sessions here are stand-ins with the two attributes the choice reads (``draining``, ``active_streams``)
and the ones status reads: the choice is a pure function of them, and the real sessions behind it are
exercised end to end in tests/test_site_agents_e2e.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.identity import Identity
from relay.sites import SiteState
from tunnel_core.health import (
    CertificateReport,
    DestinationReport,
    HealthReport,
    HostReport,
    TunnelReport,
    parse_report,
)


@dataclass
class StandIn:
    active_streams: int = 0
    draining: bool = False
    connected_at: float = 0.0
    close_reason: str = ""


def _report(route: str, ok: bool | None) -> bytes:
    return HealthReport(version="1", sent_at=1.0, report_interval=30.0,
                        destinations=(DestinationReport(route=route, ok=ok),), host=HostReport(),
                        tunnel=TunnelReport(), certificate=CertificateReport()).encode()


def _site(*sessions: StandIn) -> SiteState:
    site = SiteState("st-marys")
    for i, session in enumerate(sessions):
        site.connected(session, Identity("st-marys", f"serial-{i}", None), f"peer-{i}", "websocket",  # type: ignore[arg-type]
                       f"gw-{i}")
    return site


def test_each_agent_keeps_its_own_tunnel_and_replaces_only_its_own() -> None:
    first, second, again = StandIn(), StandIn(), StandIn()
    site = _site(first, second)
    assert [t.agent for t in site.tunnels.values()] == ["gw-0", "gw-1"]
    replaced = site.connected(again, Identity("st-marys", "serial-9", None), "peer-9", "websocket", "gw-0")  # type: ignore[arg-type]
    assert replaced is first
    assert [t.session for t in site.tunnels.values()] == [second, again]
    site.disconnected(first, 5.0)  # the replaced one ending later takes nothing with it
    assert len(site.tunnels) == 2 and site.online
    site.disconnected(second, 6.0)
    assert [t.agent for t in site.tunnels.values()] == ["gw-0"] and site.serial == "serial-9"


def test_a_new_association_takes_the_tunnel_with_the_fewest_streams() -> None:
    busy, idle = StandIn(active_streams=3), StandIn(active_streams=1)
    site = _site(busy, idle)
    assert site.pick("pacs") is idle
    idle.active_streams = 5
    assert site.pick("pacs") is busy


def test_a_draining_tunnel_takes_no_new_association() -> None:
    draining, other = StandIn(active_streams=0, draining=True), StandIn(active_streams=9)
    site = _site(draining, other)
    assert site.pick("pacs") is other
    other.draining = True
    assert site.pick("pacs") is None and not site.online


def test_an_agent_whose_echo_to_the_route_fails_is_skipped_while_another_is_fine() -> None:
    failing, fine = StandIn(active_streams=0), StandIn(active_streams=4)
    site = _site(failing, fine)
    site.take_report(failing, _report("pacs", False), 10.0, 10.0)  # type: ignore[arg-type]
    site.take_report(fine, _report("pacs", True), 10.0, 10.0)  # type: ignore[arg-type]
    assert site.pick("pacs") is fine
    assert site.pick("other-route") is failing  # only that route's C-ECHO counts
    site.take_report(fine, _report("pacs", False), 11.0, 11.0)  # type: ignore[arg-type]
    assert site.pick("pacs") is failing  # every agent failing: the fewest streams, as if none were
    site.take_report(failing, _report("pacs", None), 12.0, 12.0)  # type: ignore[arg-type]
    assert site.pick("pacs") is failing  # not checked yet is not failing


def test_the_site_shows_the_newest_report_among_its_agents() -> None:
    a, b = StandIn(), StandIn()
    site = _site(a, b)
    site.take_report(b, _report("pacs", True), 20.0, 20.0)  # type: ignore[arg-type]
    site.take_report(a, _report("pacs", False), 30.0, 30.0)  # type: ignore[arg-type]
    assert site.report == parse_report(_report("pacs", False)) and site.report_at == 30.0
    site.take_report(a, b"not json", 31.0, 31.0)  # type: ignore[arg-type]
    assert site.reports_ignored == 1 and site.report_at == 30.0
