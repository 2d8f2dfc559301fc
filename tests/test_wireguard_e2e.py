"""The WireGuard transport end to end, in network namespaces this test creates (tests/support/netns.py).

Topology (one lab per test):

    cloud namespace                                     hospital namespace (firewall: no inbound new)
    findscu/movescu ─► relay :11112 "HOSP_PACS"         agent ─► Orthanc :4242 (route "pacs")
    storescp CLOUD :11120, AI :11121  ◄── relay ◄══ mux WebSocket inside WireGuard ══ agent :11113 ◄─ storescu
    relay wg <10.99.n.1>, udp 51820, tunnel port 8444   agent wg <10.99.n.2>, outbound UDP only

The agent registers its WireGuard key over the relay's TLS port, brings its interface up and opens the
usual mux WebSocket through it; the relay knows the site by the WireGuard source address. Every process
is ended by its PID and every namespace deleted (the lab also fails the test if a wireguard-go socket is
left behind, so the agent's clean teardown is checked on every run).

Prerequisites: root, /dev/net/tun, ip, nft, wg, wireguard-go (tests.support.netns.require_lab), dcmtk and
Orthanc. Under CI=true a missing one fails; elsewhere the test is skipped and says why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.support.dcmtk import require_binary
from tests.support.netns import HospitalFirewall, NetnsLab, SitePair, open_lab
from tests.support.orthanc import orthanc_config
from tests.support.procs import ManagedProcess, wait_until
from tests.support.stack import AGENT, RELAY
from tunnel_wireguard.dump import parse_dump
from tunnel_wireguard.keys import public_key_of

SITE = "hospital-a"
RELAY_AE, ORTHANC_AE, CLOUD_AE, AI_AE = "HOSP_PACS", "ORTHANC", "CLOUD", "AI"
CALLER_AE, MODALITY_AE = "CLOUDAI", "MODALITY"
# Fixed ports: every namespace is new, so nothing else listens there.
TLS_PORT, ADMIN_PORT, RELAY_DICOM, WG_UDP, WG_TCP = 8443, 8081, 11112, 51820, 8444
CLOUD_SCP, AI_SCP = 11120, 11121
AGENT_STATUS, AGENT_LISTENER = 8082, 11113
ORTHANC_DICOM, ORTHANC_HTTP = 4242, 8042
HEARTBEAT = 2.0  # a dead tunnel is noticed after three silent intervals
FALLBACK_AFTER = 5.0
RETRY_INTERVAL = 5.0
TOOL_TIMEOUT = 30.0
WAIT = 60.0  # bound on each wait for a state change; generous, speed is not tested


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NetnsLab]:
    with open_lab(request, tmp_path) as built:
        yield built


# --- running things inside a namespace -----------------------------------------------------------------


def ns_exec(ns: str, argv: Sequence[str], *, timeout: float = TOOL_TIMEOUT,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``ns`` and return the finished process (no exception on a non-zero exit)."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1", **(env or {})},
                          check=False)


_CONNECT = textwrap.dedent(
    """
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
        print("open")
    except OSError as exc:
        print("closed", type(exc).__name__)
    """
)


def connects(ns: str, host: str, port: int, timeout: float = 3.0) -> bool:
    """Does a TCP connect from ``ns`` to host:port succeed within ``timeout``?"""
    done = ns_exec(ns, [sys.executable, "-c", _CONNECT, host, str(port), str(timeout)], timeout=timeout + 15)
    return done.stdout.startswith("open")


def link_names(ns: str) -> list[str]:
    out = ns_exec(ns, ["ip", "-o", "link", "show"]).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


# --- the stack ------------------------------------------------------------------------------------------


@dataclass
class Site:
    lab: NetnsLab
    pair: SitePair
    firewall: HospitalFirewall
    root: Path
    relay_config: Path
    agent_config: Path
    relay_if: str
    agent_if: str
    relay_wg_ip: str
    agent_wg_ip: str
    study_uid: str
    files: list[Path]
    relay: ManagedProcess | None = None
    agent: ManagedProcess | None = None

    # -- processes --

    def start_agent(self) -> ManagedProcess:
        self.agent = self.lab.spawn(self.pair.hospital, [AGENT, "run", "--config", str(self.agent_config)],
                                    name="agent")
        return self.agent

    def agent_status(self) -> dict:
        done = ns_exec(self.pair.hospital, [AGENT, "status", "--json", "--config", str(self.agent_config)])
        return json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}

    def relay_site(self) -> dict:
        done = ns_exec(self.pair.cloud, [RELAY, "sites", "--json", "--config", str(self.relay_config)])
        if done.returncode != 0 or not done.stdout.strip():
            return {}
        sites = json.loads(done.stdout)
        sites = sites.get("sites", sites) if isinstance(sites, dict) else sites
        return next((s for s in sites if s.get("name") == SITE), {})

    def wait_transport(self, transport: str) -> dict:
        """Wait until the agent is connected over ``transport`` and the relay agrees; the agent's status."""
        relay_view = "wireguard" if transport == "wireguard" else "websocket"

        def there() -> dict | None:
            status = self.agent_status()
            if status.get("state") != "connected" or status.get("transport") != transport:
                return None
            site = self.relay_site()
            return status if site.get("connected") and site.get("transport") == relay_view else None

        return wait_until(there, WAIT, interval=0.25, message=lambda: (
            f"the agent connected over {transport}: agent {self.agent_status()} relay {self.relay_site()}\n"
            f"{self.agent.describe() if self.agent else ''}"))

    # -- DICOM --

    def findscu(self) -> list[pydicom.Dataset]:
        """C-FIND at the relay from the cloud namespace; the study-level answers."""
        out = self.root / f"find-{os.urandom(3).hex()}"
        out.mkdir()
        args = ["-aet", CALLER_AE, "-aec", RELAY_AE, "-to", "10", "-ta", "10", "-S", "-X", "-od", str(out),
                "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "NumberOfStudyRelatedInstances",
                "127.0.0.1", str(RELAY_DICOM)]
        done = ns_exec(self.pair.cloud, [require_binary("findscu"), *args])
        assert done.returncode == 0, f"findscu failed: {done.stdout}{done.stderr}"
        return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]

    def find_fails(self) -> bool:
        args = ["-aet", CALLER_AE, "-aec", RELAY_AE, "-to", "10", "-ta", "10", "-S",
                "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "127.0.0.1", str(RELAY_DICOM)]
        return ns_exec(self.pair.cloud, [require_binary("findscu"), *args]).returncode != 0

    def movescu(self) -> None:
        args = ["-aet", CALLER_AE, "-aec", RELAY_AE, "-aem", CLOUD_AE, "-to", "10", "-ta", "10", "-S",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={self.study_uid}",
                "127.0.0.1", str(RELAY_DICOM)]
        done = ns_exec(self.pair.cloud, [require_binary("movescu"), *args], timeout=120)
        assert done.returncode == 0, f"movescu failed: {done.stdout}{done.stderr}"

    def modality_store(self) -> None:
        """A modality in the hospital sends the study to the cloud's AI SCP through the agent's listener."""
        args = ["-aet", MODALITY_AE, "-aec", AI_AE, "-to", "10", "-ta", "10", "127.0.0.1", str(AGENT_LISTENER)]
        done = ns_exec(self.pair.hospital, [require_binary("storescu"), *args, *map(str, self.files)], timeout=120)
        assert done.returncode == 0, f"storescu failed: {done.stdout}{done.stderr}"

    def received(self, scp: str) -> int:
        return len(list((self.root / scp).iterdir()))

    def relay_peers(self) -> set[str]:
        dump = ns_exec(self.pair.cloud, ["wg", "show", self.relay_if, "dump"])
        assert dump.returncode == 0, dump.stderr
        return {peer.public_key for peer in parse_dump(dump.stdout).peers}

    @property
    def agent_public_key(self) -> str:
        return public_key_of(self.root / "agent" / "state" / "wg.key")


def build_site(lab: NetnsLab, tmp_path: Path, files: list[Path], study_uid: str) -> Site:
    """Namespaces, firewall, cloud SCPs, Orthanc (seeded), the relay with WireGuard, and the agent."""
    for tool in ("findscu", "movescu", "storescu", "storescp", "Orthanc"):
        require_binary(tool)
    pair = lab.site_pair()
    firewall = HospitalFirewall(lab, pair.hospital).install()
    root = tmp_path / "site"
    root.mkdir()
    n = pair.index
    site = Site(lab, pair, firewall, root, root / "relay.toml", root / "agent.toml", lab.ifname("r"),
                lab.ifname("a"), f"10.99.{n}.1", f"10.99.{n}.2", study_uid, files)

    for ae, port in ((CLOUD_AE, CLOUD_SCP), (AI_AE, AI_SCP)):
        (root / ae).mkdir()
        scp = lab.spawn(pair.cloud, [require_binary("storescp"), "--bit-preserving", "-aet", ae, "-od",
                                     str(root / ae), str(port)], name=f"storescp-{ae}", env={"TCP_NODELAY": "1"})
        wait_until(lambda p=port, s=scp: s.running and connects(pair.cloud, "127.0.0.1", p, 1.0), 20,
                   interval=0.1, message=f"storescp {ae} in the cloud namespace")
    start_orthanc_in(lab, pair.hospital, root / "orthanc", files)

    write_relay(site)
    cli(RELAY, "ca", "init", "--config", str(site.relay_config), "--hostname", pair.cloud_ip)
    cli(RELAY, "site", "cert", SITE, "--config", str(site.relay_config), "--out", str(root / "certs"))
    site.relay = lab.spawn(pair.cloud, [RELAY, "serve", "--config", str(site.relay_config)], name="relay")
    wait_until(lambda: connects(pair.cloud, "127.0.0.1", RELAY_DICOM, 1.0) or not site.relay.running, 30,
               interval=0.1, message="the relay's DICOM listener")
    assert site.relay.running, site.relay.describe()
    write_agent(site)
    site.start_agent()
    return site


def start_orthanc_in(lab: NetnsLab, ns: str, work: Path, files: list[Path]) -> ManagedProcess:
    """Orthanc in the hospital namespace, C-MOVE destination CLOUD = the agent's listener; seeded with files."""
    work.mkdir()
    config = orthanc_config(work, aet=ORTHANC_AE, dicom_port=ORTHANC_DICOM, http_port=ORTHANC_HTTP,
                            modalities={"cloud": (CLOUD_AE, "127.0.0.1", AGENT_LISTENER)})
    (work / "orthanc.json").write_text(json.dumps(config, indent=2))
    proc = lab.spawn(ns, [require_binary("Orthanc"), str(work / "orthanc.json")], name="orthanc")
    wait_until(lambda: connects(ns, "127.0.0.1", ORTHANC_DICOM, 1.0) or not proc.running, 30, interval=0.1,
               message="Orthanc's DICOM port")
    assert proc.running, proc.describe()
    args = ["-aet", MODALITY_AE, "-aec", ORTHANC_AE, "127.0.0.1", str(ORTHANC_DICOM), *map(str, files)]
    done = ns_exec(ns, [require_binary("storescu"), *args], timeout=120)
    assert done.returncode == 0, f"seeding Orthanc failed: {done.stdout}{done.stderr}"
    return proc


def write_relay(site: Site) -> None:
    pair = site.pair
    site.relay_config.write_text(textwrap.dedent(f"""\
        state_dir = "{site.root / 'relay-state'}"
        [tunnel]
        host = "{pair.cloud_ip}"
        port = {TLS_PORT}
        heartbeat_interval = {HEARTBEAT}
        [admin]
        host = "127.0.0.1"
        port = {ADMIN_PORT}
        [wireguard]
        enabled = true
        interface = "{site.relay_if}"
        listen_port = {WG_UDP}
        address = "{site.relay_wg_ip}/24"
        tunnel_port = {WG_TCP}
        endpoint = "{pair.cloud_ip}:{WG_UDP}"
        [[listeners]]
        name = "cloud"
        host = "127.0.0.1"
        port = {RELAY_DICOM}
        [[listeners.routes]]
        called_ae = "{RELAY_AE}"
        site = "{SITE}"
        route = "pacs"
        allowed_calling_aes = ["{CALLER_AE}"]
        [[sites]]
        name = "{SITE}"
        [[sites.destinations]]
        called_ae = "{CLOUD_AE}"
        host = "127.0.0.1"
        port = {CLOUD_SCP}
        allowed_calling_aes = ["{ORTHANC_AE}"]
        [[sites.destinations]]
        called_ae = "{AI_AE}"
        host = "127.0.0.1"
        port = {AI_SCP}
        allowed_calling_aes = ["{MODALITY_AE}"]
        """))


def write_agent(site: Site) -> None:
    certs = site.root / "certs"
    site.agent_config.write_text(textwrap.dedent(f"""\
        state_dir = "{site.root / 'agent' / 'state'}"
        relay_url = "wss://{site.pair.cloud_ip}:{TLS_PORT}/tunnel"
        cert_file = "{certs / 'agent.crt'}"
        key_file = "{certs / 'agent.key'}"
        ca_file = "{certs / 'ca.crt'}"
        transport = "wireguard"
        heartbeat_interval = {HEARTBEAT}
        backoff_initial = 0.1
        backoff_max = 1.0
        connect_timeout = 5.0
        [status]
        host = "127.0.0.1"
        port = {AGENT_STATUS}
        [listener]
        host = "127.0.0.1"
        port = {AGENT_LISTENER}
        [wireguard]
        interface = "{site.agent_if}"
        fallback_after = {FALLBACK_AFTER}
        retry_interval = {RETRY_INTERVAL}
        [[routes]]
        name = "pacs"
        host = "127.0.0.1"
        port = {ORTHANC_DICOM}
        called_ae = "{ORTHANC_AE}"
        """))


def cli(*argv: str) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{argv!r} failed: {done.stdout}{done.stderr}"


@pytest.fixture
def site(lab: NetnsLab, tmp_path: Path, ct_study_small) -> Site:
    return build_site(lab, tmp_path, list(ct_study_small.files), ct_study_small.study_uid)


# --- the tests ------------------------------------------------------------------------------------------


def test_dicom_both_ways_over_wireguard_with_no_inbound_connection(site: Site) -> None:
    status = site.wait_transport("wireguard")
    assert status["transport_reason"] == ""
    assert site.agent_if in link_names(site.pair.hospital)
    assert site.agent_public_key in site.relay_peers()

    # Cloud -> hospital: C-FIND and C-MOVE at the relay reach Orthanc behind the agent.
    answers = site.findscu()
    assert [a.StudyInstanceUID for a in answers] == [site.study_uid]
    assert int(answers[0].NumberOfStudyRelatedInstances) == len(site.files)
    site.movescu()  # Orthanc's sub-association goes out through the agent's listener to the cloud SCP
    assert site.received(CLOUD_AE) == len(site.files)
    # Hospital -> cloud: a modality's C-STORE through the agent.
    site.modality_store()
    assert site.received(AI_AE) == len(site.files)

    # Every packet that came in was a reply to something the hospital sent; nothing new was accepted.
    counters = site.firewall.counters()
    assert counters["inbound_new_drops"].packets == 0, counters
    assert counters["inbound_established"].packets > 0
    # The relay's WireGuard port is the only thing the hospital talks to besides the TLS port, and the
    # cloud cannot open a connection to the hospital itself: the firewall drops and counts it.
    assert not connects(site.pair.cloud, site.pair.hospital_ip, ORTHANC_DICOM)
    assert site.firewall.counter("inbound_new_drops").packets > 0

    # WireGuard health in the agent's status, from `wg show dump`.
    def health() -> dict | None:
        wg = site.agent_status().get("wireguard") or {}
        return wg if wg.get("latest_handshake_age_s") is not None and (wg.get("rx_bytes") or 0) > 0 else None

    wg = wait_until(health, WAIT, interval=0.5, message="WireGuard health in the agent's status")
    assert wg["endpoint"] == f"{site.pair.cloud_ip}:{WG_UDP}" and wg["tx_bytes"] > 0
    assert wg["address"] == f"{site.agent_wg_ip}/24" and wg["relay_address"] == site.relay_wg_ip
    cached = json.loads((site.root / "agent" / "state" / "wireguard.json").read_text())
    assert cached["public_key"] == site.agent_public_key

    # A clean exit removes the interface (and, userspace, wireguard-go and its socket).
    assert site.agent is not None
    assert site.agent.stop() == 0, site.agent.describe()
    assert site.agent_if not in link_names(site.pair.hospital)
    assert not Path(f"/var/run/wireguard/{site.agent_if}.sock").exists()


def test_blocked_udp_falls_back_to_the_websocket_and_comes_back(site: Site) -> None:
    site.wait_transport("wireguard")
    assert len(site.findscu()) == 1

    site.firewall.block_udp()
    status = site.wait_transport("websocket (fallback)")
    assert "WireGuard" in status["transport_reason"] and "UDP" in status["transport_reason"], status
    assert site.firewall.counter("udp_out_drops").packets > 0
    # DICOM keeps working, both ways, over the fallback.
    assert [a.StudyInstanceUID for a in site.findscu()] == [site.study_uid]
    site.modality_store()
    assert site.received(AI_AE) == len(site.files)

    site.firewall.unblock_udp()
    status = site.wait_transport("wireguard")  # the probe answers; the idle fallback session is closed
    assert status["transport_reason"] == ""
    assert [a.StudyInstanceUID for a in site.findscu()] == [site.study_uid]


def test_removing_the_peer_cuts_traffic_and_the_agent_recovers(site: Site) -> None:
    site.wait_transport("wireguard")
    assert connects(site.pair.hospital, site.relay_wg_ip, WG_TCP), "the probe below must be able to succeed"

    # The relay drops the site's peer: nothing passes through WireGuard any more, at once.
    ns_exec(site.pair.cloud, ["wg", "set", site.relay_if, "peer", site.agent_public_key, "remove"]).check_returncode()
    assert not connects(site.pair.hospital, site.relay_wg_ip, WG_TCP)
    # The agent notices the dead tunnel, falls back, and its next registration restores the peer.
    site.wait_transport("websocket (fallback)")
    assert len(site.findscu()) == 1
    site.wait_transport("wireguard")
    assert site.agent_public_key in site.relay_peers()
    assert len(site.findscu()) == 1


def test_crash_leftover_is_recovered_and_revocation_cuts_the_site(site: Site) -> None:
    site.wait_transport("wireguard")
    assert site.agent is not None
    site.agent.kill(signal.SIGKILL)  # no teardown: the interface (and a wireguard-go) stay behind
    site.agent.wait(timeout=10)
    assert site.agent_if in link_names(site.pair.hospital)

    site.start_agent()  # the cached registration, and the stale interface removed and made again
    site.wait_transport("wireguard")
    assert len(site.findscu()) == 1

    done = ns_exec(site.pair.cloud, [RELAY, "site", "revoke", SITE, "--config", str(site.relay_config), "--json"])
    assert done.returncode == 0, done.stderr
    wait_until(lambda: site.agent_public_key not in site.relay_peers(), WAIT, interval=0.25,
               message="the relay to remove the revoked site's peer")
    assert not connects(site.pair.hospital, site.relay_wg_ip, WG_TCP)
    wait_until(site.find_fails, WAIT, interval=0.5, message="DICOM to the revoked site to fail")
    # The relay sends GOAWAY REVOKED through the tunnel before it removes the peer (or, if that is lost,
    # the WebSocket fallback is refused with Tunnel-Refused): either way the agent knows it was revoked.
    wait_until(lambda: site.agent_status().get("state") == "revoked", WAIT, interval=0.25,
               message=lambda: f"the agent to say the relay revoked it: {site.agent_status()}")
    assert "revoked by the relay" in site.agent_status()["last_error"]
    assert not site.relay_site().get("connected"), "neither transport lets a revoked site in"
    assert site.find_fails()


def test_nothing_inside_the_tunnel_can_open_a_connection_to_the_hospital(site: Site) -> None:
    site.wait_transport("wireguard")
    # Orthanc listens on all addresses of the hospital host, so also on the agent's tunnel address.
    assert not connects(site.pair.cloud, site.agent_wg_ip, ORTHANC_DICOM)


def test_the_relay_forwards_nothing_between_site_peers(site: Site) -> None:
    from tunnel_wireguard.interface import guard_table_name

    site.wait_transport("wireguard")
    table = guard_table_name(site.relay_if)
    done = ns_exec(site.pair.cloud, ["nft", "list", "table", "inet", table])
    assert done.returncode == 0, f"the relay's WireGuard interface has no guard table: {done.stderr}"
    assert "hook forward" in done.stdout and f'iifname "{site.relay_if}"' in done.stdout and "drop" in done.stdout
    assert "hook input" not in done.stdout  # agents open connections to the relay: its input stays open
