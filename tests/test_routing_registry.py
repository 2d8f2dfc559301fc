"""Routing kept in the relay's registry: routes added and removed through the CLI apply to the next
association, persist across restarts, and never override or remove what the config file defines."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from relay import registry as reg
from relay import store
from relay.engines import render_migration
from tests.support.dcmtk import echoscu, start_storescp
from tests.support.ports import free_port
from tests.support.stack import (
    RELAY,
    AgentRoute,
    ListenerRoute,
    SiteDest,
    enroll_agent,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)


def _relay_cli(relay, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RELAY, *argv, "--config", str(relay.config)], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def routed(procs, tmp_path):
    pacs, cloud = free_port(), free_port()
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    start_storescp(procs, cloud, "CLOUD", tmp_path / "cloud")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("CFG_PACS", "st-marys", "pacs")],
                       sites={"st-marys": [SiteDest("CFG_CLOUD", cloud)]})
    agent = make_agent(relay, "st-marys", tmp_path / "agent", routes=[AgentRoute("pacs", pacs)], enrolled=True)
    start_relay(procs, relay)
    enroll_agent(relay, agent)
    start_agent(procs, agent, relay)
    return relay, agent, cloud


def test_routes_added_and_removed_apply_at_once_and_persist(procs, routed):
    relay, agent, cloud = routed
    assert not echoscu("127.0.0.1", relay.dicom_port, "NEW_PACS", "CLOUDAI").ok
    added = _relay_cli(relay, "route", "add", "cloud", "NEW_PACS", "--site", "st-marys", "--route", "pacs",
                       "--allow", "CLOUDAI")
    assert added.returncode == 0, added.stderr
    assert echoscu("127.0.0.1", relay.dicom_port, "NEW_PACS", "CLOUDAI").ok
    assert not echoscu("127.0.0.1", relay.dicom_port, "NEW_PACS", "STRANGER").ok  # the allow-list holds
    dest = _relay_cli(relay, "site", "destination", "add", "st-marys", "NEW_CLOUD", "--host", "127.0.0.1",
                      "--port", str(cloud), "--allow", "*")
    assert dest.returncode == 0, dest.stderr
    assert echoscu("127.0.0.1", agent.listener_port, "NEW_CLOUD", "MODALITY").ok
    listing = json.loads(_relay_cli(relay, "route", "list", "--json").stdout)
    assert {(r["called_ae"], r["source"]) for r in listing["listener_routes"]} == {("CFG_PACS", "config"),
                                                                                 ("NEW_PACS", "api")}
    # A restart keeps what the API added.
    relay.proc.stop()
    start_relay(procs, relay)
    from tests.support.procs import wait_until
    wait_until(lambda: relay.site_connected("st-marys"), 20, message="agent reconnected")
    assert echoscu("127.0.0.1", relay.dicom_port, "NEW_PACS", "CLOUDAI").ok
    assert _relay_cli(relay, "route", "remove", "cloud", "NEW_PACS").returncode == 0
    assert not echoscu("127.0.0.1", relay.dicom_port, "NEW_PACS", "CLOUDAI").ok
    assert _relay_cli(relay, "site", "destination", "remove", "st-marys", "NEW_CLOUD").returncode == 0
    assert not echoscu("127.0.0.1", agent.listener_port, "NEW_CLOUD", "MODALITY").ok
    assert echoscu("127.0.0.1", relay.dicom_port, "CFG_PACS", "CLOUDAI").ok
    actions = [e["action"] for e in relay.admin("GET", "/api/audit")["audit"]]
    assert {"route_added", "route_removed", "destination_added", "destination_removed"} <= set(actions)


def test_config_routes_cannot_be_removed_or_shadowed_through_the_api(routed):
    relay, _agent, _cloud = routed
    removed = _relay_cli(relay, "route", "remove", "cloud", "CFG_PACS")
    assert removed.returncode == 1 and "config file" in removed.stderr
    shadow = _relay_cli(relay, "route", "add", "cloud", "CFG_PACS", "--site", "st-marys", "--route", "other",
                        "--allow", "*")
    assert shadow.returncode == 1 and "already routes" in shadow.stderr
    for bad, why in ((["route", "add", "nope", "X", "--site", "st-marys", "--route", "pacs", "--allow", "*"],
                      "listener must name"),
                     (["route", "add", "cloud", "X", "--site", "ghost", "--route", "pacs", "--allow", "*"],
                      "unknown site"),
                     (["route", "add", "cloud", "A" * 17, "--site", "st-marys", "--route", "pacs", "--allow", "*"],
                      "called_ae")):
        result = _relay_cli(relay, *bad)
        assert result.returncode == 1 and why in result.stderr, (bad, result.stderr)


def test_version_1_registry_is_migrated_keeping_its_data(tmp_path: Path):
    db = sqlite3.connect(tmp_path / reg.REGISTRY_FILE)
    for statement in render_migration(store._MIGRATIONS[0], "sqlite"):
        db.execute(statement)
    db.execute("INSERT INTO sites(name, created_at) VALUES ('old-site', 1.0)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    registry = reg.Registry.open(tmp_path)
    try:
        assert [s.name for s in registry.sites()] == ["old-site"]
        assert registry.routes() == [] and registry.destinations() == []
        registry.add_route(reg.RouteRecord("cloud", "AE", "old-site", "pacs", ("*",)), 2.0, actor="t")
        assert registry.routes()[0].source == "api"
    finally:
        registry.close()
    version = sqlite3.connect(tmp_path / reg.REGISTRY_FILE).execute("PRAGMA user_version").fetchone()[0]
    assert version == reg.SCHEMA_VERSION
