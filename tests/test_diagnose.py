"""``tunnel-agent diagnose``: the pure result model (skips, formatting, certificate and TLS verdicts, C-ECHO
hints), then the whole walk against real processes: a relay, an agent, storescp as the PACS, squid as the
hospital proxy, and a TLS server with another CA's certificate standing in as a TLS-inspecting proxy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import secrets
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay import pki
from tests.support.dcmtk import start_storescp
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.squid import running_squid
from tests.support.stack import (
    AGENT,
    AgentHandle,
    AgentRoute,
    ListenerRoute,
    RelayHandle,
    enroll_agent,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)
from tunnel_agent.config import load_agent_settings
from tunnel_agent.diagnose import (
    CALLING_AE,
    Outcome,
    Step,
    check_certificate,
    echo_step,
    exit_code,
    format_steps,
    run_diagnosis,
    skip_for,
    steps_json,
    tls_failure_hint,
)
from tunnel_agent.echo import EchoAttempt

SITE = "st-marys"
USER = "tunnel-agent"
NO_ENV_PROXY = {"https_proxy": "", "HTTPS_PROXY": "", "no_proxy": "", "NO_PROXY": ""}
NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
DIAGNOSIS_TIMEOUT = 90.0

OK, WARN, FAIL, SKIP = Outcome.OK, Outcome.WARN, Outcome.FAIL, Outcome.SKIP


# --- skips ------------------------------------------------------------------------------------------------


def test_a_failed_prerequisite_skips_the_step_and_names_it():
    done = [Step("config", OK, "fine"), Step("DNS", FAIL, "no such host", "check DNS")]
    assert skip_for("TCP", done, ("DNS",)) == Step("TCP", SKIP, "because DNS failed")
    assert skip_for("TCP", done, ("config",)) is None


def test_skips_cascade_with_the_original_cause():
    done = [Step("DNS", FAIL, "x")]
    for name, requires in (("TCP", ("DNS",)), ("proxy", ("TCP",)), ("TLS", ("TCP", "proxy")), ("auth", ("TLS",))):
        done.append(skip_for(name, done, requires))
    assert [(s.name, s.outcome, s.detail) for s in done[1:]] == [
        ("TCP", SKIP, "because DNS failed"), ("proxy", SKIP, "because DNS failed"),
        ("TLS", SKIP, "because DNS failed"), ("auth", SKIP, "because DNS failed")]


def test_a_warning_passes_and_an_absent_step_is_not_required():
    done = [Step("cert", WARN, "renewal overdue", "see status"), Step("TCP", OK, "")]
    assert skip_for("auth", done, ("cert", "proxy", "TCP")) is None  # no proxy step: direct connection


def test_the_first_failed_prerequisite_is_named():
    done = [Step("cert", FAIL, "expired"), Step("TLS", FAIL, "bad")]
    assert skip_for("auth", done, ("cert", "TLS")).detail == "because cert failed"


# --- output -----------------------------------------------------------------------------------------------


STEPS = [
    Step("DNS", OK, "relay relay.example.org -> 10.0.0.5 (2 ms)"),
    Step("TCP", FAIL, "cannot connect to relay 10.0.0.5:8443: Connection refused", "is the relay up?"),
    Step("TLS", SKIP, "because TCP failed"),
    Step("cert", WARN, "7 days left", "renewal is overdue"),
]


def test_human_lines_align_and_carry_hints():
    assert format_steps(STEPS).splitlines() == [
        "[ OK ] DNS        relay relay.example.org -> 10.0.0.5 (2 ms)",
        "[FAIL] TCP        cannot connect to relay 10.0.0.5:8443: Connection refused",
        "       hint: is the relay up?",
        "[SKIP] TLS        because TCP failed",
        "[WARN] cert       7 days left",
        "       hint: renewal is overdue",
        "FAILED: TCP (see the hints above)",
    ]


def test_long_names_widen_the_column():
    lines = format_steps([Step("DNS", OK, "a"), Step("C-ECHO radiology-pacs", OK, "b")]).splitlines()
    assert lines[0].index(" a") == lines[1].index(" b") == len("[ OK ] C-ECHO radiology-pacs")
    assert lines[-1] == "all 2 checks passed"


def test_exit_code_and_json():
    assert exit_code(STEPS) == 1
    assert exit_code([s for s in STEPS if s.outcome is not FAIL]) == 0  # a warning does not fail
    data = json.loads(steps_json(STEPS))
    assert data["ok"] is False
    assert data["steps"][1] == {"name": "TCP", "outcome": "fail",
                                "detail": "cannot connect to relay 10.0.0.5:8443: Connection refused",
                                "hint": "is the relay up?"}


# --- the certificate step ------------------------------------------------------------------------------


def site_certificate(tmp_path: Path, *, start: dt.datetime, end: dt.datetime) -> x509.Certificate:
    ca_dir = tmp_path / "ca"
    pki.init_ca(ca_dir)
    bundle = pki.issue_client_cert(ca_dir, tmp_path / "site", common_name=SITE, not_valid_before=start,
                                      not_valid_after=end)
    return x509.load_pem_x509_certificate(bundle.cert.read_bytes())


def test_certificate_valid_with_days_left(tmp_path):
    cert = site_certificate(tmp_path, start=NOW - dt.timedelta(days=1), end=NOW + dt.timedelta(days=29))
    step = check_certificate(cert, Path("/s/agent.key"), 0o600, NOW)
    assert step.outcome is OK and step.hint == ""
    assert f"certificate '{SITE}' valid until 2030-06-30 12:00 UTC (29 days left" in step.detail
    assert "key /s/agent.key mode 0600" in step.detail


def test_expired_certificate_says_enroll_again(tmp_path):
    cert = site_certificate(tmp_path, start=NOW - dt.timedelta(days=31), end=NOW - dt.timedelta(days=1))
    step = check_certificate(cert, Path("/s/agent.key"), 0o600, NOW)
    assert step.outcome is FAIL and "expired on 2030-05-31 12:00 UTC" in step.detail
    assert "enroll again" in step.hint


def test_certificate_from_the_future_blames_the_clock(tmp_path):
    cert = site_certificate(tmp_path, start=NOW + dt.timedelta(hours=2), end=NOW + dt.timedelta(days=30))
    step = check_certificate(cert, Path("/s/agent.key"), 0o600, NOW)
    assert step.outcome is FAIL and "clock" in step.hint


def test_overdue_renewal_is_a_warning(tmp_path):
    cert = site_certificate(tmp_path, start=NOW - dt.timedelta(days=25), end=NOW + dt.timedelta(hours=30))
    step = check_certificate(cert, Path("/s/agent.key"), 0o600, NOW)
    assert step.outcome is WARN and "(30.0 hours left)" in step.detail and "renewal is overdue" in step.hint


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_open_to_others_fails(tmp_path, mode):
    cert = site_certificate(tmp_path, start=NOW - dt.timedelta(days=1), end=NOW + dt.timedelta(days=29))
    step = check_certificate(cert, Path("/s/agent.key"), mode, NOW)
    assert step.outcome is FAIL
    assert f"(mode {mode:04o})" in step.detail and "chmod 600 /s/agent.key" in step.hint


# --- the TLS verdict ------------------------------------------------------------------------------------


def server_certificate_der(ca_dir: Path, hostnames: list[str], common_name: str = "DICOM Tunnel Relay CA") -> bytes:
    pki.init_ca(ca_dir, common_name=common_name)
    bundle = pki.issue_server_cert(ca_dir, hostnames)
    return x509.load_pem_x509_certificate(bundle.cert.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_tls_hint_names_the_inspecting_issuer(tmp_path):
    der = server_certificate_der(tmp_path / "dlp", ["relay.example.org"], "Fortinet CA SSL")
    pki.init_ca(tmp_path / "relay")
    hint = tls_failure_hint("relay.example.org", der, (tmp_path / "relay" / "ca.crt").read_bytes(),
                            dt.datetime.now(dt.UTC))
    assert hint == ("a TLS-inspecting proxy (issuer 'CN=Fortinet CA SSL') is in the path: ask the network team to "
                    "exempt relay.example.org from inspection, or use interception mode")


def test_tls_hint_for_the_relays_own_certificate_with_another_name(tmp_path):
    der = server_certificate_der(tmp_path / "relay", ["relay.internal", "10.9.9.9"])
    hint = tls_failure_hint("relay.example.org", der, (tmp_path / "relay" / "ca.crt").read_bytes(),
                            dt.datetime.now(dt.UTC))
    assert hint.startswith("the relay's certificate names 10.9.9.9, relay.internal, not relay.example.org")


def test_tls_hint_for_the_relays_expired_certificate(tmp_path):
    der = server_certificate_der(tmp_path / "relay", ["relay.example.org"])
    hint = tls_failure_hint("relay.example.org", der, (tmp_path / "relay" / "ca.crt").read_bytes(),
                            dt.datetime.now(dt.UTC) + dt.timedelta(days=3650))
    assert "outside its validity" in hint and "relay operator" in hint


# --- the C-ECHO verdict -----------------------------------------------------------------------------------


def test_echo_steps():
    ok = echo_step("pacs", "10.1.1.1:104", "PACS", EchoAttempt(True, True, True, 0, latency=0.004))
    assert ok == Step("C-ECHO pacs", OK, f"10.1.1.1:104 (called AE PACS, calling AE {CALLING_AE}): success (4 ms)")
    refused = echo_step("pacs", "10.1.1.1:104", "PACS", EchoAttempt(False, False, False, None,
                                                                    tcp_error="Connection refused"))
    assert (refused.outcome, refused.detail) == (FAIL, "cannot connect to 10.1.1.1:104: Connection refused")
    assert "10.1.1.1:104" in refused.hint and "[[routes]] 'pacs'" in refused.hint
    rejected = echo_step("pacs", "10.1.1.1:104", "PACS", EchoAttempt(
        True, True, False, None, rejection="Rejected (Permanent), DUL service-user: Called AE title not recognised"))
    assert "association rejected (Rejected (Permanent)" in rejected.detail and "called_ae" in rejected.hint
    aborted = echo_step("pacs", "10.1.1.1:104", "PACS", EchoAttempt(True, True, False, None))
    assert "aborted" in aborted.detail and "Verification" in aborted.hint
    silent = echo_step("pacs", "10.1.1.1:104", "PACS", EchoAttempt(True, False, False, None))
    assert "no answer" in silent.detail and "DICOM port" in silent.hint


# --- not enrolled ---------------------------------------------------------------------------------------


async def test_not_enrolled_fails_config_and_skips_the_network(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    steps = await run_diagnosis(load_agent_settings(config), {})
    assert [(s.name, s.outcome) for s in steps] == [
        ("config", FAIL), ("cert", SKIP), ("DNS", SKIP), ("TCP", SKIP), ("TLS", SKIP), ("auth", SKIP),
        ("relay", SKIP), ("C-ECHO", SKIP)]
    assert "not enrolled" in steps[0].detail and "tunnel-agent enroll" in steps[0].hint
    assert {s.detail for s in steps[1:7]} == {"because config failed"}


# --- real processes -----------------------------------------------------------------------------------------


PASSING = ["config", "cert", "DNS", "TCP", "TLS", "auth", "relay", "C-ECHO pacs"]


@pytest.fixture
def parts(tmp_path):
    """A relay and an agent configuration (nothing started), the agent's route to a PACS port."""
    pacs = free_port()
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("SM_PACS", SITE, "pacs")],
                       sites={SITE: []})
    agent = make_agent(relay, SITE, tmp_path / "agent", routes=[AgentRoute("pacs", pacs, "PACS")])
    return relay, agent, pacs


