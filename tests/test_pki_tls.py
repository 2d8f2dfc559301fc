"""The relay CA tooling and the mutual-TLS contexts, down to real handshakes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import ssl
import stat
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from relay import pki as pki_module
from relay.pki import (
    SITE_URI_PREFIX,
    CertificateIdentityError,
    PkiError,
    SiteBundle,
    ca_fingerprint,
    init_ca,
    issue_client_cert,
    issue_server_cert,
    issue_site_cert,
    site_from_certificate,
)
from tunnel_link.tls import TlsConfigError, client_context, server_context

LOOPBACK = "127.0.0.1"
SITE = "hospital-a"
TIMEOUT = 10.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Pki:
    state: Path
    site: SiteBundle

    @property
    def ca(self) -> Path:
        return self.state / "ca.crt"

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.state / "relay.crt", self.state / "relay.key", self.ca)


def _make_pki(root: Path) -> Pki:
    state = root / "state"
    init_ca(state)
    issue_server_cert(state, ["localhost", LOOPBACK])
    return Pki(state=state, site=issue_site_cert(state, SITE, root / "agent"))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return _make_pki(tmp_path / "main")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    """A second, unrelated CA with its own relay and site certificates."""
    return _make_pki(tmp_path / "other")


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# --- PKI -----------------------------------------------------------------------------------------


def test_init_ca_files_modes_and_extensions(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    cert_path = init_ca(state, common_name="Test CA")
    assert cert_path == state / "ca.crt"
    assert _mode(state) == 0o700
    assert _mode(state / "ca.key") == 0o600
    ca = _cert(cert_path)
    assert ca.subject == ca.issuer
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=3649)
    ca.verify_directly_issued_by(ca)
    assert not list(state.glob(".*.tmp")), "temporary files left behind"


def test_init_ca_is_idempotent(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init_ca(state)
    before = ((state / "ca.crt").read_bytes(), (state / "ca.key").read_bytes())
    init_ca(state)
    assert ((state / "ca.crt").read_bytes(), (state / "ca.key").read_bytes()) == before


def test_init_ca_refuses_half_a_ca(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init_ca(state)
    (state / "ca.crt").unlink()
    key = (state / "ca.key").read_bytes()
    with pytest.raises(PkiError, match="incomplete CA"):
        init_ca(state)
    assert (state / "ca.key").read_bytes() == key


def test_issue_without_ca_fails(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="not found"):
        issue_site_cert(tmp_path, SITE, tmp_path / "out")


def test_keys_are_private_whatever_the_umask(tmp_path: Path) -> None:
    with _umask(0):
        state = tmp_path / "state"
        init_ca(state)
        bundle = issue_site_cert(state, SITE, tmp_path / "agent")
    assert _mode(state) == 0o700 and _mode(tmp_path / "agent") == 0o700
    assert _mode(state / "ca.key") == 0o600 and _mode(bundle.key) == 0o600
    assert _mode(bundle.cert) == 0o644 and _mode(bundle.ca) == 0o644


def test_site_cert_files_identity_and_chain(pki: Pki, tmp_path: Path) -> None:
    bundle = pki.site
    assert (bundle.cert.name, bundle.key.name, bundle.ca.name) == ("agent.crt", "agent.key", "ca.crt")
    assert _mode(bundle.key) == 0o600 and _mode(bundle.cert.parent) == 0o700
    assert bundle.ca.read_bytes() == pki.ca.read_bytes()
    leaf, ca = _cert(bundle.cert), _cert(pki.ca)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SITE
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SITE_URI_PREFIX + SITE]
    assert dt.timedelta(days=29) < leaf.not_valid_after_utc - _now() <= dt.timedelta(days=30)
    assert bundle.not_after == leaf.not_valid_after_utc
    verified = PolicyBuilder().store(Store([ca])).build_client_verifier().verify(leaf, [])
    assert verified.chain[-1] == ca


def test_site_cert_from_another_ca_does_not_chain(pki: Pki, other_pki: Pki) -> None:
    verifier = PolicyBuilder().store(Store([_cert(pki.ca)])).build_client_verifier()
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(_cert(other_pki.site.cert), [])


def test_server_cert_names_and_chain(pki: Pki) -> None:
    leaf, ca = _cert(pki.state / "relay.crt"), _cert(pki.ca)
    assert _mode(pki.state / "relay.key") == 0o600
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [LOOPBACK]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    store = Store([ca])
    PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])
    with pytest.raises(x509.verification.VerificationError):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("relay.example.org")).verify(leaf, [])


def test_server_cert_reissue_replaces(pki: Pki) -> None:
    before = (pki.state / "relay.key").read_bytes()
    bundle = issue_server_cert(pki.state, ["relay.example.org"], days=10)
    assert bundle.key.read_bytes() != before and _mode(bundle.key) == 0o600
    assert dt.timedelta(days=9) < bundle.not_after - _now() <= dt.timedelta(days=10)
    with pytest.raises(PkiError):
        issue_server_cert(pki.state, [])


def test_ca_fingerprint(pki: Pki) -> None:
    fingerprint = ca_fingerprint(pki.state)
    assert fingerprint == hashlib.sha256(_der(pki.ca)).hexdigest()
    assert len(fingerprint) == 64


@pytest.mark.parametrize("site", ["Hospital-A", "-a", "a_b", "", "x" * 64])
def test_issue_site_cert_rejects_bad_names(pki: Pki, tmp_path: Path, site: str) -> None:
    with pytest.raises(PkiError):
        issue_site_cert(pki.state, site, tmp_path / "bad")


def test_site_from_certificate(pki: Pki) -> None:
    assert site_from_certificate(_der(pki.site.cert)) == SITE


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"extended_key_usages": [ExtendedKeyUsageOID.SERVER_AUTH]}, "client authentication"),
        ({"extended_key_usages": []}, "client authentication"),
        ({"san_uris": []}, "site URI"),
        ({"san_uris": [SITE_URI_PREFIX + "hospital-b"]}, "site URI"),
        ({"san_uris": [SITE_URI_PREFIX + SITE, SITE_URI_PREFIX + "hospital-b"]}, "site URI"),
        ({"common_name": "Hospital_A"}, "site name"),
    ],
)
def test_site_from_certificate_rejects_odd_certs(pki: Pki, tmp_path: Path, kwargs: dict, why: str) -> None:
    params = {
        "common_name": SITE,
        "not_valid_before": _now(),
        "not_valid_after": _now() + dt.timedelta(days=1),
    }
    bundle = issue_client_cert(pki.state, tmp_path / "odd", **{**params, **kwargs})
    with pytest.raises(CertificateIdentityError, match=why):
        site_from_certificate(_der(bundle.cert))


def test_site_from_certificate_rejects_garbage() -> None:
    with pytest.raises(CertificateIdentityError):
        site_from_certificate(b"\x30\x03\x02\x01\x00")


def test_a_relay_peer_certificate_names_the_relay_and_is_no_site(pki: Pki) -> None:
    bundle = pki_module.issue_peer_cert(pki.state, "relay-a")
    assert _mode(bundle.key) == 0o600
    der = _der(bundle.cert)
    assert pki_module.relay_from_certificate(der) == "relay-a"
    with pytest.raises(CertificateIdentityError):
        site_from_certificate(der)  # no tunnel takes a relay for a site
    with pytest.raises(CertificateIdentityError, match="not a relay"):
        pki_module.relay_from_certificate(_der(pki.site.cert))  # nor a site for a relay


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"san_uris": []}, "relay URI"),
        ({"san_uris": [pki_module.RELAY_URI_PREFIX + "relay-b"]}, "relay URI"),
        ({"san_uris": [pki_module.RELAY_URI_PREFIX + "relay-a", SITE_URI_PREFIX + "relay-a"]}, "not a relay"),
        ({"extended_key_usages": [ExtendedKeyUsageOID.SERVER_AUTH],
          "san_uris": [pki_module.RELAY_URI_PREFIX + "relay-a"]}, "client authentication"),
    ],
)
def test_relay_from_certificate_rejects_odd_certs(pki: Pki, tmp_path: Path, kwargs: dict, why: str) -> None:
    bundle = issue_client_cert(pki.state, tmp_path / "odd", common_name="relay-a", not_valid_before=_now(),
                               not_valid_after=_now() + dt.timedelta(days=1), **kwargs)
    with pytest.raises(CertificateIdentityError, match=why):
        pki_module.relay_from_certificate(_der(bundle.cert))


# --- TLS contexts -----------------------------------------------------------------------------------


def test_context_policy(pki: Pki) -> None:
    for ctx in (pki.server_context(), client_context(pki.site.cert, pki.site.key, pki.site.ca)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
        tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12 and all(name.startswith("ECDHE-") for name in tls12)
        assert all("GCM" in name or "CHACHA20" in name for name in tls12)
        assert len(ctx.get_ca_certs()) == 1, "only the pinned CA may be trusted"
    assert client_context(pki.site.cert, pki.site.key, pki.site.ca).check_hostname


def test_context_reports_missing_files(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="CA"):
        client_context(pki.site.cert, pki.site.key, tmp_path / "missing.crt")
    with pytest.raises(TlsConfigError, match="cannot load certificate"):
        client_context(pki.site.cert, pki.site.ca, pki.site.ca)  # a certificate is not a key


@dataclass
class Relay:
    """A TLS echo-ish server: each accepted connection records the peer and gets ``ok``."""

    port: int = 0
    peers: list[tuple[str, str]] = field(default_factory=list)  # (site, TLS version)


@contextlib.asynccontextmanager
async def _relay(ctx: ssl.SSLContext) -> AsyncIterator[Relay]:
    relay = Relay()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        relay.peers.append(
            (site_from_certificate(ssl_object.getpeercert(binary_form=True)), ssl_object.version())
        )
        writer.write(b"ok\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_connect, LOOPBACK, 0, ssl=ctx, ssl_handshake_timeout=TIMEOUT)
    relay.port = server.sockets[0].getsockname()[1]
    try:
        yield relay
    finally:
        server.close()
        await server.wait_closed()


@dataclass(frozen=True)
class Outcome:
    ok: bool
    version: str | None = None
    cipher: str | None = None
    error: str = ""


async def _connect(ctx: ssl.SSLContext, port: int, server_hostname: str = LOOPBACK) -> Outcome:
    """Handshake and read the server's greeting. With TLS 1.3 a rejected client certificate only shows
    on the first read, so the greeting is what proves the server accepted us."""
    writer = None
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(
                LOOPBACK, port, ssl=ctx, server_hostname=server_hostname
            )
            ssl_object = writer.get_extra_info("ssl_object")
            version, cipher = ssl_object.version(), ssl_object.cipher()[0]
            line = await reader.readline()
        return Outcome(ok=line == b"ok\n", version=version, cipher=cipher, error=f"got {line!r}")
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError) as exc:
        return Outcome(ok=False, error=repr(exc))
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()


def _bare_client(ca: Path) -> ssl.SSLContext:
    """The agent's policy without a client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=ca)
    return ctx


