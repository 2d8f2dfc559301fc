"""The relay's own certificate authority: CA, relay server certificate, site (agent) certificates.

Theory of operation: the relay's state directory holds ``ca.key``/``ca.crt`` (created once by
:func:`init_ca`, never overwritten) and the relay's TLS server pair ``relay.key``/``relay.crt``. Each site
gets a short-lived client certificate whose CN is the site name and whose SAN carries
``urn:dicom-tunnel:site:<site>``; after the TLS handshake the relay takes the site's identity from that
certificate (:func:`site_from_certificate`), never from anything the agent says.

Keys are ECDSA P-256. Private keys are written to a fresh 0600 file opened with ``O_CREAT|O_EXCL`` and
then moved into place, so a key is never readable by others, not even for a moment, and a crash never
leaves a half-written key under the final name. Directories this module creates are 0700.
Only ``cryptography`` is used: no subprocess, no key material on any command line.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel_runtime.settings import NAME_PATTERN

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "PEER_CERT",
    "PEER_KEY",
    "RELAY_CERT",
    "RELAY_KEY",
    "RELAY_URI_PREFIX",
    "SITE_URI_PREFIX",
    "CertificateIdentityError",
    "PkiError",
    "ServerBundle",
    "SiteBundle",
    "ca_fingerprint",
    "certificate_fingerprint",
    "init_ca",
    "issue_client_cert",
    "issue_peer_cert",
    "issue_server_cert",
    "issue_site_cert",
    "relay_from_certificate",
    "relay_hostnames",
    "sign_site_csr",
    "site_from_certificate",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
RELAY_CERT = "relay.crt"
RELAY_KEY = "relay.key"
AGENT_CERT = "agent.crt"
AGENT_KEY = "agent.key"
SITE_URI_PREFIX = "urn:dicom-tunnel:site:"
RELAY_URI_PREFIX = "urn:dicom-tunnel:relay:"  # a relay of the fleet, as its peers see it (relay.peering)
PEER_CERT = "peer.crt"
PEER_KEY = "peer.key"
PEER_CERT_DAYS = 30
_RELAY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

_CA_DAYS = 3650
_CLOCK_SKEW = dt.timedelta(minutes=5)  # back-date notBefore so a peer with a slightly slow clock accepts


class PkiError(Exception):
    """Root of the CA tooling errors."""


class CertificateIdentityError(PkiError):
    """A peer certificate does not carry a well-formed site identity."""


@dataclass(frozen=True, slots=True)
class ServerBundle:
    cert: Path
    key: Path
    not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate signed from an agent's CSR (the agent keeps its key)."""

    site: str
    pem: bytes
    serial: int
    not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class SiteBundle:
    """The three files an agent needs, as written by :func:`issue_site_cert`."""

    site: str
    cert: Path
    key: Path
    ca: Path
    not_after: dt.datetime
    serial: int = 0


# --- public API --------------------------------------------------------------------------------


