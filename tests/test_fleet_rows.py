"""The registry's fleet rows on both engines: relays, presence leases, leaving, and that presence writes are
not registry changes (no routing reload for every relay every few seconds). Time is a parameter."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.engines import PostgresTarget
from relay.registry import Registry

LEASE = 15.0


@pytest.fixture(params=["sqlite", "postgresql"])
def two(request: pytest.FixtureRequest, tmp_path: Path):
    """Two connections to one registry, as two relays (or a relay and the CLI) hold them."""
    if request.param == "sqlite":
        first, second = Registry.open(tmp_path), Registry.open(tmp_path)
    else:
        server = request.getfixturevalue("postgres")
        target = PostgresTarget.from_url(server.url, server.password)
        first, second = Registry.connect(target), Registry.connect(target)
    yield first, second
    first.close()
    second.close()


def test_relays_and_the_sites_they_hold(two) -> None:
    a, b = two
    a.announce("relay-a", "zone-1", "serving", ["st-marys", "general"], 100.0, LEASE)
    b.announce("relay-b", "zone-2", "serving", ["st-marys"], 101.0, LEASE)
    assert a.presence(102.0) == {"general": ["relay-a"], "st-marys": ["relay-a", "relay-b"]}
    fleet = {r.name: r for r in b.fleet(102.0)}
    assert (fleet["relay-a"].zone, fleet["relay-a"].state, fleet["relay-a"].sites) == ("zone-1", "serving", 2)
    assert fleet["relay-b"].sites == 1
    # The next announcement is the whole truth: a site no longer held leaves, a new one comes.
    a.announce("relay-a", "zone-1", "draining", ["north"], 105.0, LEASE)
    assert b.presence(106.0) == {"north": ["relay-a"], "st-marys": ["relay-b"]}
    assert {r.name: r.state for r in b.fleet(106.0)}["relay-a"] == "draining"


def test_a_relay_that_stops_renewing_is_gone_after_its_lease(two) -> None:
    a, b = two
    a.announce("relay-a", "", "serving", ["st-marys"], 100.0, LEASE)
    b.announce("relay-b", "", "serving", ["st-marys"], 100.0, LEASE)
    b.announce("relay-b", "", "serving", ["st-marys"], 110.0, LEASE)  # relay-a died at 100
    assert a.presence(114.0)["st-marys"] == ["relay-a", "relay-b"]
    assert a.presence(116.0)["st-marys"] == ["relay-b"]
    gone = {r.name: r for r in a.fleet(116.0)}["relay-a"]
    assert (gone.state, gone.sites) == ("gone", 0)
    a.announce("relay-a", "", "serving", [], 200.0, LEASE)  # back: a new start
    assert {r.name: r for r in a.fleet(201.0)}["relay-a"].started_at == 200.0


def test_leaving_withdraws_at_once(two) -> None:
    a, b = two
    a.announce("relay-a", "", "serving", ["st-marys"], 100.0, LEASE)
    a.leave("relay-a")
    assert b.presence(101.0) == {}
    assert {r.name: r.state for r in b.fleet(101.0)} == {"relay-a": "gone"}


def test_presence_writes_are_not_registry_changes(two) -> None:
    a, b = two
    before = b.data_version()
    for second in range(5):
        a.announce("relay-a", "", "serving", ["st-marys"], 100.0 + second, LEASE)
    if b.kind == "postgresql":  # SQLite counts every commit of another connection; one relay per file there
        assert b.data_version() == before
    a.add_site("st-marys", 106.0, actor="t")
    assert b.data_version() != before


def test_holders_name_where_peers_reach_each_relay_serving_ones_first(two) -> None:
    a, b = two
    a.announce("relay-a", "zone-1", "draining", ["st-marys"], 100.0, LEASE, "10.0.0.1:8443")
    b.announce("relay-b", "zone-2", "serving", ["st-marys", "north"], 100.0, LEASE, "10.0.0.2:8443")
    holders = a.holders(101.0)
    assert [(h.relay, h.state, h.address) for h in holders["st-marys"]] == [
        ("relay-b", "serving", "10.0.0.2:8443"), ("relay-a", "draining", "10.0.0.1:8443")]
    assert [h.relay for h in holders["north"]] == ["relay-b"]
    assert {r.name: r.address for r in a.fleet(101.0)} == {"relay-a": "10.0.0.1:8443", "relay-b": "10.0.0.2:8443"}
    assert a.holders(116.0) == {}  # both leases ran out


def test_paths_name_the_agents_whose_tunnels_each_relay_holds(two) -> None:
    a, b = two
    a.announce("relay-a", "", "serving", {"st-marys": ("gw-2", "gw-1")}, 100.0, LEASE)
    b.announce("relay-b", "", "serving", {"st-marys": ("gw-1",), "north": ("",)}, 100.0, LEASE)
    assert a.paths(101.0) == {"north": [("relay-b", [])],
                              "st-marys": [("relay-a", ["gw-1", "gw-2"]), ("relay-b", ["gw-1"])]}
    a.announce("relay-a", "", "serving", {"st-marys": ("gw-2",)}, 102.0, LEASE)  # gw-1 moved away
    assert a.paths(103.0)["st-marys"][0] == ("relay-a", ["gw-2"])
    assert a.presence(103.0)["st-marys"] == ["relay-a", "relay-b"]


def test_a_relay_announces_only_serving_or_draining(two) -> None:
    with pytest.raises(ValueError, match="serving or draining"):
        two[0].announce("relay-a", "", "gone", [], 1.0, LEASE)
