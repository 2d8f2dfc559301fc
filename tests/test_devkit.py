"""The dev kit's own promises (devkit/): what the tests, the demo and the benchmark rely on.

Processes are ended by PID, newest first, with a line saying how; PIDs land in a pids file as soon as they
exist; a short command that overruns is ended; a wait fails at once, with the log, when a watched process
exits; the stack's relay TOML holds what it was given, where the relay looks for it. The process
fixtures and the lab are exercised by tests/test_support_peers.py and tests/test_wireguard*.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from devkit.errors import ProcessExited, WaitTimeout
from devkit.netns import interface_name, pair_addresses
from devkit.ports import free_ports
from devkit.procs import ProcessTracker, run_command
from devkit.programs import find_native_binary
from devkit.stack import AgentRoute, ListenerRoute, RelayHandle, SiteDest, relay_toml
from devkit.waits import port_accepts, wait_for_port, wait_until

# Prints its PID-stamped name when SIGTERM arrives, so the order of endings can be read from the logs.
_RECORD_TERM = ("import signal, sys, time, pathlib; out = pathlib.Path(sys.argv[1]); "
                "signal.signal(signal.SIGTERM, lambda *a: (out.open('a').write(sys.argv[2] + '\\n'), sys.exit(0))); "
                "print('ready', flush=True); time.sleep(60)")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_stop_all_ends_every_child_newest_first_and_says_how(tmp_path: Path) -> None:
    order = tmp_path / "order.txt"
    tracker = ProcessTracker(tmp_path / "logs", pids_file=tmp_path / "pids.txt")
    try:
        children = [tracker.spawn([sys.executable, "-c", _RECORD_TERM, str(order), name], name=name)
                    for name in ("first", "second", "third")]
        for child in children:
            wait_until(lambda c=child: "ready" in c.log_text(), 10, message=f"{child.name} ready", watch=[child])
    finally:
        ended = tracker.stop_all()
    assert order.read_text().split() == ["third", "second", "first"]
    assert [str(e) for e in ended] == [f"{c.name} (pid {c.pid}): exit status 0" for c in reversed(children)]
    assert all(_gone(c.pid) for c in children)
    recorded = [line.split() for line in (tmp_path / "pids.txt").read_text().splitlines()]
    assert recorded == [[str(c.pid), c.name] for c in children]
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"first.log", "second.log", "third.log"}
    assert tracker.stop_all() == []  # nothing is ended twice


def test_a_child_that_ignores_sigterm_is_killed_and_reported_so(tmp_path: Path) -> None:
    tracker = ProcessTracker(tmp_path)
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)")
    child = tracker.spawn([sys.executable, "-c", code], name="stubborn")
    try:
        wait_until(lambda: "ready" in child.log_text(), 10, message="child to ignore SIGTERM")
    finally:
        ended = tracker.stop_all(grace=0.2)
    assert [str(e) for e in ended] == [f"stubborn (pid {child.pid}): did not stop on SIGTERM, killed"]
    assert ended[0].returncode == -signal.SIGKILL


def test_run_records_the_pid_and_ends_a_command_that_overruns(tmp_path: Path) -> None:
    tracker = ProcessTracker(tmp_path, pids_file=tmp_path / "pids.txt")
    done = tracker.run([sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"], name="upper",
                       input="token\n", timeout=30)
    assert (done.returncode, done.stdout.strip()) == (0, "TOKEN")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        tracker.run(["sleep", "60"], name="sleeper", timeout=0.5)
    assert time.monotonic() - started < 10
    lines = (tmp_path / "pids.txt").read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["upper", "sleeper"]
    assert _gone(int(lines[1].split()[0]))


def test_run_command_returns_a_failure_without_raising() -> None:
    done = run_command([sys.executable, "-c", "import sys; sys.stderr.write('no'); sys.exit(3)"], timeout=30)
    assert (done.returncode, done.stderr) == (3, "no")


def test_a_wait_fails_at_once_when_a_watched_process_exits(tmp_path: Path) -> None:
    tracker = ProcessTracker(tmp_path)
    child = tracker.spawn([sys.executable, "-c", "print('bad config'); raise SystemExit(2)"], name="relay")
    port = free_ports(1)[0]
    started = time.monotonic()
    try:
        with pytest.raises(ProcessExited) as caught:
            wait_for_port("127.0.0.1", port, 30, proc=child)
    finally:
        tracker.stop_all()
    assert time.monotonic() - started < 10
    text = str(caught.value)
    assert "relay exited (status 2)" in text and "last lines of" in text and "bad config" in text
    assert isinstance(caught.value, RuntimeError)


def test_a_wait_that_runs_out_names_what_it_waited_for() -> None:
    with pytest.raises(WaitTimeout, match="timed out after 0.1 s waiting for the moon") as caught:
        wait_until(lambda: False, 0.1, message=lambda: "the moon")
    assert isinstance(caught.value, TimeoutError)
    assert wait_until(lambda: 42, 1) == 42


def test_ports_are_loopback_only() -> None:
    assert not port_accepts("127.0.0.1", free_ports(1)[0])
    with pytest.raises(ValueError):
        port_accepts("192.0.2.1", 80)


def test_lab_names_and_addresses() -> None:
    hospital, cloud = pair_addresses(7, 201)
    assert (str(hospital), str(cloud)) == ("10.201.7.1/24", "10.201.7.2/24")
    assert interface_name("dt0a1b2c3d", "r") == "dt0a1b2c3dr"
    with pytest.raises(ValueError):
        interface_name("dt0a1b2c3d", "toolong")


def test_native_binaries_are_found_outside_the_venv() -> None:
    path = find_native_binary("sleep")
    assert path is not None and not Path(path).resolve().is_relative_to(Path(sys.prefix).resolve())
    assert find_native_binary("surely-not-a-binary-xyz") is None


def test_relay_toml_puts_each_setting_where_the_relay_reads_it(tmp_path: Path) -> None:
    relay = RelayHandle(tmp_path, tmp_path / "relay.toml", 1, 2, 3, host="10.201.9.2")
    text = relay_toml(relay, listener_routes=[ListenerRoute("HOSP", "site-a", "pacs", ["AI"])],
                      sites={"site-a": [SiteDest("CLOUD", 11112)], "site-b": []}, heartbeat=2.0, artim=3.0,
                      tunnel=["max_streams = 8"], sections=["[wireguard]", "enabled = true"])
    config = tomllib.loads(text)
    assert config["tunnel"] == {"host": "10.201.9.2", "port": 1, "heartbeat_interval": 2.0, "max_streams": 8}
    assert config["admin"] == {"host": "127.0.0.1", "port": 2}
    assert config["listeners"][0]["routes"] == [
        {"called_ae": "HOSP", "site": "site-a", "route": "pacs", "allowed_calling_aes": ["AI"]}]
    assert [s["name"] for s in config["sites"]] == ["site-a", "site-b"]
    assert config["sites"][0]["destinations"][0]["port"] == 11112
    assert config["wireguard"] == {"enabled": True}
    assert AgentRoute("pacs", 4242).host == "127.0.0.1"
