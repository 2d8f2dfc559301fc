"""Isolation: a site's certificate reaches only that site's cloud destinations, never another site's
routes or destinations; the agent dials only routes in its own config, whatever the relay asks."""

from __future__ import annotations

import aiohttp
import pytest

from relay import pki
from tests.support.dcmtk import echoscu, start_storescp, storescu
from tests.support.muxclient import raw_agent
from tests.support.ports import free_port
from tests.support.rawdicom import associate_rq, request_reject
from tests.support.stack import (
    AgentRoute,
    ListenerRoute,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)
from tunnel_core.codes import ErrorCode, TargetKind


@pytest.fixture
def two_sites(procs, tmp_path):
    ports = {name: free_port() for name in ("pacs_a", "pacs_b", "cloud_a", "cloud_b")}
    for name, port in ports.items():
        start_storescp(procs, port, name.upper(), tmp_path / name)
    relay = make_relay(
        tmp_path / "relay",
        listener_routes=[ListenerRoute("A_PACS", "site-a", "pacs"), ListenerRoute("B_PACS", "site-b", "pacs"),
                         ListenerRoute("A_SECRET", "site-a", "secret")],
        sites={"site-a": [SiteDest("A_CLOUD", ports["cloud_a"])],
               "site-b": [SiteDest("B_CLOUD", ports["cloud_b"])]})
    agent_a = make_agent(relay, "site-a", tmp_path / "agent-a", routes=[AgentRoute("pacs", ports["pacs_a"])])
    agent_b = make_agent(relay, "site-b", tmp_path / "agent-b", routes=[AgentRoute("pacs", ports["pacs_b"])])
    start_relay(procs, relay)
    return relay, agent_a, agent_b, tmp_path


def test_site_a_cannot_reach_site_b(procs, two_sites, ct_study_small):
    relay, agent_a, _agent_b, tmp = two_sites
    start_agent(procs, agent_a, relay)
    # Site B is offline: A being connected changes nothing for B's callers.
    assert request_reject(relay.dicom_port, "B_PACS", "CLOUDAI")[0] == (2, 3, 1)
    # From A's network, B's cloud destination does not exist.
    assert request_reject(agent_a.listener_port, "B_CLOUD", "MODALITY")[0] == (1, 1, 7)
    result = storescu("127.0.0.1", agent_a.listener_port, "B_CLOUD", "MODALITY", ct_study_small.files[:1])
    assert not result.ok
    assert not any((tmp / "cloud_b").iterdir())
    # A's own paths work.
    assert echoscu("127.0.0.1", relay.dicom_port, "A_PACS", "CLOUDAI").ok
    assert echoscu("127.0.0.1", agent_a.listener_port, "A_CLOUD", "MODALITY").ok


async def test_raw_streams_with_site_a_certificate(procs, two_sites):
    relay, agent_a, agent_b, tmp = two_sites
    start_agent(procs, agent_b, relay)
    # A hand-driven agent holding site A's certificate tries every way into site B.
    async with raw_agent(relay.tunnel_port, agent_a.root / "certs") as raw:
        # Agents may not name routes: routes are the relay's way into a site, never a site's way out.
        sid = await raw.open(TargetKind.ROUTE, "pacs", associate_rq("B_PACS", "CLOUDAI"))
        assert await raw.wait_reset(sid) is ErrorCode.PROTOCOL_ERROR
        # B's cloud destination is not A's.
        sid = await raw.open(TargetKind.CALLED_AE, "B_CLOUD", associate_rq("B_CLOUD", "MODALITY"))
        assert await raw.wait_reset(sid) is ErrorCode.UNKNOWN_ROUTE
        # A claim in OPEN that disagrees with the A-ASSOCIATE-RQ that follows is refused.
        sid = await raw.open(TargetKind.CALLED_AE, "A_CLOUD", associate_rq("B_CLOUD", "MODALITY"))
        assert await raw.wait_reset(sid) is ErrorCode.PROTOCOL_ERROR
        # Nor may a site speak as a peer relay on its tunnel: a listener hop toward B's route is refused.
        sid = await raw.open(TargetKind.LISTENER, "cloud", associate_rq("B_PACS", "CLOUDAI"))
        assert await raw.wait_reset(sid) is ErrorCode.PROTOCOL_ERROR
    assert not any((tmp / "cloud_b").iterdir())
    assert not any((tmp / "pacs_b").iterdir())
    # Site B's own agent is still connected and unaffected.
    assert relay.site_connected("site-b")
    assert echoscu("127.0.0.1", relay.dicom_port, "B_PACS", "CLOUDAI").ok


async def test_certificate_for_an_unconfigured_site_is_refused(procs, two_sites):
    relay, _a, _b, tmp = two_sites
    pki.issue_site_cert(relay.state_dir, "site-c", tmp / "certs-c")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        async with raw_agent(relay.tunnel_port, tmp / "certs-c"):
            pass
    assert info.value.status == 403
    assert not relay.site_connected("site-c")


def test_agent_refuses_a_route_it_does_not_have(procs, two_sites):
    relay, agent_a, _b, _tmp = two_sites
    start_agent(procs, agent_a, relay)
    # The relay's table sends A_SECRET to route "secret", which agent A never configured.
    assert request_reject(relay.dicom_port, "A_SECRET", "CLOUDAI")[0] == (1, 1, 7)
    outcomes = agent_a.status()["outcomes"]
    assert outcomes.get("refused:unknown_route") == 1, outcomes


async def test_site_a_certificate_renews_only_as_site_a(two_sites):
    relay, agent_a, _agent_b, _tmp = two_sites
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tunnel_link.tls import client_context

    key = ec.generate_private_key(ec.SECP256R1())
    # The CSR asks to be site B; the relay names the certificate after the one that authenticated.
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-b")]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    certs = agent_a.root / "certs"
    ctx = client_context(certs / "agent.crt", certs / "agent.key", certs / "ca.crt")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"https://127.0.0.1:{relay.tunnel_port}/enroll/v1/renew", json={"csr": csr},
                             ssl=ctx) as response:
            assert response.status == 200
            answer = await response.json()
    assert answer["site"] == "site-a"
    assert pki.site_from_certificate(answer["certificate"].encode()) == "site-a"


async def test_site_credentials_do_not_open_the_admin_api(two_sites):
    relay, agent_a, _agent_b, _tmp = two_sites
    import ssl

    from tunnel_link.tls import client_context

    certs = agent_a.root / "certs"
    ctx = client_context(certs / "agent.crt", certs / "agent.key", certs / "ca.crt")
    ctx.check_hostname = False
    async with aiohttp.ClientSession() as http:
        # The admin port speaks no TLS: a site certificate has nothing to present itself to.
        with pytest.raises((aiohttp.ClientConnectorError, aiohttp.ClientOSError, ssl.SSLError)):
            await http.get(f"https://127.0.0.1:{relay.admin_port}/api/status", ssl=ctx)
        site_cert = "".join((certs / "agent.crt").read_text().split())
        for path in ("/api/status", "/api/sites", "/api/certificates", "/api/audit"):
            async with http.get(f"http://127.0.0.1:{relay.admin_port}{path}",
                                headers={"Authorization": f"Bearer {site_cert}"}) as r:
                assert r.status == 401, path
        async with http.post(f"http://127.0.0.1:{relay.admin_port}/api/sites/site-b/revoke") as r:
            assert r.status == 401
    assert not any(s["revoked"] for s in relay.admin("GET", "/api/sites")["sites"])
