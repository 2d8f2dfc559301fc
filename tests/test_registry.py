"""The relay registry: migrations, tokens, certificates, revocation, audit. Time is a parameter.

The rules run on both engines: ``registry`` is the SQLite file and a real PostgreSQL server of the test's
own (``tests/test_registry_postgres.py`` has what only a shared database can show).
"""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from relay.engines import PostgresTarget
from relay.registry import (
    REGISTRY_FILE,
    SCHEMA_VERSION,
    CertificateVerdict,
    Registry,
    RegistryError,
    RegistryUnavailable,
    TokenRefused,
)
from tunnel_core.token import EnrollmentToken, TokenFormatError


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        reg = Registry.open(tmp_path)
    else:
        server = request.getfixturevalue("postgres")
        reg = Registry.connect(PostgresTarget.from_url(server.url, server.password))
    yield reg
    reg.close()


@pytest.fixture
def sqlite_registry(tmp_path: Path):
    reg = Registry.open(tmp_path)
    yield reg
    reg.close()


def test_new_file_is_private_and_at_the_latest_schema(tmp_path: Path, sqlite_registry: Registry) -> None:
    path = tmp_path / REGISTRY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_reopening_keeps_data(tmp_path: Path, sqlite_registry: Registry) -> None:
    sqlite_registry.add_site("a", 1.0, actor="t")
    sqlite_registry.close()
    again = Registry.open(tmp_path)
    assert [s.name for s in again.sites()] == ["a"]
    again.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    Registry.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / REGISTRY_FILE)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(RegistryError, match="newer than this release"):
        Registry.open(tmp_path)


def test_token_redeems_once(registry: Registry) -> None:
    registry.add_site("a", 0.0, actor="t")
    registry.add_token("a", "s" * 32, 0.0, 100.0, actor="t")
    assert registry.redeem_token("s" * 32, 50.0) == "a"
    with pytest.raises(TokenRefused, match="already used"):
        registry.redeem_token("s" * 32, 51.0)


def test_token_expires(registry: Registry) -> None:
    registry.add_site("a", 0.0, actor="t")
    registry.add_token("a", "s" * 32, 0.0, 100.0, actor="t")
    with pytest.raises(TokenRefused, match="expired"):
        registry.redeem_token("s" * 32, 100.0)


def test_unknown_token_and_only_hashes_stored(tmp_path: Path, sqlite_registry: Registry) -> None:
    sqlite_registry.add_site("a", 0.0, actor="t")
    sqlite_registry.add_token("a", "the-secret-value-123", 0.0, 100.0, actor="t")
    with pytest.raises(TokenRefused, match="unknown"):
        sqlite_registry.redeem_token("another-secret-value", 1.0)
    assert b"the-secret-value-123" not in (tmp_path / REGISTRY_FILE).read_bytes()


def test_revoking_a_site_kills_its_tokens_and_certificates(registry: Registry) -> None:
    registry.add_site("a", 0.0, actor="t")
    registry.add_token("a", "s" * 32, 0.0, 100.0, actor="t")
    registry.record_certificate("0a", "a", "enroll", 1.0, 1000.0, actor="t")
    assert registry.check_certificate("0a", "a") is CertificateVerdict.OK
    assert registry.revoke_site("a", 2.0, actor="t", why="lost laptop") == ["0a"]
    assert registry.check_certificate("0a", "a") is CertificateVerdict.SITE_REVOKED
    assert registry.refused_among(["0a", "zz"]) == {"0a": CertificateVerdict.SITE_REVOKED}
    with pytest.raises(TokenRefused):
        registry.redeem_token("s" * 32, 3.0)
    with pytest.raises(RegistryError, match="revoked"):
        registry.add_token("a", "t" * 32, 4.0, 100.0, actor="t")
    # Reinstating lets the site enroll again; what was revoked stays revoked.
    assert registry.add_site("a", 5.0, actor="t") == "reinstated"
    assert registry.check_certificate("0a", "a") is CertificateVerdict.REVOKED


def test_certificate_checks(registry: Registry) -> None:
    registry.record_certificate("0b", "b", "manual", 1.0, 1000.0, actor="t")
    assert registry.check_certificate("0b", "b") is CertificateVerdict.OK
    assert registry.check_certificate("0b", "c") is CertificateVerdict.SITE_MISMATCH
    assert registry.check_certificate("ff", "b") is CertificateVerdict.UNKNOWN
    assert registry.revoke_certificate("0b", 2.0, actor="t") == "b"
    assert registry.check_certificate("0b", "b") is CertificateVerdict.REVOKED
    with pytest.raises(RegistryError, match="already revoked"):
        registry.revoke_certificate("0b", 3.0, actor="t")
    with pytest.raises(RegistryError, match="unknown"):
        registry.revoke_certificate("77", 3.0, actor="t")


def test_audit_trail_in_order_newest_first(registry: Registry) -> None:
    registry.add_site("a", 1.0, actor="admin-api")
    registry.record_certificate("0c", "a", "enroll", 2.0, 10.0, actor="enroll")
    registry.revoke_certificate("0c", 3.0, actor="admin-api", why="test")
    actions = [(e["action"], e["actor"]) for e in registry.audit_entries()]
    assert actions == [("certificate_revoked", "admin-api"), ("certificate_issued", "enroll"),
                       ("site_added", "admin-api")]


def test_token_round_trip_and_damage() -> None:
    token = EnrollmentToken("wss://relay.example.org:8443/tunnel", "ab" * 32, "x" * 43)
    text = token.encode()
    assert text.startswith("dtun1.") and "\n" not in text
    assert EnrollmentToken.decode("  " + text + "\n") == token
    assert "x" * 43 not in repr(token)
    for bad in ("", "dtun1.", "dtun2." + text[6:], text[:-5], "dtun1.!!!!", text + "A" * 3000):
        with pytest.raises(TokenFormatError):
            EnrollmentToken.decode(bad)


def test_a_damaged_file_is_unavailable_not_a_rule_refusal(tmp_path: Path) -> None:
    Registry.open(tmp_path).close()
    (tmp_path / REGISTRY_FILE).write_bytes(b"not a database at all" * 100)
    with pytest.raises(RegistryUnavailable, match="cannot open registry|cannot be used now"):
        Registry.open(tmp_path)


def test_a_rule_refusal_stays_a_registry_error(sqlite_registry: Registry) -> None:
    sqlite_registry.record_certificate("0d", "a", "manual", 1.0, 10.0, actor="t")
    with pytest.raises(RegistryError) as caught:
        sqlite_registry.record_certificate("0d", "a", "manual", 2.0, 10.0, actor="t")  # the same serial
    assert not isinstance(caught.value, RegistryUnavailable)
