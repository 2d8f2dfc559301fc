"""The dev kit's PostgreSQL server (devkit/postgres.py): a real postmaster per test, on 127.0.0.1 only.

It answers with its password and refuses a wrong one; it keeps its data across stop() and start(); its
data dir is 0700 and the server user's, its password file 0600 and ours; the password is in no argv and
no URL; a stop with a session open is a fast shutdown (no SIGKILL); after the block the postmaster's PID
is gone. Queries go through the psql binary, so these tests need no Python driver. The binary lookup is
checked against fake installation trees.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
from pathlib import Path

import pytest

from devkit.errors import CommandFailed, MissingProgram, ProcessExited
from devkit.postgres import SERVER_PROGRAMS, PostgresServer, find_bin_dir, missing_postgres, postgres_server
from devkit.procs import ProcessTracker
from devkit.waits import port_accepts, wait_until
from tests.support import missing_prerequisite


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _fake_install(root: Path, version: str, programs: tuple[str, ...] = SERVER_PROGRAMS) -> Path:
    bin_dir = root / version / "bin"
    bin_dir.mkdir(parents=True)
    for name in programs:
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_it_answers_select_1_as_its_user_in_its_database(postgres: PostgresServer) -> None:
    assert postgres.psql("SELECT 1") == "1"
    assert postgres.psql("SELECT current_user, current_database()") == "tunnel|registry"
    assert postgres.url == f"postgresql://tunnel@127.0.0.1:{postgres.port}/registry"
    assert port_accepts("127.0.0.1", postgres.port)


def test_a_wrong_password_is_refused(postgres: PostgresServer) -> None:
    with pytest.raises(CommandFailed) as refused:
        postgres.psql("SELECT 1", password=postgres.password + "x")
    assert "password authentication failed" in str(refused.value)


def test_it_listens_on_127_0_0_1_only_and_on_no_unix_socket(postgres: PostgresServer) -> None:
    assert postgres.psql("SHOW listen_addresses") == "127.0.0.1"
    assert postgres.psql("SHOW unix_socket_directories") == ""
    assert postgres.psql("SHOW fsync; SHOW max_connections") == "off\n200"


def test_stop_then_start_keeps_the_data_on_the_same_port(postgres: PostgresServer) -> None:
    postgres.psql("CREATE TABLE sites (name text PRIMARY KEY); INSERT INTO sites VALUES ('north'), ('south')")
    first = postgres.process
    assert first is not None
    postgres.stop()
    assert not postgres.running and _gone(first.pid)
    assert not port_accepts("127.0.0.1", postgres.port)
    with pytest.raises(CommandFailed):
        postgres.psql("SELECT 1")
    postgres.start()
    assert postgres.process is not first and postgres.running
    assert postgres.psql("SELECT name FROM sites ORDER BY name") == "north\nsouth"


def test_the_data_dir_is_0700_and_the_servers_the_password_file_0600_and_ours(postgres: PostgresServer) -> None:
    data, secret = postgres.data_dir.stat(), postgres.password_file.stat()
    assert stat.S_IMODE(data.st_mode) == 0o700
    assert stat.S_IMODE(secret.st_mode) == 0o600
    assert secret.st_uid == os.geteuid()
    assert postgres.password_file.read_text() == postgres.password
    server_uid = pwd.getpwnam(postgres.run_as).pw_uid if postgres.run_as else os.geteuid()
    assert data.st_uid == server_uid
    assert postgres.process is not None and _uid_of(postgres.process.pid) == server_uid
    assert not list(postgres.data_dir.parent.glob("initdb-password"))  # initdb's copy is gone


def test_the_password_is_in_no_argv_no_url_and_no_repr(postgres: PostgresServer) -> None:
    assert postgres.process is not None
    cmdline = Path(f"/proc/{postgres.process.pid}/cmdline").read_bytes().decode()
    assert postgres.password not in cmdline
    assert postgres.password not in postgres.url
    assert postgres.password not in repr(postgres)


def test_stop_with_a_session_open_is_a_fast_shutdown(postgres: PostgresServer, procs: ProcessTracker) -> None:
    argv = [postgres.bin_dir / "psql", "-X", "-h", postgres.host, "-p", str(postgres.port), "-U", postgres.user,
            "-d", postgres.database, "-c", "SELECT pg_sleep(60)"]
    procs.spawn(argv, env=postgres.client_env(), name="sleeper")
    wait_until(lambda: postgres.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'")
               == "1", 10, 0.1, message="the sleeping session")
    postgres.stop()
    assert postgres.process is not None and postgres.process.returncode == 0 and not postgres.process.killed


def test_after_the_block_the_postmaster_is_gone(procs: ProcessTracker, tmp_path: Path) -> None:
    reason = missing_postgres()
    if reason is not None:
        missing_prerequisite(reason)
    with postgres_server(procs, tmp_path, database="fleet", user="relay", password="given-secret") as server:
        assert server.psql("SELECT current_user, current_database()") == "relay|fleet"
        assert server.password_file.read_text() == "given-secret"
        assert server.process is not None
        pid, data_dir = server.process.pid, server.data_dir
        server.stop()
        server.stop()  # idempotent
    assert _gone(pid)
    assert data_dir.is_relative_to(tmp_path) or not data_dir.exists()  # one outside tmp_path is removed


def test_start_on_a_taken_port_fails_at_once_with_the_log(postgres: PostgresServer) -> None:
    postgres.stop()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the closed sessions' TIME_WAIT
        squatter.bind(("127.0.0.1", postgres.port))
        squatter.listen()
        with pytest.raises(ProcessExited) as exited:
            postgres.start()
    assert "could not bind" in str(exited.value)
    assert not postgres.running


def test_names_that_would_need_quoting_are_refused(procs: ProcessTracker, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="database name"), postgres_server(procs, tmp_path, database='x"; --'):
        pass
    with pytest.raises(ValueError, match="password"), postgres_server(procs, tmp_path, password="a\nb"):
        pass
    assert not procs.processes


def test_the_highest_complete_version_is_chosen(tmp_path: Path) -> None:
    _fake_install(tmp_path, "9.6")
    best = _fake_install(tmp_path, "13")
    _fake_install(tmp_path, "16", programs=("psql",))  # a client-only install
    (tmp_path / "common").mkdir()
    assert find_bin_dir(tmp_path) == best


def test_no_server_binaries_is_missing_program_naming_the_package(tmp_path: Path) -> None:
    for root in (tmp_path / "absent", tmp_path):
        with pytest.raises(MissingProgram, match="'postgresql'"):
            find_bin_dir(root)
