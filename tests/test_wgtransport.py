"""tunnel_agent.wgtransport without namespaces: the relay's answer, the cache, the plan, the fallback watcher.

A real relay without WireGuard (loopback only, no root) shows the fallback end to end: the agent with
``transport = "wireguard"`` is told 404 at registration, connects over the WebSocket, and says why.
The namespace tests with real WireGuard are in tests/test_wireguard_e2e.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support.dcmtk import echoscu, start_storescp
from tests.support.ports import free_port
from tests.support.stack import AgentRoute, ListenerRoute, make_agent, make_relay, start_agent, start_relay
from tunnel_agent.config import AgentSettings, load_agent_settings
from tunnel_agent.wgregistration import (
    Registration,
    WireGuardPathError,
    load_registration,
    parse_registration,
    save_registration,
)
from tunnel_agent.wgtransport import TRANSPORT_FALLBACK, TRANSPORT_WIREGUARD, WireGuardTransport
from tunnel_core.codes import ErrorCode
from tunnel_runtime.settings import ConfigError
from tunnel_wireguard.plan import TransportPlan

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RELAY_KEY = base64.b64encode(bytes(range(32))).decode()
OUR_KEY = base64.b64encode(bytes(range(32, 64))).decode()
ANSWER = {
    "site": "hospital-a",
    "address_cidr": "10.99.0.2/24",
    "relay_public_key": RELAY_KEY,
    "relay_address": "10.99.0.1",
    "endpoint": "relay.example.org:51820",
    "tunnel_url": "ws://10.99.0.1:8444/tunnel",
    "persistent_keepalive": 25,
}


# --- the relay's answer -------------------------------------------------------------------------------


def test_parse_registration_reads_the_documented_answer() -> None:
    reg = parse_registration(ANSWER)
    assert reg == Registration("hospital-a", "10.99.0.2/24", RELAY_KEY, "10.99.0.1", "relay.example.org:51820",
                               "ws://10.99.0.1:8444/tunnel", 25)
    assert (reg.address, reg.tunnel_port) == ("10.99.0.2", 8444)


@pytest.mark.parametrize("keepalive, expected", [(10, 10), (0, 25), (None, 25)])
def test_parse_registration_keepalive_is_never_off(keepalive: int | None, expected: int) -> None:
    answer = {**ANSWER, "persistent_keepalive": keepalive} if keepalive is not None else {
        k: v for k, v in ANSWER.items() if k != "persistent_keepalive"}
    assert parse_registration(answer).persistent_keepalive == expected


@pytest.mark.parametrize(
    "change, field",
    [
        ({"site": ""}, "site"),
        ({"address_cidr": "10.99.0.2"}, "address_cidr"),  # no prefix: no route to the relay
        ({"address_cidr": "10.99.0.300/24"}, "address_cidr"),
        ({"relay_address": "relay"}, "relay_address"),
        ({"relay_address": "10.98.0.1"}, "outside our tunnel network"),
        ({"relay_address": "10.99.0.2"}, "outside our tunnel network"),  # our own address
        ({"relay_public_key": "not-a-key"}, "relay_public_key"),
        ({"endpoint": "relay.example.org"}, "endpoint"),
        ({"endpoint": "relay:0"}, "endpoint"),
        ({"endpoint": "-x:51820"}, "endpoint"),
        ({"tunnel_url": "wss://10.99.0.1:8444/tunnel"}, "tunnel_url"),
        ({"tunnel_url": "ws://10.99.0.9:8444/tunnel"}, "tunnel_url"),  # would not go to the relay's address
        ({"tunnel_url": "ws://relay.example.org:8444/tunnel"}, "tunnel_url"),
        ({"tunnel_url": "ws://u:p@10.99.0.1:8444/tunnel"}, "tunnel_url"),
        ({"persistent_keepalive": "25"}, "persistent_keepalive"),
        ({"persistent_keepalive": True}, "persistent_keepalive"),
        ({"persistent_keepalive": 70000}, "persistent_keepalive"),
    ],
)
def test_parse_registration_names_the_bad_field(change: dict, field: str) -> None:
    with pytest.raises(WireGuardPathError, match=field):
        parse_registration({**ANSWER, **change})


@pytest.mark.parametrize("answer", [None, [], "x", {}])
def test_parse_registration_rejects_non_answers(answer: object) -> None:
    with pytest.raises(WireGuardPathError):
        parse_registration(answer)


# --- the cache ------------------------------------------------------------------------------------------


def test_cache_round_trip_is_private_and_bound_to_relay_and_key(tmp_path: Path) -> None:
    path = tmp_path / "state" / "wireguard.json"
    reg = parse_registration(ANSWER)
    save_registration(path, reg, relay_url="wss://relay:8443/tunnel", public_key=OUR_KEY)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["wireguard.json"], "no temporary file left"
    assert load_registration(path, relay_url="wss://relay:8443/tunnel", public_key=OUR_KEY) == reg
    assert load_registration(path, relay_url="wss://other:8443/tunnel", public_key=OUR_KEY) is None
    assert load_registration(path, relay_url="wss://relay:8443/tunnel", public_key=RELAY_KEY) is None, \
        "a new key must be registered again"
    assert load_registration(tmp_path / "missing.json", relay_url="x", public_key=OUR_KEY) is None


@pytest.mark.parametrize("content", ["not json", "[]", json.dumps({"relay_url": "x", "public_key": OUR_KEY,
                                                                    "registration": {"site": "a"}})])
def test_cache_that_is_damaged_is_ignored(tmp_path: Path, content: str) -> None:
    path = tmp_path / "wireguard.json"
    path.write_text(content)
    assert load_registration(path, relay_url="x", public_key=OUR_KEY) is None


# --- the plan ---------------------------------------------------------------------------------------


def test_plan_tries_wireguard_then_falls_back_until_the_retry_is_due() -> None:
    plan = TransportPlan(retry_interval=60.0)
    assert plan.use_wireguard(0.0) and plan.reason == ""
    plan.wireguard_failed(10.0, "UDP blocked")
    assert plan.reason == "UDP blocked" and plan.retry_at == 70.0
    assert not plan.use_wireguard(69.9) and plan.use_wireguard(70.0)
    plan.wireguard_failed(70.0, "still blocked")
    assert not plan.use_wireguard(100.0) and plan.reason == "still blocked"
    plan.probe_answered(101.0)
    assert plan.use_wireguard(101.0) and plan.reason == "still blocked", "the reason stays until WireGuard is up"
    plan.wireguard_up()
    assert plan.use_wireguard(101.0) and plan.reason == "" and plan.retry_at is None


# --- configuration ------------------------------------------------------------------------------------


def test_example_wireguard_section_is_valid(tmp_path: Path) -> None:
    """The commented [wireguard] block in deploy/agent.example.toml, uncommented, loads as documented."""
    lines = (DEPLOY / "agent.example.toml").read_text().splitlines()
    start = lines.index("# [wireguard]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path}"\ntransport = "wireguard"\n' + "\n".join(block) + "\n")
    settings = load_agent_settings(config)
    wg = settings.wireguard
    assert settings.transport == "wireguard"
    assert (wg.interface, wg.key_file, wg.fallback_after, wg.retry_interval, wg.implementation) == (
        "wgtunnel0", tmp_path / "wg.key", 15.0, 60.0, "auto")


def test_wireguard_settings_defaults_and_checks(tmp_path: Path) -> None:
    settings = AgentSettings(state_dir=tmp_path, relay_url="wss://relay:8443/tunnel")
    assert settings.transport == "websocket" and settings.wireguard.key_file == tmp_path / "wg.key"
    config = tmp_path / "agent.toml"
    config.write_text('relay_url = "wss://relay:8443/tunnel"\ntransport = "wireguard"\ntls_mode = "inner"\n')
    with pytest.raises(ConfigError, match="transport"):
        load_agent_settings(config)
    config.write_text('relay_url = "wss://relay:8443/tunnel"\n[wireguard]\ninterface = "-h"\n')
    with pytest.raises(ConfigError, match="wireguard.interface"):
        load_agent_settings(config)


# --- the transport with its network steps replaced ---------------------------------------------------------


class FakeWebSocket:
    pass


class FakeSession:
    def __init__(self, active_streams: int) -> None:
        self.active_streams = active_streams
        self.closed: tuple[ErrorCode, str] | None = None

    async def close(self, code: ErrorCode, reason: str) -> None:
        self.closed = (code, reason)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_transport(tmp_path: Path, session: FakeSession | None = None, *, retry: float = 60.0):
    settings = AgentSettings(state_dir=tmp_path, relay_url="wss://relay:8443/tunnel", transport="wireguard",
                             wireguard={"retry_interval": retry, "fallback_after": 1.0})
    clock = Clock()
    return WireGuardTransport(settings, session=lambda: session, clock=clock), clock


def fallback_opener(log: list[str]):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def opener():
        log.append("fallback")
        yield FakeWebSocket()

    return opener


def test_open_falls_back_with_the_reason_and_skips_wireguard_until_the_retry(tmp_path: Path) -> None:
    transport, clock = make_transport(tmp_path)
    attempts: list[str] = []

    async def no_udp(stack, deadline):
        attempts.append("wireguard")
        raise TimeoutError

    transport._connect = no_udp  # type: ignore[method-assign]
    transport._retry_wireguard = asyncio.Event().wait  # type: ignore[method-assign]  # no probing here

    async def scenario() -> None:
        async with transport.open(fallback_opener(attempts)):
            status = transport.status()
            assert status.transport == TRANSPORT_FALLBACK
            assert "no tunnel over WireGuard within 1 s" in status.reason
            assert "UDP" in status.reason
        assert attempts == ["wireguard", "fallback"]
        clock.now += 30.0  # retry not due: straight to the fallback
        async with transport.open(fallback_opener(attempts)):
            pass
        assert attempts == ["wireguard", "fallback", "fallback"]
        clock.now += 31.0  # due: WireGuard first again

        async def works(stack, deadline):
            attempts.append("wireguard")
            return FakeWebSocket()

        transport._connect = works  # type: ignore[method-assign]
        async with transport.open(fallback_opener(attempts)):
            assert transport.status().transport == TRANSPORT_WIREGUARD
            assert transport.status().reason == ""
        assert attempts[-1] == "wireguard"

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_open_registration_refused_falls_back_with_the_relays_reason(tmp_path: Path) -> None:
    transport, _ = make_transport(tmp_path)

    async def refused(public_key, deadline):
        raise WireGuardPathError("the relay does not offer WireGuard (404: not enabled)", status=404)

    transport._register = refused  # type: ignore[method-assign]
    transport._retry_wireguard = asyncio.Event().wait  # type: ignore[method-assign]
    attempts: list[str] = []

    async def scenario() -> None:
        async with transport.open(fallback_opener(attempts)):
            assert transport.status().reason == "the relay does not offer WireGuard (404: not enabled)"
        assert attempts == ["fallback"]
        assert transport.iface.name is None, "nothing was brought up"

    asyncio.run(asyncio.wait_for(scenario(), 30))
    key = tmp_path / "wg.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, "the key was made, private"


def test_open_falls_back_whatever_breaks_the_wireguard_path(tmp_path: Path) -> None:
    transport, _ = make_transport(tmp_path)

    async def broken(stack, deadline):
        raise RuntimeError("something unforeseen")

    transport._connect = broken  # type: ignore[method-assign]
    transport._retry_wireguard = asyncio.Event().wait  # type: ignore[method-assign]
    attempts: list[str] = []

    async def scenario() -> None:
        async with transport.open(fallback_opener(attempts)):
            assert transport.status().reason == "tunnel over WireGuard failed: RuntimeError: " \
                                                "something unforeseen"

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert attempts == ["fallback"]


def run_watcher(transport: WireGuardTransport, probes: list[bool]) -> None:
    async def probe() -> None:
        ok = probes.pop(0)
        if not ok:
            raise WireGuardPathError("no answer through wgtunnel0")

    transport.probe = probe  # type: ignore[method-assign]
    asyncio.run(asyncio.wait_for(transport._retry_wireguard(), 30))


def test_watcher_closes_an_idle_fallback_session_once_wireguard_answers(tmp_path: Path) -> None:
    session = FakeSession(active_streams=0)
    transport, clock = make_transport(tmp_path, session, retry=0.01)
    transport.plan.wireguard_failed(clock(), "UDP blocked")
    clock.now += 1.0
    probes = [False, True]
    run_watcher(transport, probes)
    assert probes == [] and session.closed == (ErrorCode.GOING_AWAY, "moving the tunnel to WireGuard")
    assert transport.plan.use_wireguard(clock()), "the next attempt tries WireGuard"
    assert transport.last_error == "no answer through wgtunnel0"


def test_watcher_waits_for_associations_to_finish(tmp_path: Path) -> None:
    session = FakeSession(active_streams=1)
    transport, clock = make_transport(tmp_path, session, retry=0.01)
    transport.plan.wireguard_failed(clock(), "UDP blocked")
    clock.now += 1.0

    async def scenario() -> None:
        async def probe() -> None:
            return None

        transport.probe = probe  # type: ignore[method-assign]
        watcher = asyncio.create_task(transport._retry_wireguard())
        await asyncio.sleep(0.05)
        assert session.closed is None, "an association in flight is never cut to switch transports"
        session.active_streams = 0
        await asyncio.wait_for(watcher, 10)
        assert session.closed is not None

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_status_shows_wireguard_health_from_the_dump(tmp_path: Path) -> None:
    from tunnel_wireguard.dump import parse_dump

    transport, _ = make_transport(tmp_path)
    reg = parse_registration(ANSWER)
    transport.registration = reg
    transport.iface.name = "wgtunnel0"  # as if up; dump() is replaced below
    line = f"{RELAY_KEY}\t(none)\t192.0.2.7:51820\t10.99.0.1/32\t{2_000_000_000}\t1234\t5678\t25"
    dump = parse_dump(f"(none)\t{OUR_KEY}\t40000\toff\n{line}\n")
    transport.iface.dump = lambda: dump  # type: ignore[method-assign]
    asyncio.run(transport._refresh())
    wg = transport.status().as_dict()["wireguard"]
    assert isinstance(wg, dict)
    assert (wg["endpoint"], wg["rx_bytes"], wg["tx_bytes"]) == ("192.0.2.7:51820", 1234, 5678)
    assert wg["address"] == "10.99.0.2/24" and wg["relay_address"] == "10.99.0.1"
    assert wg["latest_handshake_age_s"] is not None
    transport.iface.name = None
    assert replace(reg, site="x") != reg  # Registration is a value: a changed answer re-makes the interface


# --- a real relay without WireGuard -------------------------------------------------------------------


def test_relay_without_wireguard_agent_falls_back_and_says_why(procs, tmp_path: Path) -> None:
    pacs_port = free_port()
    start_storescp(procs, pacs_port, "PACS", tmp_path / "pacs")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("HOSP_PACS", "hospital-a", "pacs")],
                       sites={"hospital-a": []})
    state = tmp_path / "agent" / "state"
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[AgentRoute("pacs", pacs_port, "PACS")],
                       extra=[f'state_dir = "{state}"', 'transport = "wireguard"'])
    with agent.config.open("a") as config:  # a name no other test uses, should anything bring it up
        config.write(f'[wireguard]\ninterface = "dtwg{free_port()}"\n')
    start_relay(procs, relay)
    start_agent(procs, agent, relay)
    status = agent.status()
    assert status["transport"] == TRANSPORT_FALLBACK
    assert "404" in status["transport_reason"] and "WireGuard" in status["transport_reason"]
    assert status["wireguard"]["up"] is False, "no interface without a registration"
    r = echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI")
    assert r.ok, r.stderr
    assert stat.S_IMODE((state / "wg.key").stat().st_mode) == 0o600
    assert not (state / "wireguard.json").exists(), "nothing cached from a refusal"
