"""TLS interception on the hospital's path: the agent fails closed and names who intercepted."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from relay import pki
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.stack import AgentRoute, ListenerRoute, make_agent, make_relay, start_agent


async def test_agent_refuses_an_intercepting_certificate_and_names_its_issuer(procs, tmp_path):
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("X", "site-a", "pacs")],
                       sites={"site-a": []})
    agent = make_agent(relay, "site-a", tmp_path / "agent", routes=[AgentRoute("pacs", free_port())])
    # An inspection box at the relay's address: a certificate for the right name from another CA.
    box = tmp_path / "box"
    pki.init_ca(box, common_name="Hospital Inspection CA")
    bundle = pki.issue_server_cert(box, ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(bundle.cert, bundle.key)
    received: list[bytes] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received.append(await asyncio.wait_for(reader.read(65536), 5))
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", relay.tunnel_port, ssl=ctx)
    try:
        start_agent(procs, agent, wait_connected=False)

        def last_error() -> str:
            return agent.status()["last_error"]
        await asyncio.to_thread(wait_until, lambda: "Hospital Inspection CA" in last_error(), 20,
                                message=lambda: f"the interceptor named in last_error: {last_error()!r}")
    finally:
        server.close()
        await server.wait_closed()
    error = last_error()
    assert "issued by 'CN=Hospital Inspection CA'" in error
    assert "exempt 127.0.0.1 from TLS inspection" in error
    assert agent.status()["state"] != "connected" and agent.status()["connects"] == 0
    assert not any(received), "the agent sent application data to the interceptor"


# --- through a real mitmproxy standing in as the hospital's DLP box ------------------------------------


def _dlp_stack(procs, tmp_path: Path, *, inner: bool, mitm_ca: Path | None = None):
    from tests.support.dcmtk import start_storescp
    from tests.support.stack import SiteDest, start_relay

    pacs, cloud = free_port(), free_port()
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    start_storescp(procs, cloud, "CLOUD", tmp_path / "cloud")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("A_PACS", "site-a", "pacs")],
                       sites={"site-a": [SiteDest("A_CLOUD", cloud)]})
    start_relay(procs, relay)
    return relay, pacs


def _agent_behind(relay, tmp_path: Path, pacs: int, mitm, *, inner: bool):
    extra = ['tls_mode = "inner"', f'outer_ca_file = "{mitm.ca_cert}"'] if inner else []
    agent = make_agent(relay, "site-a", tmp_path / "agent", routes=[AgentRoute("pacs", pacs)], extra=extra)
    agent.config.write_text(agent.config.read_text() + f'\n[proxy]\nurl = "{mitm.proxy_url}"\n')
    return agent


def test_dlp_box_default_mode_fails_closed_naming_the_interceptor(procs, tmp_path):
    from tests.support.mitm import start_mitmproxy

    relay, pacs = _dlp_stack(procs, tmp_path, inner=False)
    mitm = start_mitmproxy(procs, tmp_path / "mitm", upstream_ca=relay.state_dir / "ca.crt")
    agent = _agent_behind(relay, tmp_path, pacs, mitm, inner=False)
    start_agent(procs, agent, wait_connected=False)
    wait_until(lambda: "mitmproxy" in agent.status()["last_error"], 30,
               message=lambda: f"the interceptor named; status {agent.status()}\n{agent.proc.log_tail()}")
    error = agent.status()["last_error"]
    assert "issued by 'O=mitmproxy,CN=mitmproxy'" in error and "exempt 127.0.0.1" in error
    assert agent.status()["connects"] == 0 and not relay.site_connected("site-a")


def test_dlp_box_inner_mode_carries_dicom_it_cannot_read(procs, tmp_path, ct_study_small):
    from tests.support.dcmtk import echoscu, storescu
    from tests.support.mitm import start_mitmproxy
    from tunnel_demo.dataset import PHI_PATIENT_ID, PHI_PATIENT_NAME

    relay, pacs = _dlp_stack(procs, tmp_path, inner=True)
    mitm = start_mitmproxy(procs, tmp_path / "mitm", upstream_ca=relay.state_dir / "ca.crt")
    agent = _agent_behind(relay, tmp_path, pacs, mitm, inner=True)
    start_agent(procs, agent, relay)
    site = next(s for s in relay.status()["sites"] if s["name"] == "site-a")
    assert "inner TLS" in site["peer"]
    # Both directions, with patient data in the files.
    assert echoscu("127.0.0.1", relay.dicom_port, "A_PACS", "CLOUDAI").ok
    assert storescu("127.0.0.1", agent.listener_port, "A_CLOUD", "MODALITY", ct_study_small.files[:3]).ok
    assert storescu("127.0.0.1", relay.dicom_port, "A_PACS", "CLOUDAI", ct_study_small.files[3:5]).ok
    assert len(list((tmp_path / "cloud").iterdir())) == 3 and len(list((tmp_path / "pacs").iterdir())) == 2
    agent.proc.stop()
    mitm.finish()
    dump = mitm.dump_bytes()
    assert b"/tunnel/inner" in dump, "the interceptor did see the tunnel's WebSocket"
    for clear in (PHI_PATIENT_NAME.encode(), PHI_PATIENT_ID.encode(), b"1.2.840.10008", b"A_PACS",
                  b"A_CLOUD", b"CLOUDAI", b"MODALITY"):
        assert clear not in dump, f"{clear!r} crossed the interceptor in clear"


def test_dlp_box_inner_mode_enrolls_and_renews(procs, tmp_path):
    import datetime as dt

    from tests.support.dcmtk import echoscu
    from tests.support.mitm import start_mitmproxy
    from tests.support.stack import enroll, site_add
    from tunnel_core.token import EnrollmentToken

    relay, pacs = _dlp_stack(procs, tmp_path, inner=True)
    mitm = start_mitmproxy(procs, tmp_path / "mitm", upstream_ca=relay.state_dir / "ca.crt")
    state = tmp_path / "agent" / "state"
    agent = make_agent(relay, "site-a", tmp_path / "agent", routes=[AgentRoute("pacs", pacs)], enrolled=True,
                       extra=['tls_mode = "inner"', f'outer_ca_file = "{mitm.ca_cert}"'])
    agent.config.write_text(agent.config.read_text() + f'\n[proxy]\nurl = "{mitm.proxy_url}"\n')
    token = site_add(relay, "site-a")
    result = enroll(agent, token)
    assert result.returncode == 0, result.stderr
    # Renewal is due at once: replace the enrolled certificate by one two thirds through its life.
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    bundle = pki.issue_client_cert(relay.state_dir, state, common_name="site-a",
                                      not_valid_before=now - dt.timedelta(hours=20),
                                      not_valid_after=now + dt.timedelta(hours=4))
    from relay.registry import Registry, serial_hex
    registry = Registry.open(relay.state_dir)
    registry.record_certificate(serial_hex(bundle.serial), "site-a", "manual", now.timestamp(),
                                bundle.not_after.timestamp(), actor="test")
    registry.close()
    start_agent(procs, agent, relay)
    wait_until(lambda: agent.status()["renewals"] == 1, 30,
               message=lambda: f"renewed through the interceptor: {agent.status()['renewal_error']}")
    assert echoscu("127.0.0.1", relay.dicom_port, "A_PACS", "CLOUDAI").ok
    assert agent.status()["connects"] == 1
    kinds = [c["kind"] for c in relay.admin("GET", "/api/certificates")["certificates"]]
    assert sorted(kinds) == ["enroll", "manual", "renew"]
    agent.proc.stop()
    mitm.finish()
    dump = mitm.dump_bytes()
    assert b"/enroll/v1/inner" in dump
    assert EnrollmentToken.decode(token).secret.encode() not in dump, "the token crossed the interceptor in clear"
    assert b"CERTIFICATE REQUEST" not in dump
    # The certificate renewal issued travelled inside the inner TLS only (the dump does hold public
    # server certificates: the relay's, seen by the interceptor's upstream connection).
    renewed = (state / "agent.crt").read_bytes()
    assert pki.certificate_serial(renewed) != bundle.serial
    assert b"".join(renewed.split(b"\n")[1:3]) not in dump.replace(b"\n", b"")


def test_diagnose_through_the_dlp_box_in_both_modes(procs, tmp_path):
    import json
    import subprocess

    from tests.support.mitm import start_mitmproxy
    from tests.support.stack import AGENT

    relay, pacs = _dlp_stack(procs, tmp_path, inner=True)
    mitm = start_mitmproxy(procs, tmp_path / "mitm", upstream_ca=relay.state_dir / "ca.crt")
    agent = _agent_behind(relay, tmp_path, pacs, mitm, inner=False)

    def diagnose() -> dict[str, dict]:
        done = subprocess.run([AGENT, "diagnose", "--config", str(agent.config), "--json"], capture_output=True,
                              text=True, timeout=120)
        return {step["name"]: step for step in json.loads(done.stdout)["steps"]}

    direct = diagnose()
    assert direct["TLS"]["outcome"] == "fail" and "mitmproxy" in direct["TLS"]["detail"]
    assert direct["auth"]["outcome"] == "skip"
    agent.config.write_text(agent.config.read_text().replace(
        "connect_timeout", f'tls_mode = "inner"\nouter_ca_file = "{mitm.ca_cert}"\nconnect_timeout', 1))
    inner = diagnose()
    assert {name: step["outcome"] for name, step in inner.items()} == {
        name: "ok" for name in inner}, inner
    assert "inside the tunnel" in inner["TLS"]["detail"]
