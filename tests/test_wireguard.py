"""tunnel_wireguard (keys, dump, interface): key files, the `wg show dump` parser, and real tunnels between namespaces.

The pure tests need nothing. The namespace tests (tests/support/netns.py) need root, /dev/net/tun, ip,
nft, wg and wireguard-go: under CI=true a missing one fails, elsewhere the test skips and says why.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.support import missing_prerequisite
from tests.support.netns import HospitalFirewall, NetnsLab, SitePair, open_lab
from tests.support.procs import wait_until
from tunnel_wireguard.dump import WgDump, WgEndpoint, parse_dump, parse_endpoint
from tunnel_wireguard.errors import DumpParseError, InvalidKeyError, WireGuardCommandError, WireGuardError
from tunnel_wireguard.interface import WireGuardInterface, validate_interface_name
from tunnel_wireguard.keys import generate_private_key, is_valid_key, load_private_key, public_key_of, validate_key

# RFC 7748 section 6.1: Alice's X25519 private key and the public key it yields.
RFC7748_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
RFC7748_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")

# Keys for the dump samples (any 32 bytes are a valid encoding).
PRIV = base64.b64encode(bytes(range(32))).decode()  # AAECAwQF...: stands in for the private key
PUB = base64.b64encode(bytes(range(32, 64))).decode()
PEER1 = base64.b64encode(bytes(range(64, 96))).decode()
PEER2 = base64.b64encode(bytes(range(96, 128))).decode()
PSK = base64.b64encode(bytes(range(128, 160))).decode()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# ------------------------------------------------------------------------------------------- keys


def test_validate_key_accepts_canonical_base64_of_32_bytes() -> None:
    assert validate_key(PUB) == PUB
    assert validate_key(f"  {PUB}\n") == PUB  # a key file's newline is fine
    assert is_valid_key(PUB)


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        (PUB[:-1], "43 characters"),
        (PUB[:-1] + "A", "no '=' padding"),
        (b64(bytes(31)) + "A", "31 bytes"),
        ("!" * 43 + "=", "not base64"),
        (PUB[:42] + "B=", "non-canonical: the last character carries bits beyond the 32 bytes"),
        ("AAAA AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "inner whitespace"),
    ],
)
def test_validate_key_rejects(text: str, why: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(text)
    assert not is_valid_key(text), why


def test_public_key_of_matches_rfc7748_vector() -> None:
    key = X25519PrivateKey.from_private_bytes(RFC7748_PRIVATE)
    assert public_key_of(key) == b64(RFC7748_PUBLIC)


def test_generate_private_key_writes_a_new_0600_file(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        public = generate_private_key(tmp_path / "wg.key")
    finally:
        os.umask(old_umask)
    path = tmp_path / "wg.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.endswith("\n") and is_valid_key(text)
    assert public_key_of(path) == public == public_key_of(load_private_key(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wg.key"], "no temporary file is left behind"


def test_generate_private_key_never_replaces_a_key_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "wg.key"
    first = generate_private_key(path)
    with pytest.raises(FileExistsError):
        generate_private_key(path)
    assert public_key_of(path) == first, "the existing key is untouched"
    second = generate_private_key(path, overwrite=True)
    assert second != first and public_key_of(path) == second
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wg.key"]


def test_load_private_key_refuses_a_file_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "wg.key"
    generate_private_key(path)
    secret = path.read_text().strip()
    path.chmod(0o640)
    with pytest.raises(InvalidKeyError, match="0640") as info:
        load_private_key(path)
    assert secret not in str(info.value)


@pytest.mark.parametrize("content", [b"not a key\n", b"\xff\xfe", PUB[:-2].encode() + b"\n", b""])
def test_load_private_key_rejects_garbage_without_quoting_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "wg.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(InvalidKeyError) as info:
        load_private_key(path)
    assert str(path) in str(info.value)
    quoted = content.decode(errors="ignore").strip()
    if quoted:
        assert quoted not in str(info.value)


def test_load_private_key_reads_a_wg_genkey_style_file(tmp_path: Path) -> None:
    path = tmp_path / "alice.key"
    path.write_text(b64(RFC7748_PRIVATE) + "\n")
    path.chmod(0o600)
    assert public_key_of(path) == b64(RFC7748_PUBLIC)


def test_errors_share_the_wireguard_root() -> None:
    # The package has its own exception root (STYLE.md: one per package); it no longer sits under
    # tunnel_link's, now that WireGuard is a room of its own beside the byte path.
    for exc in (InvalidKeyError, DumpParseError, WireGuardCommandError):
        assert issubclass(exc, WireGuardError)
    assert WireGuardError.__mro__[1] is Exception
    err = WireGuardCommandError(["wg", "set", "wg0", "private-key", "/k"], "Unable to modify interface", 1)
    assert str(err) == "`wg set wg0 private-key /k` failed (exit 1): Unable to modify interface"


@pytest.mark.parametrize("name", ["wg0", "dt0123abcdh", "a", "x" * 15, "wg.agent_1"])
def test_interface_names_accepted(name: str) -> None:
    assert validate_interface_name(name) == name


@pytest.mark.parametrize("name", ["", "-h", "x" * 16, "wg 0", "wg/0", "wg0\n"])
def test_interface_names_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        validate_interface_name(name)


# ------------------------------------------------------------------------------------- dump parser

# An interface line: private-key, public-key, listen-port, fwmark ("off" when 0).
IFACE_LINE = f"{PRIV}\t{PUB}\t51820\toff"
# A peer line: public-key, preshared-key, endpoint, allowed-ips, latest-handshake (Unix s),
# transfer-rx, transfer-tx, persistent-keepalive.
PEER_LINE_IPV4 = f"{PEER1}\t(none)\t192.0.2.7:40001\t10.202.1.2/32,10.50.0.0/16\t1700000000\t1234\t5678\t25"
# A peer with a preshared key that never shook hands and has no endpoint and no allowed IPs.
PEER_LINE_IDLE = f"{PEER2}\t{PSK}\t(none)\t(none)\t0\t0\t0\toff"
SAMPLE_DUMP = f"{IFACE_LINE}\n{PEER_LINE_IPV4}\n{PEER_LINE_IDLE}\n"


def test_parse_dump_interface_and_peers() -> None:
    dump = parse_dump(SAMPLE_DUMP)
    assert (dump.public_key, dump.has_private_key, dump.listen_port, dump.fwmark) == (PUB, True, 51820, None)
    first, idle = dump.peers
    assert first.public_key == PEER1 and not first.has_preshared_key
    assert first.endpoint == WgEndpoint(parse_endpoint("192.0.2.7:40001").host, 40001)
    assert str(first.endpoint) == "192.0.2.7:40001"
    assert [str(n) for n in first.allowed_ips] == ["10.202.1.2/32", "10.50.0.0/16"]
    assert (first.latest_handshake, first.transfer_rx, first.transfer_tx) == (1700000000, 1234, 5678)
    assert first.persistent_keepalive == 25
    assert first.handshake_age(now=1700000030.5) == 30.5
    assert idle.has_preshared_key and idle.endpoint is None and idle.allowed_ips == ()
    assert idle.latest_handshake is None and idle.handshake_age(now=1700000030.0) is None
    assert idle.persistent_keepalive is None
    assert dump.peer(PEER2) is idle and dump.peer(PUB) is None


def test_parse_dump_drops_private_and_preshared_keys() -> None:
    dump = parse_dump(SAMPLE_DUMP)
    shown = repr(dump) + str(dump) + repr(vars(dump)) + "".join(repr(vars(p)) for p in dump.peers)
    assert PRIV not in shown and PSK not in shown
    assert PUB in shown and PEER1 in shown  # public keys are kept


def test_parse_dump_fresh_interface_without_keys() -> None:
    # `wg show` right after wireguard-go started: no key yet, a random port, a fwmark set by hand.
    dump = parse_dump("(none)\t(none)\t34805\t0x2a\n")
    assert dump == WgDump(public_key=None, has_private_key=False, listen_port=34805, fwmark=42, peers=())


@pytest.mark.parametrize(
    "endpoint, host, port",
    [
        ("[fd00::1]:51820", "fd00::1", 51820),
        ("[2001:db8::1:0:0:1]:1", "2001:db8::1:0:0:1", 1),
        ("[fe80::1%veth-cloud]:51820", "fe80::1%veth-cloud", 51820),  # getnameinfo keeps the scope
        ("203.0.113.9:65535", "203.0.113.9", 65535),
    ],
)
def test_parse_dump_endpoints(endpoint: str, host: str, port: int) -> None:
    dump = parse_dump(f"{IFACE_LINE}\n{PEER1}\t(none)\t{endpoint}\tfd00::2/128\t5\t1\t2\toff\n")
    peer = dump.peers[0]
    assert peer.endpoint is not None and str(peer.endpoint.host) == host and peer.endpoint.port == port
    assert str(peer.endpoint) == endpoint
    assert [str(n) for n in peer.allowed_ips] == ["fd00::2/128"]


def test_parse_dump_tolerates_crlf_and_blank_lines() -> None:
    assert parse_dump(SAMPLE_DUMP.replace("\n", "\r\n") + "\n\n") == parse_dump(SAMPLE_DUMP)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty dump"),
        ("\n\n", "empty dump"),
        (f"{PRIV}\t{PUB}\t51820", "line 1: expected 4 tab-separated fields, got 3"),
        (f"{PRIV}\t{PUB}\t51820\toff\textra", "line 1: expected 4"),
        (f"{PRIV}\t{PUB}\t70000\toff", "line 1: malformed listen-port"),
        (f"{PRIV}\t{PUB}\t-1\toff", "line 1: malformed listen-port"),
        (f"{PRIV}\t{PUB}\t51820\tmaybe", "line 1: malformed fwmark"),
        (f"{PRIV[:-2]}\t{PUB}\t51820\toff", "line 1: malformed private-key"),
        (f"{IFACE_LINE}\n{PEER1}\t(none)\t192.0.2.7\t10.0.0.1/32\t0\t0\t0\toff", "line 2: malformed endpoint"),
        (f"{IFACE_LINE}\n{PEER1}\t(none)\tfd00::1:5\t10.0.0.1/32\t0\t0\t0\toff", "line 2: malformed endpoint"),
        (f"{IFACE_LINE}\n{PEER1}\t(none)\tname.example:5\t10.0.0.1/32\t0\t0\t0\toff", "line 2: malformed endpoint"),
        (f"{IFACE_LINE}\n{PEER1}\t(none)\t(none)\t10.0.0.300/32\t0\t0\t0\toff", "line 2: malformed allowed-ips"),
        (f"{IFACE_LINE}\n{PEER1}\t(none)\t(none)\t(none)\t-5\t0\t0\toff", "line 2: malformed latest-handshake"),
        (f"{IFACE_LINE}\n{PEER1}\t(none)\t(none)\t(none)\t0\t1.5\t0\toff", "line 2: malformed transfer-rx"),
        (f"{IFACE_LINE}\n{PEER1}\t(none)\t(none)\t(none)\t0\t0\t0\tsoon", "line 2: malformed persistent-keepalive"),
        (f"{IFACE_LINE}\n(none)\t(none)\t(none)\t(none)\t0\t0\t0\toff", "line 2: malformed public-key"),
        (f"{IFACE_LINE}\n{PEER1}\t{PSK[:-2]}\t(none)\t(none)\t0\t0\t0\toff", "line 2: malformed preshared-key"),
        (f"wg0\t{IFACE_LINE}", "wg show all dump"),
    ],
)
def test_parse_dump_malformed_raises_a_typed_error(text: str, message: str) -> None:
    with pytest.raises(DumpParseError, match=message.replace("(", r"\(")) as info:
        parse_dump(text)
    assert PRIV not in str(info.value) and PRIV[:-2] not in str(info.value)
    assert PSK[:-2] not in str(info.value)


_keys = st.binary(min_size=32, max_size=32).map(b64)
_peer_fields = st.tuples(
    _keys,
    st.one_of(st.just("(none)"), _keys),
    st.one_of(st.just("(none)"), st.ip_addresses(v=4).map(lambda a: f"{a}:51820")),
    st.lists(st.ip_addresses(v=4).map(lambda a: f"{a}/32"), max_size=3).map(lambda ips: ",".join(ips) or "(none)"),
    st.integers(0, 2**40),
    st.integers(0, 2**63),
    st.integers(0, 2**63),
    st.one_of(st.just("off"), st.integers(1, 65535).map(str)),
)


@settings(max_examples=200, deadline=None)
@given(private=_keys, port=st.integers(0, 65535), peers=st.lists(_peer_fields, max_size=4))
def test_parse_dump_round_trips_fields_and_never_keeps_secrets(private: str, port: int, peers: list) -> None:
    public_keys = {PUB} | {fields[0] for fields in peers}
    assume(private not in public_keys and not any(fields[1] in public_keys for fields in peers))
    lines = [f"{private}\t{PUB}\t{port}\toff"] + ["\t".join(map(str, fields)) for fields in peers]
    dump = parse_dump("\n".join(lines) + "\n")
    assert dump.listen_port == port and len(dump.peers) == len(peers)
    for parsed, fields in zip(dump.peers, peers, strict=True):
        assert parsed.public_key == fields[0]
        assert parsed.has_preshared_key == (fields[1] != "(none)")
        assert (parsed.transfer_rx, parsed.transfer_tx) == (fields[5], fields[6])
        assert parsed.latest_handshake == (fields[4] or None)
    secrets_seen = repr(dump)
    assert private not in secrets_seen
    assert all(fields[1] not in secrets_seen for fields in peers if fields[1] != "(none)")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("\t\n:[]/,.%()01239abnoefx=+AZ"), max_size=200))
def test_parse_dump_only_raises_its_own_error(text: str) -> None:
    try:
        parse_dump(text)
    except DumpParseError:
        pass


# -------------------------------------------------------------------------------- real namespaces


@pytest.fixture
def lab(request: pytest.FixtureRequest, tmp_path: Path):
    with open_lab(request, tmp_path) as built:
        yield built


@dataclass
class Tunnel:
    pair: SitePair
    firewall: HospitalFirewall
    hospital: WireGuardInterface
    cloud: WireGuardInterface
    hospital_key: Path
    cloud_key: Path
    hospital_pub: str
    cloud_pub: str
    hospital_wg_ip: str
    cloud_wg_ip: str


CLOUD_WG_PORT = 51820
ECHO_PORT = 7000


def build_tunnel(lab: NetnsLab, tmp_path: Path, implementation: str = "userspace") -> Tunnel:
    """Hospital and cloud namespaces, the hospital firewall, and a WireGuard tunnel the hospital initiates.

    The cloud knows the hospital's public key and tunnel address but no endpoint: only the hospital's
    outbound UDP (persistent keepalive 25 s) can bring the tunnel up.
    """
    pair = lab.site_pair()
    firewall = HospitalFirewall(lab, pair.hospital).install()
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    hospital_key, cloud_key = keys / "hospital.key", keys / "cloud.key"
    hospital_pub, cloud_pub = generate_private_key(hospital_key), generate_private_key(cloud_key)
    hospital_wg_ip, cloud_wg_ip = f"10.202.{pair.index}.2", f"10.202.{pair.index}.1"

    cloud = WireGuardInterface(netns=pair.cloud, implementation=implementation)  # type: ignore[arg-type]
    lab.defer(cloud.down)
    cloud.up(lab.ifname("c"), cloud_key, f"{cloud_wg_ip}/24", listen_port=CLOUD_WG_PORT)
    cloud.set_peer(hospital_pub, allowed_ips=[f"{hospital_wg_ip}/32"])
    configured = cloud.dump().peer(hospital_pub)
    assert configured is not None and configured.endpoint is None, "the cloud must not know where the hospital is"

    hospital = WireGuardInterface(netns=pair.hospital, implementation=implementation)  # type: ignore[arg-type]
    lab.defer(hospital.down)
    hospital.up(lab.ifname("h"), hospital_key, f"{hospital_wg_ip}/24")
    hospital.set_peer(
        cloud_pub,
        allowed_ips=[f"{cloud_wg_ip}/32"],
        endpoint=f"{pair.cloud_ip}:{CLOUD_WG_PORT}",
        persistent_keepalive=25,
    )
    return Tunnel(pair, firewall, hospital, cloud, hospital_key, cloud_key, hospital_pub, cloud_pub,
                  hospital_wg_ip, cloud_wg_ip)  # fmt: skip


def wait_for_handshake(iface: WireGuardInterface, peer: str) -> None:
    def shook() -> bool:
        found = iface.dump().peer(peer)
        return found is not None and found.latest_handshake is not None

    wait_until(shook, 20.0, interval=0.1, message=f"a WireGuard handshake on {iface.name}")


def secrets_of(*paths: Path) -> list[str]:
    return [path.read_text().strip() for path in paths]


def argv_never_holds(commands: Iterable[tuple[str, ...]], secrets: list[str]) -> None:
    assert commands, "the wrapper recorded no commands"
    for argv in commands:
        for secret in secrets:
            assert not any(secret in arg for arg in argv), f"private key on argv: {argv[:4]}..."


@pytest.mark.parametrize("implementation", ["userspace", "kernel"])
def test_tunnel_hospital_initiated_through_a_firewall_that_drops_inbound(
    lab: NetnsLab, tmp_path: Path, implementation: str
) -> None:
    if implementation == "kernel":
        probe_kernel_wireguard(lab)
    t = build_tunnel(lab, tmp_path, implementation)
    assert t.hospital.implementation == t.cloud.implementation == implementation
    wait_for_handshake(t.hospital, t.cloud_pub)
    before = t.hospital.dump().peer(t.cloud_pub)
    fw_before = t.firewall.counters()

    # Hospital -> cloud through the tunnel: a TCP echo on the cloud's tunnel address.
    lab.echo_server(t.pair.cloud, t.cloud_wg_ip, ECHO_PORT)
    payload = os.urandom(200_000)
    result = lab.tcp_exchange(t.pair.hospital, t.cloud_wg_ip, ECHO_PORT, payload, timeout=15.0)
    assert result.ok, result.error
    # Cloud -> hospital through the tunnel (how the relay will dial the agent's tunnel address).
    lab.echo_server(t.pair.hospital, "0.0.0.0", ECHO_PORT)
    back = lab.tcp_exchange(t.pair.cloud, t.hospital_wg_ip, ECHO_PORT, b"through the tunnel", timeout=15.0)
    assert back.ok, back.error

    fw_tunnel = t.firewall.counters()
    assert fw_tunnel["inbound_new_drops"] == fw_before["inbound_new_drops"], "tunnel traffic is never 'new' inbound"
    assert fw_tunnel["inbound_established"].packets > fw_before["inbound_established"].packets

    # dump(): a recent handshake, counters that grew by at least the payload, the endpoint the cloud learned.
    after = t.hospital.dump().peer(t.cloud_pub)
    assert after is not None and before is not None
    assert after.handshake_age(now=time.time()) is not None and after.handshake_age(now=time.time()) < 180
    assert after.transfer_tx - before.transfer_tx > len(payload)
    assert after.transfer_rx - before.transfer_rx > len(payload)
    assert after.persistent_keepalive == 25 and str(after.endpoint) == f"{t.pair.cloud_ip}:{CLOUD_WG_PORT}"
    seen_by_cloud = t.cloud.dump().peer(t.hospital_pub)
    assert seen_by_cloud is not None and seen_by_cloud.endpoint is not None
    assert str(seen_by_cloud.endpoint.host) == t.pair.hospital_ip
    assert seen_by_cloud.persistent_keepalive is None

    # The cloud cannot open a connection to the hospital directly: the firewall drops it and counts it.
    direct = lab.tcp_exchange(t.pair.cloud, t.pair.hospital_ip, ECHO_PORT, b"knock knock", timeout=3.0)
    assert not direct.ok
    assert t.firewall.counter("inbound_new_drops").packets > fw_before["inbound_new_drops"].packets

    # No private key ever on argv: not in the commands the wrappers ran, not in wireguard-go's cmdline/env.
    keys = secrets_of(t.hospital_key, t.cloud_key)
    argv_never_holds([*t.hospital.commands, *t.cloud.commands], keys)
    assert any("private-key" in argv and str(t.hospital_key) in argv for argv in t.hospital.commands)
    for iface in (t.hospital, t.cloud):
        if iface.wireguard_go_pid is not None:
            for part in ("cmdline", "environ"):
                blob = Path(f"/proc/{iface.wireguard_go_pid}/{part}").read_bytes().decode(errors="replace")
                assert not any(key in blob for key in keys)
    for key_file in (t.hospital_key, t.cloud_key):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def probe_kernel_wireguard(lab: NetnsLab) -> None:
    """Skip (with the kernel's answer) when this kernel cannot make WireGuard links."""
    ns = lab.add_namespace("kprobe")  # the link, if made, goes with the namespace
    try:
        lab.run(ns, ["ip", "link", "add", "dev", lab.ifname("k"), "type", "wireguard"])
    except RuntimeError as exc:
        pytest.skip(f"no kernel WireGuard here (wireguard-go is used instead): {exc}")


def test_kernel_path_falls_back_to_wireguard_go_or_is_used(lab: NetnsLab, tmp_path: Path) -> None:
    ns = lab.add_namespace("kern")
    key = tmp_path / "wg.key"
    public = generate_private_key(key)
    strict = WireGuardInterface(netns=ns, implementation="kernel")
    lab.defer(strict.down)
    try:
        strict.up(lab.ifname("k"), key, "10.203.0.1/24")
    except WireGuardCommandError as exc:
        kernel_answer = str(exc)
        assert "ip link add dev" in kernel_answer and "type wireguard" in kernel_answer and exc.detail
        print(f"kernel path on this machine: {kernel_answer}")
    else:
        kernel_answer = None
        assert strict.implementation == "kernel" and strict.wireguard_go_pid is None
        strict.down()

    auto = WireGuardInterface(netns=ns)
    lab.defer(auto.down)
    auto.up(lab.ifname("a"), key, "10.203.1.1/24", listen_port=51900)
    if kernel_answer is None:
        assert auto.implementation == "kernel" and auto.kernel_error is None
    else:
        assert auto.implementation == "userspace" and auto.kernel_error and auto.wireguard_go_pid
    dump = auto.dump()
    assert dump.public_key == public and dump.has_private_key and dump.listen_port == 51900 and dump.peers == ()


def test_removing_the_peer_stops_traffic_at_once(lab: NetnsLab, tmp_path: Path) -> None:
    t = build_tunnel(lab, tmp_path)
    lab.echo_server(t.pair.cloud, t.cloud_wg_ip, ECHO_PORT)
    assert lab.tcp_exchange(t.pair.hospital, t.cloud_wg_ip, ECHO_PORT, b"before", timeout=15.0).ok

    t.cloud.remove_peer(t.hospital_pub)
    assert t.cloud.dump().peers == ()
    cut = lab.tcp_exchange(t.pair.hospital, t.cloud_wg_ip, ECHO_PORT, b"after", timeout=3.0)
    assert not cut.ok, "the cloud still answered a peer it removed"
    # (Re-adding the peer restores traffic only once the hospital handshakes again: WireGuard does so
    # after 15 s without an answer, so a re-enrolled site needs the agent to re-apply its peer.)


def test_blocked_udp_stops_the_tunnel_and_is_counted(lab: NetnsLab, tmp_path: Path) -> None:
    t = build_tunnel(lab, tmp_path)
    lab.echo_server(t.pair.cloud, t.cloud_wg_ip, ECHO_PORT)
    assert lab.tcp_exchange(t.pair.hospital, t.cloud_wg_ip, ECHO_PORT, b"open", timeout=15.0).ok

    t.firewall.block_udp()
    blocked = lab.tcp_exchange(t.pair.hospital, t.cloud_wg_ip, ECHO_PORT, b"blocked", timeout=3.0)
    assert not blocked.ok
    assert t.firewall.counter("udp_out_drops").packets > 0

    t.firewall.unblock_udp()
    assert lab.tcp_exchange(t.pair.hospital, t.cloud_wg_ip, ECHO_PORT, b"reopened", timeout=20.0).ok


def start_orphan_wireguard_go(lab: NetnsLab, ns: str, name: str):
    """A wireguard-go as a crashed agent leaves it: running, with nobody holding its interface object."""
    proc = lab.spawn(ns, ["wireguard-go", name], name="orphan-wireguard-go", env={"WG_PROCESS_FOREGROUND": "1"})
    socket = Path("/var/run/wireguard") / f"{name}.sock"
    wait_until(lambda: socket.exists() or not proc.running, 10.0, message=f"{socket} to appear")
    assert proc.running, proc.describe()
    return proc, socket


def link_names(lab: NetnsLab, ns: str) -> list[str]:
    return [line.split(":")[1].strip().split("@")[0] for line in lab.run(ns, ["ip", "-o", "link", "show"]).splitlines()]


def test_recover_stale_ends_a_leftover_wireguard_go_and_up_reuses_the_name(lab: NetnsLab, tmp_path: Path) -> None:
    ns = lab.add_namespace("stale")
    name = lab.ifname("s")
    orphan, socket = start_orphan_wireguard_go(lab, ns, name)
    assert name in link_names(lab, ns)

    iface = WireGuardInterface(netns=ns)
    assert iface.recover_stale(name) is True
    wait_until(lambda: not orphan.running, 10.0, message="the orphaned wireguard-go to exit")
    assert not socket.exists() and name not in link_names(lab, ns)
    assert iface.recover_stale(name) is False, "nothing left the second time"

    # up() recovers by itself: a second orphan under the same name is replaced by ours.
    orphan2, _ = start_orphan_wireguard_go(lab, ns, name)
    key = tmp_path / "wg.key"
    public = generate_private_key(key)
    lab.defer(iface.down)
    iface.up(name, key, "10.203.2.1/24")
    wait_until(lambda: not orphan2.running, 10.0, message="the second orphan to exit")
    assert iface.implementation in ("kernel", "userspace") and iface.dump().public_key == public
    iface.down()
    assert not socket.exists() and name not in link_names(lab, ns)


def test_recover_stale_removes_the_socket_of_a_killed_wireguard_go(lab: NetnsLab, tmp_path: Path) -> None:
    ns = lab.add_namespace("killed")
    name = lab.ifname("x")
    orphan, socket = start_orphan_wireguard_go(lab, ns, name)
    orphan.kill(signal.SIGKILL)  # no clean shutdown: the socket file stays
    orphan.wait(timeout=10)
    wait_until(lambda: name not in link_names(lab, ns), 10.0, message="the TUN device to vanish with its process")
    assert socket.exists()

    key = tmp_path / "wg.key"
    generate_private_key(key)
    iface = WireGuardInterface(netns=ns, implementation="userspace")
    with pytest.raises(WireGuardError, match="recover_stale"):
        iface.up(name, key, "10.203.5.1/24", recover=False)  # would talk to whoever owns that socket
    assert iface.name is None and socket.exists()
    assert iface.recover_stale(name) is True
    assert not socket.exists()


def test_recover_stale_leaves_other_kinds_of_links_alone(lab: NetnsLab) -> None:
    ns = lab.add_namespace("other")
    name = lab.ifname("v")
    lab.run(ns, ["ip", "link", "add", "dev", name, "type", "veth", "peer", "name", lab.ifname("vp")])
    with pytest.raises(WireGuardError, match="kind 'veth'"):
        WireGuardInterface(netns=ns).recover_stale(name)
    assert name in link_names(lab, ns)


def test_a_failing_up_names_the_command_and_cleans_up(lab: NetnsLab, tmp_path: Path) -> None:
    ns = lab.add_namespace("fail")
    key = tmp_path / "wg.key"
    generate_private_key(key)
    first = WireGuardInterface(netns=ns)
    lab.defer(first.down)
    first.up(lab.ifname("f1"), key, "10.203.3.1/24", listen_port=51999)

    second = WireGuardInterface(netns=ns)
    with pytest.raises(WireGuardCommandError) as info:
        second.up(lab.ifname("f2"), key, "10.203.4.1/24", listen_port=51999)  # the port is taken
    message = str(info.value)
    assert "\n" not in message and "wg set" in message and "listen-port 51999" in message
    assert key.read_text().strip() not in message
    assert second.name is None and second.wireguard_go_pid is None
    assert lab.ifname("f2") not in link_names(lab, ns)
    assert not (Path("/var/run/wireguard") / f"{lab.ifname('f2')}.sock").exists()


def test_commands_against_a_missing_namespace_raise_one_line_errors() -> None:
    if shutil.which("ip") is None:
        missing_prerequisite("ip (iproute2) is not on PATH")
    iface = WireGuardInterface(netns=f"dt-no-such-namespace-{os.getpid()}")
    with pytest.raises(WireGuardCommandError) as info:
        iface.recover_stale(f"dtnone{os.getpid() % 100000}")  # a name nobody uses: its socket is unlinked
    assert str(info.value).startswith(f"`ip netns exec dt-no-such-namespace-{os.getpid()} ip -json -details link show")
    assert "\n" not in str(info.value)


def test_guard_table_names_are_valid_for_nft_and_unique_per_interface() -> None:
    from tunnel_wireguard.interface import guard_table_name

    names = {guard_table_name(n) for n in ("wg0", "wg.0", "wg-0", "wg_0", "wg+0", "wg=0")}
    assert len(names) == 6
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", n) for n in names)
