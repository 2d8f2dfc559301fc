"""Cross-relay routing (issue 13, item 2): a cloud caller that lands on a relay without the site's tunnel is
carried, one hop, to the relay that holds it, over a mutual-TLS peer connection with relay certificates
from the fleet's CA. With no path anywhere the caller hears 2/3/1 at once. A site's certificate can never
pass for a relay's, nor a relay's for a site's. Real relays on a real PostgreSQL, a real agent, dcmtk.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import urllib.request

import aiohttp
import pytest

from devkit.fleet import make_fleet
from relay import pki
from tests.support.dcmtk import echoscu, start_storescp, storescu
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.rawdicom import request_reject
from tests.support.stack import AgentRoute, ListenerRoute, enroll_agent, make_agent, start_agent, start_relay
from tunnel_core.discovery import AGENT_HEADER, FLEET_HEADER, FLEET_LIST_PATH, parse_fleet
from tunnel_link.tls import client_context
from tunnel_link.transport import SUBPROTOCOLS

SITE = "st-marys"


@pytest.fixture
def fleet(procs, postgres, tmp_path):
    """Relays a and b on one registry; the site's agent connected to relay b only; a PACS behind it."""
    pacs = free_port()
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    relays = make_fleet(tmp_path / "fleet", postgres, ("a", "b"), sites={SITE: []},
                        listener_routes=[ListenerRoute("SM_PACS", SITE, "pacs", ["CLOUDAI"])])
    for name, relay in relays.items():
        start_relay(procs, relay, name=f"relay-{name}")
    agent = make_agent(relays["b"], SITE, tmp_path / "agent", routes=[AgentRoute("pacs", pacs)], enrolled=True,
                       heartbeat=1.0, sections=["[fleet]", "tunnels = 1"])  # relay b's alone
    enroll_agent(relays["b"], agent)
    start_agent(procs, agent, relays["b"])
    wait_until(lambda: relays["a"].admin("GET", "/api/fleet")["presence"].get(SITE) == ["relay-b"], 10.0,
               message="relay a to see relay b holding the site's tunnel")
    return relays["a"], relays["b"], agent, tmp_path / "pacs"