def _agent(bundle: SiteBundle, ca: Path | None = None) -> ssl.SSLContext:
    return client_context(bundle.cert, bundle.key, ca or bundle.ca)


async def test_handshake_good_site_cert_negotiates_tls13(pki: Pki) -> None:
    async with _relay(pki.server_context()) as relay:
        outcome = await _connect(_agent(pki.site), relay.port)
    assert outcome.ok, outcome.error
    assert outcome.version == "TLSv1.3"
    assert relay.peers == [(SITE, "TLSv1.3")]


async def test_handshake_by_dns_name(pki: Pki) -> None:
    async with _relay(pki.server_context()) as relay:
        outcome = await _connect(_agent(pki.site), relay.port, server_hostname="localhost")
    assert outcome.ok, outcome.error


async def test_handshake_tls12_uses_ecdhe_aead(pki: Pki) -> None:
    ctx = _agent(pki.site)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with _relay(pki.server_context()) as relay:
        outcome = await _connect(ctx, relay.port)
    assert outcome.ok, outcome.error
    assert outcome.version == "TLSv1.2"
    assert outcome.cipher.startswith("ECDHE-ECDSA-") and (
        "GCM" in outcome.cipher or "CHACHA20" in outcome.cipher
    )


def _memory_handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = LOOPBACK
) -> dict[str, ssl.SSLError | None]:
    """Run one handshake in memory (no sockets) and return each side's error, to see *why* it failed.

    Over a socket the client of a TLS 1.3 handshake only learns "connection closed"; here the server's
    own verdict is visible.
    """
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    ends = {
        "client": (client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname), c_out, s_in),
        "server": (server_ctx.wrap_bio(s_in, s_out, server_side=True), s_out, c_in),
    }
    errors: dict[str, ssl.SSLError | None] = {"client": None, "server": None}
    finished: set[str] = set()
    for _ in range(20):  # a handshake takes a handful of flights; stop as soon as nothing moves
        moved = False
        for name, (tls, outgoing, peer_incoming) in ends.items():
            if name not in finished:
                try:
                    tls.do_handshake()
                    finished.add(name)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    errors[name] = exc
                    finished.add(name)
            data = outgoing.read()
            if data:
                peer_incoming.write(data)
                moved = True
        if not moved:
            break
    return errors


