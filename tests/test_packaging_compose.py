"""The compose deployment in deploy/compose (docs/packaging.md): compose.yaml against the Compose
Specification's JSON schema, its relay.toml through the relay's own loader, and haproxy.cfg run for real:
Debian's haproxy as a plain process on 127.0.0.1 (only its addresses and ports substituted) in front of two
real relays sharing a real PostgreSQL, an agent enrolled and connected through it, and a storescp PACS.

What is asserted: a site's tunnel lives on one relay, and a DICOM caller that haproxy sends to the other
relay is carried there one hop, so every C-ECHO through haproxy reaches the PACS whichever relay takes it.
Stopping the relay that holds the tunnel (by PID) makes haproxy's health check take it out, the agent's
reconnect through haproxy lands on the surviving relay, and from then on every C-ECHO through haproxy
still reaches the PACS.
"""

from __future__ import annotations

import copy
import re
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from devkit.fleet import make_fleet
from relay.config import load_relay_settings
from relay.guard import host_allowed
from tests.support.dcmtk import echoscu, start_storescp
from tests.support.haproxy import haproxy_binary
from tests.support.ports import free_port, free_ports
from tests.support.procs import wait_for_port, wait_until
from tests.support.stack import (
    AgentRoute,
    ListenerRoute,
    RelayHandle,
    enroll_agent,
    make_agent,
    start_agent,
    start_relay,
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose"
SITE = "st-marys"
SERVER_LINE = re.compile(r"^(\s*server (relay-\d) )relay-\d:(\d+) check port 8081$", re.M)
FAILOVER_TIMEOUT = 30.0


def _compose() -> dict:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


def _compose_schema() -> dict:
    vendored = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return yaml.safe_load(vendored.read_text())  # JSON is YAML


def _schema_errors(document: dict) -> list[str]:
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_compose_file_follows_the_compose_specification():
    compose = _compose()
    assert _schema_errors(compose) == []
    broken = copy.deepcopy(compose)
    broken["services"]["relay-1"]["restart_policy"] = "always"  # the control: an unknown key fails
    assert _schema_errors(broken)


def test_the_compose_relays_run_the_local_image_locked_down():
    services = _compose()["services"]
    assert {"postgres", "pki", "relay-1", "relay-2", "haproxy"} <= services.keys()
    for name in ("pki", "relay-1", "relay-2"):
        service = services[name]
        assert service["image"].startswith("localhost/dicom-tunnel:")
        assert service["user"] == "10001:10001" and service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
    for name in ("relay-1", "relay-2"):
        assert services[name]["secrets"] == ["registry-password"]
        assert services[name]["environment"]["TUNNEL_RELAY_FLEET__NAME"] == name
    published = [p for p in services["haproxy"]["ports"] if not p.startswith("127.0.0.1:")]
    assert published == ["8443:8443"], "only the tunnel port faces the internet"


def test_the_compose_relay_config_loads_and_answers_haproxys_checks(tmp_path):
    settings = load_relay_settings(COMPOSE / "relay.toml")
    assert settings.registry_password_file == Path("/run/secrets/registry-password")  # compose's secret path
    assert (settings.admin.host, settings.admin.port) == ("0.0.0.0", 8081)
    names = frozenset(settings.admin.host_names())
    assert host_allowed("localhost", names)  # haproxy's check sends Host: localhost
    assert host_allowed("relay-2:8081", names) and not host_allowed("evil.example", names)
    cfg = (COMPOSE / "haproxy.cfg").read_text()
    ports = {int(port) for _, _, port in SERVER_LINE.findall(cfg)}
    assert ports == {settings.tunnel.port, settings.listeners[0].port}
    assert "hdr Host localhost" in cfg


def test_haproxy_accepts_the_config_as_shipped():
    done = subprocess.run([haproxy_binary(), "-c", "-f", str(COMPOSE / "haproxy.cfg")], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def local_haproxy_cfg(tunnel_port: int, dicom_port: int, relays: dict[str, RelayHandle]) -> str:
    """deploy/compose/haproxy.cfg with its listeners on 127.0.0.1 and the relays at their test ports (the
    compose DNS resolver dropped: the servers are addresses here). Everything else runs as shipped."""
    cfg = (COMPOSE / "haproxy.cfg").read_text()
    cfg, binds = re.subn(r"^(\s*bind ):(8443|11112)$",
                         lambda m: f"{m[1]}127.0.0.1:{tunnel_port if m[2] == '8443' else dicom_port}", cfg, flags=re.M)

    def server(match: re.Match[str]) -> str:
        relay = relays[match[2]]
        port = relay.tunnel_port if match[3] == "8443" else relay.dicom_port
        return f"{match[1]}127.0.0.1:{port} check port {relay.admin_port}"

    cfg, servers = SERVER_LINE.subn(server, cfg)
    cfg, resolvers = re.subn(r"^resolvers compose\n(?:    .*\n)+", "", cfg, flags=re.M)
    cfg, uses = re.subn(r" resolvers compose", "", cfg)
    assert (binds, servers, resolvers, uses) == (2, 4, 1, 1), "haproxy.cfg changed shape: update this test"
    return cfg


@pytest.fixture
def fleet_behind_haproxy(procs, postgres, tmp_path):
    """relay-1 and relay-2 on one registry and one CA, haproxy in front, a PACS; the agent not enrolled."""
    tunnel_port, dicom_port = free_ports(2)
    public = [f'public_url = "wss://127.0.0.1:{tunnel_port}/tunnel"']  # tokens send agents to haproxy
    pacs = free_port()
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    relays = {f"relay-{name}": relay for name, relay in make_fleet(
        tmp_path / "fleet", postgres, ("1", "2"), listener_routes=[ListenerRoute("SM_PACS", SITE, "pacs")],
        sites={SITE: []}, tunnel=public).items()}
    for name, relay in relays.items():
        start_relay(procs, relay, name=name)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(local_haproxy_cfg(tunnel_port, dicom_port, relays))
    haproxy = procs.spawn([haproxy_binary(), "-db", "-f", str(cfg)], name="haproxy")
    wait_for_port("127.0.0.1", tunnel_port, 15, proc=haproxy)
    wait_for_port("127.0.0.1", dicom_port, 15, proc=haproxy)
    # One tunnel, through haproxy: this compose file publishes no relay but the balancer.
    agent = make_agent(relays["relay-1"], SITE, tmp_path / "agent", routes=[AgentRoute("pacs", pacs)],
                       enrolled=True, heartbeat=1.0, sections=["[fleet]", "tunnels = 1"])
    return relays, haproxy, agent, dicom_port


def test_haproxy_takes_a_stopped_relay_out_and_the_agent_reconnects_to_the_other(procs, fleet_behind_haproxy):
    relays, haproxy, agent, dicom_port = fleet_behind_haproxy
    enroll_agent(relays["relay-1"], agent)  # the token names haproxy; either relay redeems it
    start_agent(procs, agent)
    holder = wait_until(lambda: next((n for n, r in relays.items() if r.site_connected(SITE)), None), 15,
                        message="a relay to hold the site's tunnel", watch=[haproxy, agent.proc])
    survivor = next(n for n in relays if n != holder)
    assert echoscu("127.0.0.1", relays[holder].dicom_port, "SM_PACS", "CLOUDAI").ok  # the path, without haproxy
    wait_until(lambda: relays[survivor].admin("GET", "/api/fleet")["presence"].get(SITE) == [holder], 5,
               message="the survivor to see which relay holds the tunnel")
    assert echoscu("127.0.0.1", relays[survivor].dicom_port, "SM_PACS", "CLOUDAI").ok  # one hop to the holder
    for _ in range(4):  # haproxy spreads callers over both relays: each reaches the PACS
        result = echoscu("127.0.0.1", dicom_port, "SM_PACS", "CLOUDAI")
        assert result.ok, result

    procs.stop(relays[holder].proc)
    for backend in ("relays-tunnel", "relays-dicom"):
        wait_until(lambda b=backend: f"{b}/{holder} is DOWN" in haproxy.log_text(), FAILOVER_TIMEOUT,
                   message=f"haproxy to mark {backend}/{holder} down", watch=[haproxy])
    wait_until(lambda: relays[survivor].site_connected(SITE), FAILOVER_TIMEOUT,
               message=f"the agent to reconnect through haproxy to {survivor}",
               watch=[haproxy, agent.proc, relays[survivor].proc])
    assert agent.state() == "connected"
    for _ in range(3):  # every caller now lands on the survivor, which holds the tunnel
        result = echoscu("127.0.0.1", dicom_port, "SM_PACS", "CLOUDAI")
        assert result.ok, result
    assert f"relays-tunnel/{survivor} is DOWN" not in haproxy.log_text()