def _completed(relay, direction: str) -> int:
    """Associations the relay finished as completed in ``direction``, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = rf'^dicom_tunnel_associations_total{{direction="{direction}",outcome="completed"}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def test_a_caller_on_the_relay_without_the_tunnel_is_carried_to_the_one_that_has_it(procs, fleet, ct_study_small):
    relay_a, relay_b, _agent, received = fleet
    assert not relay_a.site_connected(SITE)
    echo = echoscu("127.0.0.1", relay_a.dicom_port, "SM_PACS", "CLOUDAI")
    assert echo.ok, echo.stderr
    sent = storescu("127.0.0.1", relay_a.dicom_port, "SM_PACS", "CLOUDAI", ct_study_small.files)
    assert sent.ok, sent.stderr
    stored = len(ct_study_small.files)
    wait_until(lambda: len(list(received.iterdir())) >= stored, 10.0, message="the PACS to hold the instances")
    # Relay a counts them as its callers', relay b as hops it carried to its tunnel.
    wait_until(lambda: _completed(relay_b, "peer-to-site") == 2, 10.0, message="relay b to count the two hops")
    assert _completed(relay_a, "cloud-to-site") == 2 and _completed(relay_a, "peer-to-site") == 0
    # A caller relay a refuses itself is refused as it always was, and one relay b refuses, as relay b would.
    assert request_reject(relay_a.dicom_port, "SM_PACS", "INTRUDER")[0] == (1, 1, 3)
    assert request_reject(relay_a.dicom_port, "NO_SUCH_AE", "CLOUDAI")[0] == (1, 1, 7)


def test_with_no_tunnel_anywhere_the_caller_hears_2_3_1_at_once(procs, fleet):
    relay_a, relay_b, agent, _received = fleet
    procs.stop(agent.proc)
    wait_until(lambda: not relay_b.site_connected(SITE), 10.0, message="relay b to lose the site's tunnel")
    wait_until(lambda: SITE not in relay_a.admin("GET", "/api/fleet")["presence"], 10.0,
               message="relay b to withdraw the site's presence")
    for relay in (relay_a, relay_b):
        reject, elapsed = request_reject(relay.dicom_port, "SM_PACS", "CLOUDAI")
        assert reject == (2, 3, 1) and elapsed < 1.0


async def test_the_tunnel_upgrade_tells_the_agent_the_fleet_answering_relay_first(procs, fleet):
    relay_a, relay_b, agent, _received = fleet
    state = agent.root / "state"
    context = client_context(state / "agent.crt", state / "agent.key", relay_a.state_dir / pki.CA_CERT)
    wait_until(lambda: {r["name"]: r["tunnel_url"] for r in relay_a.admin("GET", "/api/fleet")["relays"]}
               == {"relay-a": relay_a.url, "relay-b": relay_b.url}, 10.0, message="both relays announced")
    runs: dict[str, dict[str, str]] = {}
    async with aiohttp.ClientSession() as http:
        for relay, other in ((relay_a, relay_b), (relay_b, relay_a)):
            deadline = time.monotonic() + 5.0
            while True:  # the answering relay reads the fleet once a second
                async with http.ws_connect(relay.url, ssl=context, headers={AGENT_HEADER: "probe"},
                                           protocols=SUBPROTOCOLS) as ws:
                    listed = parse_fleet(ws._response.headers[FLEET_HEADER])
                if len(listed) == 2 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert [(e.url, e.state) for e in listed] == [(relay.url, "serving"), (other.url, "serving")]
            assert listed[0].zone != listed[1].zone
            runs[relay.url] = {e.url: e.since for e in listed}
        # The same list as a body, for an agent whose lists went stale: a site certificate only.
        async with http.get(f"https://127.0.0.1:{relay_a.tunnel_port}{FLEET_LIST_PATH}", ssl=context) as answer:
            assert answer.status == 200
            assert {e.url for e in parse_fleet(await answer.text())} == {relay_a.url, relay_b.url}
        bare = ssl.create_default_context(cafile=relay_a.state_dir / pki.CA_CERT)  # no client certificate
        async with http.get(f"https://127.0.0.1:{relay_a.tunnel_port}{FLEET_LIST_PATH}", ssl=bare) as answer:
            assert answer.status == 403
    # Each relay's run token is the same on every relay's list.
    assert runs[relay_a.url] == runs[relay_b.url] and all(runs[relay_a.url].values())


async def _upgrade(url: str, context: ssl.SSLContext) -> int:
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(url, ssl=context, timeout=aiohttp.ClientWSTimeout(ws_close=5)):
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


async def test_a_site_certificate_is_no_relay_and_a_relay_certificate_no_site(procs, fleet, tmp_path):
    relay_a, relay_b, agent, _received = fleet
    state = agent.root / "state"
    site_ctx = client_context(state / "agent.crt", state / "agent.key", relay_a.state_dir / pki.CA_CERT)
    assert await _upgrade(f"wss://127.0.0.1:{relay_b.tunnel_port}/fleet/v1/peer", site_ctx) == 403

    peer_dir = tmp_path / "peer"
    peer_dir.mkdir()
    for file in (pki.CA_CERT, pki.CA_KEY):
        (peer_dir / file).write_bytes((relay_a.state_dir / file).read_bytes())
    pki.issue_peer_cert(peer_dir, "relay-x")
    relay_ctx = client_context(peer_dir / pki.PEER_CERT, peer_dir / pki.PEER_KEY, peer_dir / pki.CA_CERT)
    assert await _upgrade(f"wss://127.0.0.1:{relay_b.tunnel_port}/tunnel", relay_ctx) == 403
    assert await _upgrade(f"wss://127.0.0.1:{relay_b.tunnel_port}/fleet/v1/peer", relay_ctx) == 101