def _reason(exc: ssl.SSLError | None) -> str:
    if exc is None:
        return "no error"
    return getattr(exc, "verify_message", None) or exc.reason or str(exc)


async def _assert_rejected(pki: Pki, ctx: ssl.SSLContext, server_reason: str) -> None:
    """The relay refuses ``ctx`` over a real socket, and (in memory) for the expected reason."""
    async with _relay(pki.server_context()) as relay:
        outcome = await _connect(ctx, relay.port)
    assert not outcome.ok, "handshake should have failed"
    assert relay.peers == [], "the server must not have accepted the connection"
    errors = _memory_handshake(pki.server_context(), ctx)
    assert _reason(errors["server"]) == server_reason, errors


def test_memory_handshake_succeeds_with_good_cert(pki: Pki) -> None:
    assert _memory_handshake(pki.server_context(), _agent(pki.site)) == {"client": None, "server": None}


async def test_relay_rejects_missing_client_cert(pki: Pki) -> None:
    await _assert_rejected(pki, _bare_client(pki.ca), "PEER_DID_NOT_RETURN_A_CERTIFICATE")


async def test_relay_rejects_cert_from_another_ca(pki: Pki, other_pki: Pki) -> None:
    # The client trusts the right relay CA but presents a certificate the relay's CA never issued.
    await _assert_rejected(pki, _agent(other_pki.site, ca=pki.ca), "unable to get local issuer certificate")


