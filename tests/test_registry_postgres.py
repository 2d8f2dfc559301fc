"""The registry on a real PostgreSQL server shared by several relays (issue 13, part 1).

What only a shared database shows: writes by one relay seen by another (``data_version``), relays
starting together migrating once, races for a token or a WireGuard address decided by the write lock, a
stopped server answered with RegistryUnavailable naming the database and healed by itself when it returns,
and the password kept out of URLs, argv and messages.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from pathlib import Path

import pytest

from relay.config import RelaySettings
from relay.engines import PostgresTarget
from relay.registry import (
    PASSWORD_ENV,
    SCHEMA_VERSION,
    CertificateVerdict,
    Registry,
    RegistryError,
    RegistryUnavailable,
    TokenRefused,
    open_registry,
)

NETWORK = ipaddress.ip_network("10.77.0.0/29")  # 6 hosts: the relay's own address and five sites


def _connect(server, **timeouts: float) -> Registry:
    return Registry.connect(PostgresTarget.from_url(server.url, server.password, **timeouts))


@pytest.fixture
def two_relays(postgres):
    """Two relays' registries on one database."""
    first, second = _connect(postgres), _connect(postgres)
    yield first, second
    first.close()
    second.close()


def test_schema_is_created_once_at_the_latest_version(postgres) -> None:
    registries = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            registries.append(_connect(postgres))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]  # four relays starting at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and len(registries) == 4
    assert postgres.psql("SELECT version FROM registry_schema").strip() == str(SCHEMA_VERSION)
    assert postgres.psql("SELECT count(*) FROM registry_schema").strip() == "1"
    for registry in registries:
        registry.close()


def test_a_database_from_a_newer_release_is_refused(postgres) -> None:
    _connect(postgres).close()
    postgres.psql(f"UPDATE registry_schema SET version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RegistryError, match="newer than this release"):
        _connect(postgres)


def test_a_write_on_one_relay_is_seen_by_the_other(two_relays) -> None:
    first, second = two_relays
    before = second.data_version()
    first.record_certificate("0a", "st-marys", "enroll", 1.0, 1000.0, actor="t")
    assert second.data_version() != before
    assert second.check_certificate("0a", "st-marys") is CertificateVerdict.OK
    first.revoke_site("st-marys", 2.0, actor="admin-api", why="test")
    assert second.refused_among(["0a"]) == {"0a": CertificateVerdict.SITE_REVOKED}
    unchanged = second.data_version()
    second.sites()  # reads move nothing
    assert first.data_version() == unchanged


def test_a_token_raced_through_two_relays_is_redeemed_once(two_relays) -> None:
    first, second = two_relays
    first.add_site("a", 0.0, actor="t")
    first.add_token("a", "s" * 32, 0.0, 100.0, actor="t")
    outcomes: list[str] = []

    def redeem(registry: Registry) -> None:
        try:
            outcomes.append(registry.redeem_token("s" * 32, 50.0))
        except TokenRefused:
            outcomes.append("refused")

    threads = [threading.Thread(target=redeem, args=(r,)) for r in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["a", "refused"]


def test_wireguard_addresses_raced_through_two_relays_stay_distinct(postgres) -> None:
    registries = [_connect(postgres) for _ in range(5)]
    for number, registry in enumerate(registries):
        registry.add_site(f"site-{number}", 0.0, actor="t")
    addresses: list[str] = []

    def register(number: int) -> None:
        key = f"{number:02d}".ljust(43, "A") + "="
        addresses.append(registries[number].register_wg_peer(f"site-{number}", key, NETWORK, {"10.77.0.1"},
                                                             1.0, actor="t"))

    threads = [threading.Thread(target=register, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(addresses) == [f"10.77.0.{n}" for n in range(2, 7)]
    for registry in registries:
        registry.close()


def test_a_stopped_server_is_unavailable_by_name_and_heals_by_itself(postgres) -> None:
    registry = _connect(postgres, connect_timeout=2.0, statement_timeout=2.0)
    registry.add_site("a", 0.0, actor="t")
    postgres.stop()
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable) as caught:
        registry.sites()
    assert time.monotonic() - started < 10.0
    message = str(caught.value)
    assert f"PostgreSQL tunnel@127.0.0.1:{postgres.port}/registry" in message
    assert postgres.password not in message
    with pytest.raises(RegistryUnavailable):
        registry.add_site("b", 1.0, actor="t")  # a write fails the same way
    postgres.start()
    assert [s.name for s in registry.sites()] == ["a"]  # the same object, connected again
    registry.add_site("b", 2.0, actor="t")
    registry.close()


def test_wrong_password_names_the_database_and_not_the_password(postgres) -> None:
    target = PostgresTarget.from_url(postgres.url, "not-the-password")
    with pytest.raises(RegistryUnavailable, match=f"127.0.0.1:{postgres.port}") as caught:
        Registry.connect(target)
    assert "not-the-password" not in str(caught.value)


def test_password_from_a_private_file_or_the_environment(postgres, tmp_path: Path) -> None:
    secret = tmp_path / "registry-password"
    secret.write_text(postgres.password + "\n")
    secret.chmod(0o640)
    open_registry(tmp_path, postgres.url, secret, environ={}).close()
    open_registry(tmp_path, postgres.url, None, environ={PASSWORD_ENV: postgres.password}).close()
    secret.chmod(0o644)
    with pytest.raises(RegistryError, match="readable by everyone"):
        open_registry(tmp_path, postgres.url, secret, environ={})
    assert not (tmp_path / "registry.sqlite3").exists()  # a PostgreSQL relay writes no SQLite file


@pytest.mark.parametrize(("url", "why"), [
    ("postgresql://tunnel:secret@db.example:5432/registry", "must not hold a password"),
    ("mysql://tunnel@db.example/registry", "must start with postgresql://"),
    ("postgresql://db.example/registry", "needs a user"),
    ("postgresql://tunnel@db.example:5432/", "needs a user"),
    ("postgresql://tunnel@db.example:99999/registry", "not a valid URL"),
    ("postgresql://tunnel@db.example/registry?sslmode=disable", "no query parameters"),
])
def test_bad_registry_urls_are_refused_at_start_up(url: str, why: str) -> None:
    with pytest.raises(RegistryError, match=why):
        PostgresTarget.from_url(url)
    with pytest.raises(ValueError, match=why):
        RelaySettings(registry_url=url)


def test_the_connection_carries_every_deadline_and_no_password_in_a_url() -> None:
    target = PostgresTarget.from_url("postgresql://tunnel@db.example:6432/fleet", "s3cr3t-pw", statement_timeout=3.0)
    args = target.connect_args()
    assert (args["host"], args["port"], args["dbname"], args["user"]) == ("db.example", 6432, "fleet", "tunnel")
    assert "statement_timeout=3000" in args["options"] and "lock_timeout=3000" in args["options"]
    assert args["tcp_user_timeout"] == 3000 and args["connect_timeout"] >= 1
    assert args["password"] == "s3cr3t-pw"
    assert "s3cr3t-pw" not in target.where and "s3cr3t-pw" not in repr(target)