@pytest.fixture
def site(procs, tmp_path, parts):
    """The relay running and storescp as the PACS; the agent is not started."""
    relay, agent, pacs = parts
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    start_relay(procs, relay)
    return relay, agent, pacs


def diagnose_cli(agent: AgentHandle, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([AGENT, "diagnose", "--config", str(agent.config), *extra], capture_output=True,
                          text=True, timeout=DIAGNOSIS_TIMEOUT, env={**os.environ, **NO_ENV_PROXY, **(env or {})})


async def diagnose(agent: AgentHandle, environ: dict[str, str] | None = None, **update) -> list[Step]:
    settings = load_agent_settings(agent.config)
    if update:
        settings = settings.model_copy(update=update)
    async with asyncio.timeout(DIAGNOSIS_TIMEOUT):
        return await run_diagnosis(settings, {**NO_ENV_PROXY, **(environ or {})})


def by_name(steps: list[Step]) -> dict[str, Step]:
    return {step.name: step for step in steps}


def site_status(relay: RelayHandle) -> dict:
    return next(s for s in relay.status()["sites"] if s["name"] == SITE)


def test_all_steps_pass_with_a_relay_and_a_pacs_and_no_agent(site):
    relay, agent, pacs = site
    result = diagnose_cli(agent, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True
    assert [(s["name"], s["outcome"]) for s in data["steps"]] == [(name, "ok") for name in PASSING]
    steps = {s["name"]: s for s in data["steps"]}
    assert steps["DNS"]["detail"].startswith("relay 127.0.0.1 -> 127.0.0.1 (")
    assert steps["TCP"]["detail"].startswith(f"connected to relay 127.0.0.1:{relay.tunnel_port} (")
    assert steps["TLS"]["detail"].startswith("TLSv1.3 ")
    assert "issued by 'CN=DICOM Tunnel Relay CA'" in steps["TLS"]["detail"]
    assert "the relay answered a tunnel PING, rtt" in steps["relay"]["detail"]
    assert steps["C-ECHO pacs"]["detail"].startswith(f"127.0.0.1:{pacs} (called AE PACS, calling AE TUNNEL-DIAG)")
    # Our own short tunnel came and went.
    assert site_status(relay)["connects"] == 1 and not relay.site_connected(SITE)

    human = diagnose_cli(agent)
    assert human.returncode == 0, human.stdout + human.stderr
    lines = human.stdout.splitlines()
    assert [line[:6] for line in lines[:-1]] == ["[ OK ]"] * len(PASSING)
    assert re.match(r"\[ OK \] DNS +relay 127\.0\.0\.1 -> 127\.0\.0\.1 \(\d+ ms\)$", lines[2]), lines[2]
    assert lines[-1] == f"all {len(PASSING)} checks passed"
    assert human.stderr == ""


async def test_an_enrolled_agent_takes_the_relay_from_its_enrollment(tmp_path, site):
    relay, _agent, pacs = site
    agent = make_agent(relay, SITE, tmp_path / "enrolled", routes=[AgentRoute("pacs", pacs, "PACS")], enrolled=True)
    enroll_agent(relay, agent)
    steps = await diagnose(agent)
    assert [(s.name, s.outcome) for s in steps] == [(name, OK) for name in PASSING], format_steps(steps)
    assert steps[0].detail.startswith(f"relay wss://127.0.0.1:{relay.tunnel_port}/tunnel (from the enrollment); ")
    assert str(agent.root / "state" / "agent.key") in steps[1].detail


async def test_a_connected_agent_answers_for_the_relay_and_keeps_its_session(procs, site):
    relay, agent, _pacs = site
    start_agent(procs, agent, relay)
    assert site_status(relay)["connects"] == 1
    steps = by_name(await diagnose(agent))
    assert all(step.outcome is OK for step in steps.values()), format_steps(list(steps.values()))
    assert "the running agent" in steps["auth"].detail and "is connected" in steps["auth"].detail
    assert steps["relay"].detail.startswith("the running agent is connected, rtt ")
    assert "no second tunnel opened" in steps["relay"].detail
    status = site_status(relay)
    assert status["connects"] == 1 and status["connected"]
    assert agent.status()["connects"] == 1 and agent.status()["state"] == "connected"


async def test_pacs_down_fails_only_the_echo(procs, tmp_path, parts):
    relay, agent, pacs = parts  # no storescp at the PACS port
    start_relay(procs, relay)
    steps = await diagnose(agent)
    assert [(s.name, s.outcome) for s in steps] == [(name, OK) for name in PASSING[:-1]] + [("C-ECHO pacs", FAIL)]
    echo = steps[-1]
    assert echo.detail == f"cannot connect to 127.0.0.1:{pacs}: Connection refused"
    assert f"127.0.0.1:{pacs}" in echo.hint and "[[routes]] 'pacs'" in echo.hint
    assert exit_code(steps) == 1


async def test_relay_down_fails_tcp_and_skips_what_needs_it(procs, tmp_path, parts):
    relay, agent, pacs = parts  # the relay is not running
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    steps = await diagnose(agent)
    assert [(s.name, s.outcome) for s in steps] == [
        ("config", OK), ("cert", OK), ("DNS", OK), ("TCP", FAIL), ("TLS", SKIP), ("auth", SKIP), ("relay", SKIP),
        ("C-ECHO pacs", OK)]  # the local PACS does not need the relay: still checked
    tcp = steps[3]
    assert tcp.detail == f"cannot connect to relay 127.0.0.1:{relay.tunnel_port}: Connection refused"
    assert "is the relay up" in tcp.hint
    assert {s.detail for s in steps[4:7]} == {"because TCP failed"}


async def test_an_intercepting_tls_server_is_named_by_its_issuer(tmp_path, parts):
    _relay, agent, _pacs = parts
    dlp = tmp_path / "dlp"
    pki.init_ca(dlp, common_name="Corporate Inspection CA")
    bundle = pki.issue_server_cert(dlp, ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(bundle.cert, bundle.key)
    handshakes = 0

    async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal handshakes
        handshakes += 1
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    async with server:
        port = server.sockets[0].getsockname()[1]
        steps = by_name(await diagnose(agent, relay_url=f"wss://127.0.0.1:{port}/tunnel"))
    tls = steps["TLS"]
    assert tls.outcome is FAIL, format_steps(list(steps.values()))
    assert "issued by 'CN=Corporate Inspection CA'" in tls.detail
    assert tls.hint == ("a TLS-inspecting proxy (issuer 'CN=Corporate Inspection CA') is in the path: ask the "
                        "network team to exempt 127.0.0.1 from inspection, or use interception mode")
    assert (steps["auth"].outcome, steps["auth"].detail) == (SKIP, "because TLS failed")
    assert steps["TCP"].outcome is OK and handshakes == 1  # only the look at the certificate got through


async def test_revoked_site_fails_authentication_naming_the_revocation(site):
    relay, agent, _pacs = site
    relay.admin("POST", f"/api/sites/{SITE}/revoke", {})
    steps = by_name(await diagnose(agent))
    assert steps["TLS"].outcome is OK
    # The relay's Tunnel-Refused header names why; the hint names the commands for this very site.
    assert (steps["auth"].outcome, steps["auth"].detail) == (FAIL, "revoked by the relay: this site is revoked "
                                                                   "(site-revoked)")
    assert steps["auth"].hint.startswith("ask the relay operator; to rejoin, re-enroll with a new token: "
                                         f"`tunnel-relay site add {SITE}` on the relay")
    assert (steps["relay"].outcome, steps["relay"].detail) == (SKIP, "because auth failed")


async def test_a_revoked_certificate_is_named_as_such(site):
    relay, agent, _pacs = site
    serial = relay.admin("GET", f"/api/certificates?site={SITE}")["certificates"][0]["serial"]
    relay.admin("POST", f"/api/certificates/{serial}/revoke", {})
    steps = by_name(await diagnose(agent))
    assert (steps["auth"].outcome, steps["auth"].detail) == (FAIL, "revoked by the relay: this site's certificate "
                                                                   "is revoked (certificate-revoked)")


async def test_a_403_without_a_reason_keeps_the_generic_hint(tmp_path):
    """An older relay (or anything else) answering 403 without Tunnel-Refused: no claim of revocation."""
    from aiohttp import web

    from relay import pki as relay_pki
    from tunnel_link.tls import server_context

    state = tmp_path / "relay-state"
    relay_pki.init_ca(state)
    relay_pki.issue_server_cert(state, ["127.0.0.1", "localhost"])
    certs = tmp_path / "certs"
    relay_pki.issue_site_cert(state, SITE, certs)

    async def forbidden(_request: web.Request) -> web.Response:
        raise web.HTTPForbidden(text="no\n")

    app = web.Application()
    app.router.add_get("/tunnel", forbidden)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context(
        state / "relay.crt", state / "relay.key", state / "ca.crt", client_cert_optional=True)).start()
    try:
        agent_toml = tmp_path / "agent.toml"
        agent_toml.write_text("\n".join([
            f'relay_url = "wss://127.0.0.1:{port}/tunnel"', f'state_dir = "{tmp_path / "agent-state"}"',
            f'cert_file = "{certs / "agent.crt"}"', f'key_file = "{certs / "agent.key"}"',
            f'ca_file = "{certs / "ca.crt"}"', "connect_timeout = 5.0",
            "[status]", 'host = "127.0.0.1"', f"port = {free_port()}"]) + "\n")
        async with asyncio.timeout(DIAGNOSIS_TIMEOUT):
            steps = by_name(await run_diagnosis(load_agent_settings(agent_toml), NO_ENV_PROXY))
    finally:
        await runner.cleanup()
    assert (steps["auth"].outcome, steps["auth"].detail) == (FAIL, "the relay refused this certificate (403)")
    assert steps["auth"].hint.startswith("the relay refused this certificate (revoked? unknown?)")


async def test_expired_certificate_fails_cert_and_skips_authentication(site):
    relay, agent, _pacs = site
    certs = agent.root / "certs"
    now = dt.datetime.now(dt.UTC)
    pki.issue_client_cert(relay.state_dir, certs, common_name=SITE, not_valid_before=now - dt.timedelta(days=2),
                             not_valid_after=now - dt.timedelta(days=1))
    steps = by_name(await diagnose(agent))
    assert steps["cert"].outcome is FAIL and "enroll again" in steps["cert"].hint
    assert steps["TLS"].outcome is OK  # the network path is fine
    assert (steps["auth"].outcome, steps["auth"].detail) == (SKIP, "because cert failed")


def add_proxy_section(agent: AgentHandle, **keys: str) -> None:
    """Append [proxy]; the file may hold a password, so it is 0600 first."""
    agent.config.chmod(0o600)
    with agent.config.open("a") as handle:
        handle.write("\n[proxy]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items()))


async def test_through_squid_every_step_passes_with_the_proxy_step(procs, tmp_path, site):
    relay, agent, _pacs = site
    password = "pw-" + secrets.token_hex(12)
    with running_squid(procs, tmp_path / "squid", users={USER: password}) as squid:
        add_proxy_section(agent, url=f"http://{squid.address}", username=USER, password=password)
        steps = await diagnose(agent)
        target = f"127.0.0.1:{relay.tunnel_port}"
        assert [(s.name, s.outcome) for s in steps] == [
            (name, OK) for name in ["config", "cert", "DNS", "TCP", "proxy", *PASSING[4:]]], format_steps(steps)
        found = by_name(steps)
        assert f"through proxy {squid.address} (from proxy.url)" in found["config"].detail
        assert found["DNS"].detail.startswith("proxy 127.0.0.1 -> 127.0.0.1 (")
        assert f"the proxy resolves {target}" in found["DNS"].detail
        assert found["TCP"].detail.startswith(f"connected to proxy {squid.address} (")
        assert found["proxy"].detail.startswith(f"proxy {squid.address} (from proxy.url) accepted CONNECT {target}")
        assert password not in format_steps(steps) and password not in steps_json(steps)
        # squid logs a CONNECT when its tunnel ends: the TLS step's and the tunnel's, both authenticated.
        entries = wait_until(lambda: len(squid.connects(target)) >= 2 and squid.connects(target), 15,
                             message="squid's log of both CONNECTs")
        assert [(e.result, e.user) for e in entries] == [("TCP_TUNNEL/200", USER)] * 2


def test_wrong_proxy_password_fails_the_proxy_step_with_the_407_hint(procs, tmp_path, site):
    relay, agent, _pacs = site
    password, wrong = "pw-" + secrets.token_hex(12), "pw-" + secrets.token_hex(12)
    with running_squid(procs, tmp_path / "squid", users={USER: password}) as squid:
        add_proxy_section(agent, url=f"http://{squid.address}", username=USER)
        result = diagnose_cli(agent, env={"TUNNEL_AGENT_PROXY__PASSWORD": wrong})
        json_result = diagnose_cli(agent, "--json", env={"TUNNEL_AGENT_PROXY__PASSWORD": wrong})
    assert result.returncode == 1
    target = f"127.0.0.1:{relay.tunnel_port}"
    lines = result.stdout.splitlines()
    failed = next(i for i, line in enumerate(lines) if line.startswith("[FAIL] proxy "))
    assert lines[failed].split(None, 2)[2] == (
        f"proxy {squid.address} refused CONNECT {target}: 407 Proxy Authentication Required")
    assert lines[failed + 1] == "       hint: check proxy.username/password"
    assert lines[-1] == "FAILED: proxy (see the hints above)"
    steps = {s["name"]: s for s in json.loads(json_result.stdout)["steps"]}
    assert [steps[name]["outcome"] for name in ("TCP", "proxy", "TLS", "auth", "relay", "C-ECHO pacs")] == [
        "ok", "fail", "skip", "skip", "skip", "ok"]
    for output in (result.stdout + result.stderr, json_result.stdout + json_result.stderr):
        assert wrong not in output and password not in output


async def test_a_missing_certificate_is_named(tmp_path, parts):
    _relay, agent, _pacs = parts
    (agent.root / "certs" / "agent.crt").unlink()
    steps = await diagnose(agent)
    assert steps[0].outcome is FAIL
    assert steps[0].detail.endswith(f"{agent.root / 'certs' / 'agent.crt'}: No such file or directory")
    assert "tunnel-agent enroll" in steps[0].hint
