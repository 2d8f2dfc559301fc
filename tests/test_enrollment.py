"""Joining a site with one token, renewing, revoking and expiring certificates — real relay and agent processes.

The relay's registry decides who may connect; these tests drive it only through the product's CLI and
admin API, and watch the effect on live tunnels and DICOM traffic (dcmtk echoscu and storescp, pynetdicom).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import stat
import time
from pathlib import Path

import aiohttp
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from relay import pki
from relay.registry import Registry, serial_hex
from tests.support.dcmtk import echoscu, start_storescp
from tests.support.muxclient import raw_agent
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.stack import (
    RELAY,
    AgentRoute,
    ListenerRoute,
    SiteDest,
    _cli,
    enroll,
    enroll_agent,
    make_agent,
    make_relay,
    site_add,
    start_agent,
    start_relay,
)
from tunnel_core.token import EnrollmentToken


@pytest.fixture
def one_site(procs, tmp_path):
    """A running relay with site "st-marys" configured (routes) but not yet enrolled; a PACS behind it."""
    pacs, cloud = free_port(), free_port()
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    start_storescp(procs, cloud, "CLOUD", tmp_path / "cloud")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("SM_PACS", "st-marys", "pacs")],
                       sites={"st-marys": [SiteDest("SM_CLOUD", cloud)]})
    agent = make_agent(relay, "st-marys", tmp_path / "agent", routes=[AgentRoute("pacs", pacs)], enrolled=True)
    start_relay(procs, relay)
    return relay, agent


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_three_command_join_then_dicom_both_ways(procs, one_site):
    relay, agent = one_site
    token = enroll_agent(relay, agent)
    state = agent.root / "state"
    assert _mode(state / "agent.key") == 0o600
    assert json.loads((state / "enrollment.json").read_text())["site"] == "st-marys"
    cert = (state / "agent.crt").read_bytes()
    assert pki.site_from_certificate(cert) == "st-marys"
    lifetime = pki.certificate_not_after(cert) - dt.datetime.now(dt.UTC)
    assert lifetime <= dt.timedelta(days=30)
    start_agent(procs, agent, relay)
    assert echoscu("127.0.0.1", relay.dicom_port, "SM_PACS", "CLOUDAI").ok
    assert echoscu("127.0.0.1", agent.listener_port, "SM_CLOUD", "MODALITY").ok
    # The token's secret is nowhere but in the operator's hands: not in logs, argv or the database.
    secret = EnrollmentToken.decode(token).secret
    for proc in (relay.proc, agent.proc):
        assert secret not in proc.log_tail(10_000)
        assert secret not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
    assert secret.encode() not in (relay.state_dir / "registry.sqlite3").read_bytes()
    assert relay.admin_token not in relay.proc.log_tail(10_000)
    kinds = [c["kind"] for c in relay.admin("GET", "/api/certificates")["certificates"]]
    assert kinds == ["enroll"]


def test_token_is_single_use(one_site):
    relay, agent = one_site
    token = enroll_agent(relay, agent)
    again = enroll(agent, token, "--force")
    assert again.returncode == 1
    assert "token refused" in again.stderr
    actions = [e["action"] for e in relay.admin("GET", "/api/audit")["audit"]]
    assert "token_refused" in actions


def test_expired_token_is_refused(one_site):
    relay, agent = one_site
    token = site_add(relay, agent.site, "--ttl", "0.5")
    time.sleep(1.0)  # let the token's lifetime pass (wall clock is what expiry is about)
    result = enroll(agent, token)
    assert result.returncode == 1
    assert "token refused" in result.stderr
    assert not (agent.root / "state" / "agent.key").exists()


def test_enroll_refuses_to_replace_an_enrollment_without_force(one_site):
    relay, agent = one_site
    enroll_agent(relay, agent)
    result = enroll(agent, site_add(relay, agent.site))
    assert result.returncode == 1 and "--force" in result.stderr


def test_wrong_pinned_ca_fails_closed_and_sends_nothing(one_site, tmp_path):
    relay, agent = one_site
    token = EnrollmentToken.decode(site_add(relay, agent.site))
    other = tmp_path / "other-ca"
    pki.init_ca(other, common_name="Corporate Inspection CA")
    forged = EnrollmentToken(token.relay_url, pki.ca_fingerprint(other), token.secret).encode()
    result = enroll(agent, forged)
    assert result.returncode == 1
    assert "did not present the CA this token pins" in result.stderr
    assert "DICOM Tunnel Relay CA" in result.stderr, result.stderr  # names who issued what was presented
    # The secret never left: the genuine token still works.
    assert enroll(agent, token.encode()).returncode == 0


def test_garbage_token_is_a_usage_error(one_site):
    _relay, agent = one_site
    result = enroll(agent, "not-a-token")
    assert result.returncode == 2 and "dtun1." in result.stderr


def test_site_revoke_closes_the_live_tunnel_and_refuses_reconnects(procs, one_site):
    relay, agent = one_site
    enroll_agent(relay, agent)
    start_agent(procs, agent, relay)
    _cli(RELAY, "site", "revoke", "st-marys", "--config", str(relay.config), "--reason", "test")
    # The CLI returns after the relay closed the tunnel: no waiting needed.
    assert not relay.site_connected("st-marys")
    assert not echoscu("127.0.0.1", relay.dicom_port, "SM_PACS", "CLOUDAI").ok
    # The agent is told why (GOAWAY REVOKED) and does not come back to be refused (tests/test_revocation_agent.py).
    wait_until(lambda: agent.status()["connects"] == 1 and agent.status()["state"] == "revoked", 15,
               message=lambda: f"agent told it was revoked: {agent.status()}")
    assert not relay.site_connected("st-marys")
    log = relay.proc.log_tail(10_000)
    assert "site_revoked" in log and '"actor": "admin-api"' in log
    sites = relay.admin("GET", "/api/sites")["sites"]
    assert [s["revoked"] for s in sites if s["name"] == "st-marys"] == [True]


def test_certificate_revoke_closes_the_tunnel_using_it(procs, one_site):
    relay, agent = one_site
    enroll_agent(relay, agent)
    start_agent(procs, agent, relay)
    serial = relay.admin("GET", "/api/certificates?site=st-marys")["certificates"][0]["serial"]
    _cli(RELAY, "cert", "revoke", serial, "--config", str(relay.config))
    assert not relay.site_connected("st-marys")
    wait_until(lambda: agent.status()["state"] == "revoked", 15, message=lambda: f"agent told: {agent.status()}")


def test_revoked_site_can_be_reinstated_with_a_new_token(procs, one_site):
    relay, agent = one_site
    enroll_agent(relay, agent)
    relay.admin("POST", "/api/sites/st-marys/revoke", {})
    result = enroll(agent, site_add(relay, agent.site), "--force")
    assert result.returncode == 0, result.stderr
    start_agent(procs, agent, relay)
    assert echoscu("127.0.0.1", relay.dicom_port, "SM_PACS", "CLOUDAI").ok


def _register(relay, bundle: pki.SiteBundle, kind: str = "manual") -> None:
    registry = Registry.open(relay.state_dir)
    try:
        registry.record_certificate(serial_hex(bundle.serial), bundle.site, kind, time.time(),
                                    bundle.not_after.timestamp(), actor="test")
    finally:
        registry.close()


def _short_cert(relay, site: str, out: Path, *, age: float, left: float) -> pki.SiteBundle:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    bundle = pki.issue_client_cert(relay.state_dir, out, common_name=site,
                                      not_valid_before=now - dt.timedelta(seconds=age),
                                      not_valid_after=now + dt.timedelta(seconds=left))
    _register(relay, bundle)
    return bundle


def test_renewal_keeps_the_tunnel_and_its_associations(procs, one_site):
    relay, agent = one_site
    # A certificate 6 s old with 7 s left: renewal is due two thirds in, about 2.7 s from now, and
    # without renewal the relay would end the tunnel when it expires.
    state = agent.root / "state"
    bundle = _short_cert(relay, "st-marys", state, age=6, left=7)
    agent.config.write_text(agent.config.read_text().replace(
        f'state_dir = "{state}"', f'state_dir = "{state}"\nrelay_url = "wss://127.0.0.1:{relay.tunnel_port}/tunnel"'))
    start_agent(procs, agent, relay)
    ae = AE(ae_title="CLOUDAI")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", relay.dicom_port, ae_title="SM_PACS")
    try:
        assert assoc.is_established
        wait_until(lambda: agent.status()["renewals"] == 1, 15, message=lambda: agent.proc.log_tail())
        assert assoc.send_c_echo().Status == 0x0000
        # Past the old certificate's expiry the same tunnel and association still work.
        wait_until(lambda: time.time() > bundle.not_after.timestamp() + 2.5, 15, message="old cert expired")
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert agent.status()["connects"] == 1
    site = next(s for s in relay.status()["sites"] if s["name"] == "st-marys")
    assert site["connected"] and site["certificate_serial"] != serial_hex(bundle.serial)
    assert pki.certificate_serial((state / "agent.crt").read_bytes()) != bundle.serial
    assert _mode(state / "agent.key") == 0o600
    kinds = [c["kind"] for c in relay.admin("GET", "/api/certificates")["certificates"]]
    assert kinds == ["manual", "renew"]


async def test_certificate_expiring_mid_session_ends_it(one_site, tmp_path):
    relay, _agent = one_site
    certs = tmp_path / "short"
    bundle = _short_cert(relay, "st-marys", certs, age=60, left=3)
    async with raw_agent(relay.tunnel_port, certs) as raw:
        assert relay.site_connected("st-marys")
        async with asyncio.timeout(15):
            while (await raw.ws.receive()).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                pass
    assert time.time() >= bundle.not_after.timestamp()

    def reason() -> str:
        return next(s for s in relay.status()["sites"] if s["name"] == "st-marys")["last_disconnect_reason"]
    wait_until(lambda: "expired" in reason(), 5, message="relay records why it closed the tunnel")


async def test_certificate_unknown_to_the_registry_is_refused(one_site, tmp_path):
    relay, _agent = one_site
    # Signed by the relay CA but never recorded (e.g. a registry restored from an old backup).
    now = dt.datetime.now(dt.UTC)
    pki.issue_client_cert(relay.state_dir, tmp_path / "ghost", common_name="st-marys",
                             not_valid_before=now - dt.timedelta(minutes=1),
                             not_valid_after=now + dt.timedelta(days=1))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with raw_agent(relay.tunnel_port, tmp_path / "ghost"):
            pass
    assert refused.value.status == 403
    assert "not issued through this relay's registry" in relay.proc.log_tail()


async def test_tunnel_without_client_certificate_is_refused(one_site):
    relay, _agent = one_site
    ctx = pki_client_context_without_cert(relay.state_dir / "ca.crt")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"wss://127.0.0.1:{relay.tunnel_port}/tunnel", ssl=ctx)
        assert refused.value.status == 403
        # Renewal needs a certificate too.
        async with http.post(f"https://127.0.0.1:{relay.tunnel_port}/enroll/v1/renew", json={"csr": "x"},
                             ssl=ctx) as response:
            assert response.status == 403


def pki_client_context_without_cert(ca: Path):
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca))
    return ctx


def test_admin_api_requires_its_token(one_site):
    relay, _agent = one_site
    import urllib.error

    for method, path in (("GET", "/api/status"), ("GET", "/api/sites"), ("POST", "/api/sites"),
                         ("POST", "/api/sites/st-marys/revoke"), ("GET", "/api/certificates"),
                         ("GET", "/api/audit")):
        with pytest.raises(urllib.error.HTTPError) as denied:
            relay.admin(method, path, {"name": "evil"} if method == "POST" else None, token="wrong")
        assert denied.value.code == 401, path
    assert _mode(relay.state_dir / "admin.token") == 0o600
    assert _mode(relay.state_dir / "registry.sqlite3") == 0o600
    assert not relay.admin("GET", "/api/sites")["sites"][0]["revoked"]


def test_key_files_are_private_whatever_the_umask(one_site):
    relay, agent = one_site
    old = os.umask(0)
    try:
        enroll_agent(relay, agent)
    finally:
        os.umask(old)
    assert _mode(agent.root / "state" / "agent.key") == 0o600


# --- throttling and the CSR check (issue 10) -------------------------------------------------------------

BAD_TOKENS = 1000
ENROLL_BURST, ENROLL_PER_MINUTE = 20, 6.0  # the [enrollment.rate_limit] defaults this relay runs with


def _csr_pem(key=None) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whoever")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _tampered_csr_pem() -> str:
    """A well-formed CSR whose subject was changed after signing: it parses, its signature does not verify."""
    import base64

    der = bytearray(base64.b64decode("".join(_csr_pem().splitlines()[1:-1])))
    der[der.index(b"whoever")] ^= 0x01
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def _pinned(relay):
    import ssl

    return ssl.create_default_context(cafile=str(relay.state_dir / "ca.crt"))


def _enroll_client(relay, source: str) -> aiohttp.ClientSession:
    """HTTPS to the relay's tunnel port from ``source`` (a 127.0.0.0/8 address), trusting only the relay CA."""
    connector = aiohttp.TCPConnector(ssl=_pinned(relay), local_addr=(source, 0))
    return aiohttp.ClientSession(f"https://127.0.0.1:{relay.tunnel_port}", connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=10))