async def test_relay_rejects_expired_cert(pki: Pki, tmp_path: Path) -> None:
    expired = issue_client_cert(
        pki.state,
        tmp_path / "expired",
        common_name=SITE,
        not_valid_before=_now() - dt.timedelta(days=10),
        not_valid_after=_now() - dt.timedelta(days=1),
    )
    await _assert_rejected(pki, _agent(expired), "certificate has expired")


async def test_relay_rejects_cert_without_client_auth(pki: Pki, tmp_path: Path) -> None:
    wrong = issue_client_cert(
        pki.state,
        tmp_path / "server-eku",
        common_name=SITE,
        not_valid_before=_now() - dt.timedelta(minutes=1),
        not_valid_after=_now() + dt.timedelta(days=1),
        extended_key_usages=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    await _assert_rejected(pki, _agent(wrong), "unsuitable certificate purpose")


async def test_relay_rejects_tls11_client(pki: Pki) -> None:
    ctx = _agent(pki.site)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client's OpenSSL offer TLS 1.1 at all
    await _assert_rejected(pki, ctx, "UNSUPPORTED_PROTOCOL")  # the server saw the hello and refused


async def test_relay_rejects_tls12_without_ecdhe(pki: Pki) -> None:
    ctx = _agent(pki.site)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-GCM-SHA256")  # static RSA key exchange: no forward secrecy
    await _assert_rejected(pki, ctx, "NO_SHARED_CIPHER")


async def test_agent_rejects_relay_from_another_ca(pki: Pki, other_pki: Pki) -> None:
    # A TLS-intercepting box presents a certificate for the right name from a CA the agent never pinned.
    async with _relay(other_pki.server_context()) as relay:
        outcome = await _connect(_agent(pki.site), relay.port)
    assert not outcome.ok
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.error
    assert relay.peers == []


async def test_agent_checks_relay_hostname(pki: Pki) -> None:
    async with _relay(pki.server_context()) as relay:
        outcome = await _connect(_agent(pki.site), relay.port, server_hostname="relay.example.org")
    assert not outcome.ok
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.error
    assert relay.peers == []


# --- signing agents' requests (enrollment and renewal) -----------------------------------------------


def _csr(key, cn: str = "whatever") -> bytes:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def test_sign_site_csr_names_the_site_not_the_request(pki: Pki) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from relay.pki import sign_site_csr

    key = ec.generate_private_key(ec.SECP256R1())
    issued = sign_site_csr(pki.state, _csr(key, cn="someone-else"), SITE, days=30)
    cert = x509.load_pem_x509_certificate(issued.pem)
    assert site_from_certificate(issued.pem) == SITE
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=30, minutes=5)


def test_sign_site_csr_refuses_weak_keys_bad_requests_and_long_lives(pki: Pki) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from relay.pki import PkiError, sign_site_csr

    with pytest.raises(PkiError, match="too small"):
        sign_site_csr(pki.state, _csr(rsa.generate_private_key(65537, 1024)), SITE)
    with pytest.raises(PkiError, match="secp256k1"):
        sign_site_csr(pki.state, _csr(ec.generate_private_key(ec.SECP256K1())), SITE)
    with pytest.raises(PkiError, match="not a PEM"):
        sign_site_csr(pki.state, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", SITE)
    with pytest.raises(PkiError, match="1 to 30 days"):
        sign_site_csr(pki.state, _csr(ec.generate_private_key(ec.SECP256R1())), SITE, days=365)
    with pytest.raises(PkiError, match="site name"):
        sign_site_csr(pki.state, _csr(ec.generate_private_key(ec.SECP256R1())), "Bad Name")


def test_site_certificate_with_a_weak_key_is_refused_as_identity(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa

    from relay.pki import SITE_URI_PREFIX, CertificateIdentityError

    ca_cert = x509.load_pem_x509_certificate((pki.state / "ca.crt").read_bytes())
    from cryptography.hazmat.primitives import serialization
    ca_key = serialization.load_pem_private_key((pki.state / "ca.key").read_bytes(), None)
    weak = rsa.generate_private_key(65537, 1024)
    now = dt.datetime.now(dt.UTC)
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SITE)]))
            .issuer_name(ca_cert.subject).public_key(weak.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SITE_URI_PREFIX + SITE)]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    with pytest.raises(CertificateIdentityError, match="too small"):
        site_from_certificate(cert.public_bytes(serialization.Encoding.DER))