def init_ca(state_dir: Path, *, common_name: str = "DICOM Tunnel Relay CA") -> Path:
    """Create the CA in ``state_dir`` unless it exists; return the path of ``ca.crt``.

    Idempotent: an existing CA is left untouched. A key without its certificate (or the reverse) is
    refused rather than guessed at.
    """
    _make_private_dir(state_dir)
    cert_path, key_path = state_dir / CA_CERT, state_dir / CA_KEY
    if cert_path.exists() and key_path.exists():
        return cert_path
    if cert_path.exists() or key_path.exists():
        raise PkiError(f"incomplete CA in {state_dir}: need both {CA_CERT} and {CA_KEY}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_file(key_path, _key_pem(key), mode=0o600, overwrite=False)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=False)
    return cert_path


def issue_server_cert(state_dir: Path, hostnames: Sequence[str], days: int = 397) -> ServerBundle:
    """Issue (or re-issue, replacing) ``relay.crt``/``relay.key`` for ``hostnames`` (DNS names or IPs)."""
    if not hostnames:
        raise PkiError("a server certificate needs at least one hostname or IP address")
    ca_cert, ca_key = _load_ca(state_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = now + dt.timedelta(days=days)
    cert = (
        _leaf_builder(ca_cert, key, hostnames[0], now - _CLOCK_SKEW, not_after)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hostnames]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = state_dir / RELAY_CERT, state_dir / RELAY_KEY
    _write_file(key_path, _key_pem(key), mode=0o600, overwrite=True)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=True)
    return ServerBundle(cert=cert_path, key=key_path, not_after=cert.not_valid_after_utc)


def issue_site_cert(state_dir: Path, site: str, out_dir: Path, days: int = 30) -> SiteBundle:
    """Issue a client certificate for ``site`` into ``out_dir`` (agent.key 0600, agent.crt, ca.crt)."""
    _check_site_name(site, PkiError)
    now = _now()
    return issue_client_cert(
        state_dir,
        out_dir,
        common_name=site,
        not_valid_before=now - _CLOCK_SKEW,
        not_valid_after=now + dt.timedelta(days=days),
    )


def issue_client_cert(
    state_dir: Path,
    out_dir: Path,
    *,
    common_name: str,
    not_valid_before: dt.datetime,
    not_valid_after: dt.datetime,
    extended_key_usages: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    san_uris: Sequence[str] | None = None,
) -> SiteBundle:
    """Issue an agent (client) certificate into ``out_dir`` with every field a parameter: the validity, the
    extended key usages, the SAN URIs (default: the site URI for ``common_name``; ``[]`` for no SAN).

    :func:`issue_site_cert` is the product's use (a valid site certificate); tests build odd ones with it
    (expired, wrong EKU, no site URI) to check that the relay refuses them."""
    ca_cert, ca_key = _load_ca(state_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    uris = [SITE_URI_PREFIX + common_name] if san_uris is None else list(san_uris)
    builder = _leaf_builder(ca_cert, key, common_name, not_valid_before, not_valid_after)
    if uris:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(san, critical=False)
    if extended_key_usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(extended_key_usages)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _make_private_dir(out_dir)
    bundle = SiteBundle(
        site=common_name,
        cert=out_dir / AGENT_CERT,
        key=out_dir / AGENT_KEY,
        ca=out_dir / CA_CERT,
        not_after=cert.not_valid_after_utc,
        serial=cert.serial_number,
    )
    _write_file(bundle.key, _key_pem(key), mode=0o600, overwrite=True)
    _write_file(bundle.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=True)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write_file(bundle.ca, ca_pem, mode=0o644, overwrite=True)
    return bundle


def issue_peer_cert(state_dir: Path, relay: str, days: int = PEER_CERT_DAYS) -> ServerBundle:
    """Issue (or re-issue, replacing) ``peer.crt``/``peer.key``: the client certificate this relay shows
    the other relays of its fleet when it carries a caller to them. CN and the SAN URI
    ``urn:dicom-tunnel:relay:<name>`` name the relay; it carries no site URI, so no tunnel takes it."""
    if not _RELAY_NAME.fullmatch(relay):
        raise PkiError(f"{relay!r} is not a relay name")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _client_certificate(state_dir, key.public_key(), relay, RELAY_URI_PREFIX + relay, days)
    cert_path, key_path = state_dir / PEER_CERT, state_dir / PEER_KEY
    _write_file(key_path, _key_pem(key), mode=0o600, overwrite=True)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=True)
    return ServerBundle(cert=cert_path, key=key_path, not_after=cert.not_valid_after_utc)


MAX_SITE_CERT_DAYS = 30


def sign_site_csr(state_dir: Path, csr_pem: bytes, site: str, days: int = MAX_SITE_CERT_DAYS) -> IssuedCertificate:
    """Sign an agent's CSR as ``site``'s client certificate, valid ``days`` (at most 30).

    The identity comes from ``site`` (the redeemed token, or the certificate that asked for renewal),
    never from the CSR's subject, which is ignored. The CSR must be self-signed correctly and carry an
    acceptable key (:func:`check_public_key`).
    """
    _check_site_name(site, PkiError)
    if not 1 <= days <= MAX_SITE_CERT_DAYS:
        raise PkiError(f"site certificates are valid 1 to {MAX_SITE_CERT_DAYS} days, not {days}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PkiError("not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise PkiError("the certificate signing request's signature does not verify")
    public_key = csr.public_key()
    check_public_key(public_key, PkiError)
    cert = _client_certificate(state_dir, public_key, site, SITE_URI_PREFIX + site, days)
    return IssuedCertificate(site=site, pem=cert.public_bytes(serialization.Encoding.PEM),
                             serial=cert.serial_number, not_after=cert.not_valid_after_utc)


def check_public_key(key: object, error: type[PkiError]) -> None:
    """Accept ECDSA on P-256/P-384/P-521, Ed25519 and RSA of at least 2048 bits; raise ``error`` otherwise."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise error(f"elliptic curve {key.curve.name} is not accepted (use P-256 or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise error(f"RSA key of {key.key_size} bits is too small (at least 2048)")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise error("key type is not accepted (use ECDSA P-256)")


def certificate_serial(pem_or_der: bytes) -> int:
    return _parse_certificate(pem_or_der, PkiError).serial_number


def certificate_not_after(pem_or_der: bytes) -> dt.datetime:
    return _parse_certificate(pem_or_der, PkiError).not_valid_after_utc


def relay_hostnames(state_dir: Path) -> list[str]:
    """The DNS names and IP addresses in the relay's server certificate (what agents may dial)."""
    cert = _parse_certificate(_read(state_dir / RELAY_CERT), PkiError)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = []
    for name in san:  # in the order given to ``ca init --hostname``: the first is the preferred one
        if isinstance(name, x509.DNSName | x509.IPAddress):
            names.append(str(name.value))
    return names


def ca_fingerprint(state_dir: Path) -> str:
    """SHA-256 of the CA certificate's DER encoding, lower-case hex (what an agent pins)."""
    return certificate_fingerprint(_read(state_dir / CA_CERT))


def certificate_fingerprint(pem_or_der: bytes) -> str:
    """SHA-256 (lower-case hex) of one certificate's DER encoding, given as PEM or DER."""
    cert = _parse_certificate(pem_or_der, PkiError)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def site_from_certificate(der: bytes) -> str:
    """Return the site name carried by a verified peer certificate (``getpeercert(binary_form=True)``).

    The chain was already checked by TLS; this checks the identity is well formed: exactly one CN that
    is a valid site name, a SAN URI ``urn:dicom-tunnel:site:<CN>`` and no other site URI, and the
    clientAuth EKU. Raises :class:`CertificateIdentityError` otherwise.
    """
    cert = _parse_certificate(der, CertificateIdentityError)
    site = _single_common_name(cert)
    _check_site_name(site, CertificateIdentityError)
    uris = _uris(cert, SITE_URI_PREFIX)
    if uris != [SITE_URI_PREFIX + site]:
        raise CertificateIdentityError("certificate site URI does not match its common name")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in _extended_key_usages(cert):
        raise CertificateIdentityError("certificate is not valid for client authentication")
    check_public_key(cert.public_key(), CertificateIdentityError)
    return site


def relay_from_certificate(der: bytes) -> str:
    """Return the relay name carried by a verified peer certificate (:func:`issue_peer_cert`'s): one CN,
    the SAN URI ``urn:dicom-tunnel:relay:<CN>`` and no site URI, the clientAuth EKU. Raises
    :class:`CertificateIdentityError` otherwise (a site's certificate among them)."""
    cert = _parse_certificate(der, CertificateIdentityError)
    relay = _single_common_name(cert)
    if not _RELAY_NAME.fullmatch(relay) or _uris(cert, SITE_URI_PREFIX):
        raise CertificateIdentityError("not a relay's certificate")
    if _uris(cert, RELAY_URI_PREFIX) != [RELAY_URI_PREFIX + relay]:
        raise CertificateIdentityError("certificate relay URI does not match its common name")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in _extended_key_usages(cert):
        raise CertificateIdentityError("certificate is not valid for client authentication")
    return relay


# --- helpers -----------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_builder(
    ca_cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
    common_name: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    public_key = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )


def _client_certificate(state_dir: Path, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
                        | ed25519.Ed25519PublicKey, common_name: str, uri: str, days: int) -> x509.Certificate:
    """A client (clientAuth) certificate from the CA in ``state_dir``: ``common_name``, the one SAN URI
    ``uri``, valid ``days`` from now (back-dated by the clock skew)."""
    ca_cert, ca_key = _load_ca(state_dir)
    now = _now()
    return (
        _leaf_builder(ca_cert, public_key, common_name, now - _CLOCK_SKEW, now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _load_ca(state_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = _parse_certificate(_read(state_dir / CA_CERT), PkiError)
    key = serialization.load_pem_private_key(_read(state_dir / CA_KEY), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{state_dir / CA_KEY} is not an ECDSA key")
    return cert, key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"{path} not found (run the CA initialisation first)") from exc
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from exc


def _parse_certificate(data: bytes, error: type[PkiError]) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise error("not a valid X.509 certificate") from exc


def _single_common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise CertificateIdentityError("certificate must carry exactly one common name")
    return names[0].value


def _uris(cert: x509.Certificate, prefix: str) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return [u for u in uris if u.startswith(prefix)]


def _extended_key_usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _check_site_name(site: str, error: type[PkiError]) -> None:
    if not NAME_PATTERN.fullmatch(site):
        raise error("site name must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if missing; a directory we create is 0700 whatever the umask."""
    if path.is_dir():
        return
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise PkiError(f"{path} exists and is not a directory") from None
        return
    except OSError as exc:
        raise PkiError(f"cannot create {path}: {exc.strerror}") from exc
    os.chmod(path, 0o700)


def _write_file(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` to a new ``mode`` file beside ``path``, then move it into place.

    ``overwrite=False`` links instead of renaming, so an existing file is never replaced (O_EXCL for the
    final name, even if two initialisations race).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, mode)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # the umask may strip bits from a public file; never widens 0600
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError as exc:
        raise PkiError(f"{path} already exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)