def _audit_count(relay, action: str) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{relay.state_dir / 'registry.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM audit WHERE action = ?", (action,)).fetchone()[0]
    finally:
        db.close()


def _metric(relay, name: str, **labels: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{want} not in /metrics:\n{text}")


async def test_a_thousand_bad_tokens_from_one_source_are_throttled_and_another_source_still_enrolls(one_site):
    relay, agent = one_site
    csr = _csr_pem()
    statuses: list[int] = []
    started = time.monotonic()
    async with asyncio.timeout(180), _enroll_client(relay, "127.0.0.2") as http:
        for i in range(BAD_TOKENS):
            async with http.post("/enroll/v1/certificate", json={"token": f"guess-{i}", "csr": csr}) as r:
                await r.read()
                statuses.append(r.status)
                if r.status == 429:
                    assert int(r.headers["Retry-After"]) >= 1
        elapsed = time.monotonic() - started
        # The same source is throttled at every enrollment endpoint, before anything is done for it.
        async with http.post("/enroll/v1/renew", json={"csr": csr}) as r:
            assert r.status == 429
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect("/enroll/v1/inner")
        assert refused.value.status == 429
        async with http.get("/enroll/v1/ca") as r:  # public and cheap: never throttled
            assert r.status == 200
    answered = statuses.count(403)
    throttled = statuses.count(429)
    assert set(statuses) == {403, 429}
    # At least the burst was answered, at most the burst plus what refilled while the loop ran.
    assert ENROLL_BURST <= answered <= ENROLL_BURST + ENROLL_PER_MINUTE / 60 * elapsed + 1
    assert throttled == BAD_TOKENS - answered
    # Throttled attempts leave no audit row and no log line of their own; they are counted in metrics.
    assert _audit_count(relay, "token_refused") == answered
    log = relay.proc.log_text()
    assert log.count("enrollment from 127.0.0.2 refused") == answered
    assert _metric(relay, "dicom_tunnel_throttled_total", endpoint="enroll") == throttled + 2
    wait_until(lambda: "enrollment attempts from 127.0.0.2" in relay.proc.log_text(), 10,
               message="the relay logs one summary line for the throttled source")
    summaries = [line for line in relay.proc.log_text().splitlines() if "throttled" in line and "127.0.0.2" in line]
    assert 1 <= len(summaries) <= 2, summaries  # once an interval, whatever the number of attempts
    # A good token from another source (the agent's enroll dials from 127.0.0.1) still enrolls.
    result = enroll(agent, site_add(relay, agent.site))
    assert result.returncode == 0, result.stderr
    assert _audit_count(relay, "token_redeemed") == 1


async def test_a_bad_csr_leaves_the_token_usable(one_site):
    from cryptography.hazmat.primitives.asymmetric import rsa

    relay, agent = one_site
    token = site_add(relay, agent.site)
    secret = EnrollmentToken.decode(token).secret
    tampered = _tampered_csr_pem()
    weak = _csr_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    async with asyncio.timeout(60), _enroll_client(relay, "127.0.0.1") as http:
        for csr in ("garbage", "", tampered, weak, "-----BEGIN CERTIFICATE REQUEST-----\n\ud800\n"):
            async with http.post("/enroll/v1/certificate", json={"token": secret, "csr": csr}) as r:
                answer = await r.json()
                assert r.status == 400, (csr[:40], answer)
    assert _audit_count(relay, "token_redeemed") == 0
    result = enroll(agent, token)  # the same token, now with the agent's own good CSR
    assert result.returncode == 0, result.stderr
    assert _audit_count(relay, "token_redeemed") == 1


# --- whose relay URL is dialled (issue 10) ----------------------------------------------------------------


def test_the_tokens_relay_url_is_dialled_unless_the_config_sets_one(procs, one_site):
    import subprocess

    from tests.support.stack import AGENT

    relay, agent = one_site
    enroll_agent(relay, agent)
    enrolled = f"wss://127.0.0.1:{relay.tunnel_port}/tunnel"
    assert not any(line.startswith("relay_url") for line in agent.config.read_text().splitlines())
    start_agent(procs, agent, relay)  # relay_url unset: the token's URL
    assert agent.status()["relay_url"] == enrolled
    agent.proc.stop()
    # Set explicitly (a relay that moved; here nothing listens there), it wins, and the mismatch is named.
    elsewhere = f"wss://127.0.0.1:{free_port()}/tunnel"
    agent.config.write_text(f'relay_url = "{elsewhere}"\n' + agent.config.read_text())
    start_agent(procs, agent, wait_connected=False)
    wait_until(lambda: agent.status()["state"] == "backoff" and agent.status()["connects"] == 0, 15,
               message=lambda: f"agent dials {elsewhere}: {agent.status()}")
    assert agent.status()["relay_url"] == elsewhere
    assert f"is not the relay this host enrolled with ({enrolled})" in agent.proc.log_text()
    result = subprocess.run([AGENT, "diagnose", "--config", str(agent.config), "--json"], capture_output=True,
                            text=True, timeout=90, env={**os.environ, "HTTPS_PROXY": "", "https_proxy": ""})
    config = json.loads(result.stdout)["steps"][0]
    assert (config["name"], config["outcome"]) == ("config", "warn"), config
    assert config["detail"].startswith(f"relay {elsewhere} (set in the config)")
    assert "Remove relay_url" in config["hint"]
