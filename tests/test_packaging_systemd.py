"""The systemd units in deploy/systemd (docs/packaging.md), checked by systemd's own tools in a fake root:
``systemd-analyze verify`` must print nothing at all (an unknown key or a bad value is only a warning there,
exit status 0, so any output fails), ``systemd-sysusers`` must create the users the units run as, and the
units must say what the packaging promises: a dedicated user, a 0700 state directory, the config path,
restart on failure, the hardening, no capability for the relay, and a stop timeout above the relay's own
shutdown bound (its drain deadline and close timeouts taken from the code, so a longer bound there fails here).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from relay import presence, registrygate
from relay.config import FleetConfig
from tests.support import missing_prerequisite
from tunnel_link import innertls, session

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
SYSTEM_UNITS = Path("/lib/systemd/system")
TIMEOUT = 60
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "UMask": "0077", "Restart": "on-failure", "StateDirectoryMode": "0700"}
# The relay's stop: every tunnel's close at once (the inner-TLS alert, then the WebSocket close), the fleet
# withdrawal, and a registry call already in flight ending at its deadline.
RELAY_STOP_BOUND = (innertls.CLOSE_TIMEOUT + session.CLOSE_TIMEOUT + presence.LEAVE_TIMEOUT
                    + registrygate.DEFAULT_TIMEOUT)

# The agent's stop: its tunnel's close (the inner-TLS alert, then the WebSocket close).
AGENT_STOP_BOUND = innertls.CLOSE_TIMEOUT + session.CLOSE_TIMEOUT


def drain_deadline(fleet: FleetConfig | None = None) -> float:
    """How long a stopping relay lets associations in flight finish first ([fleet] drain_deadline, issue 13
    item 5; 0 in a relay without it)."""
    value = getattr(fleet if fleet is not None else FleetConfig(), "drain_deadline", 0.0)
    return float(value)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing_prerequisite(f"{name} (Debian package systemd) is not installed")
    return path


def _directives(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, in order (a key may repeat; an empty value resets)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def _last(unit: dict[str, list[str]], key: str) -> str:
    assert key in unit, f"{key}= missing"
    return unit[key][-1]


def _stub(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)


def _fake_root(tmp_path: Path, *, dropins: dict[str, list[str]], extra: dict[str, str] | None = None) -> Path:
    """A root with systemd's own units, ours in /etc/systemd/system (with the given drop-ins), and stub
    programs where ExecStart points."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in ("tunnel-relay.service", "tunnel-agent.service"):
        shutil.copy(UNITS / unit, etc / unit)
        for name in dropins.get(unit, []):
            (etc / f"{unit}.d").mkdir(exist_ok=True)
            shutil.copy(UNITS / f"{unit}.d" / name, etc / f"{unit}.d" / name)
    for name, text in (extra or {}).items():
        (etc / name).write_text(text)
    for program in ("tunnel-relay", "tunnel-agent"):
        _stub(root / "opt/dicom-tunnel/venv/bin" / program)
    return root


def _verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("systemd-analyze"), "verify", f"--root={root}", "--man=no", *units],
                          capture_output=True, text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("dropins", [{}, {"tunnel-relay.service": ["postgresql-registry.conf", "wireguard.conf"],
                                          "tunnel-agent.service": ["wireguard.conf"]}],
                         ids=["plain", "with-drop-ins"])
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path, dropins):
    root = _fake_root(tmp_path, dropins=dropins)
    done = _verify(root, "tunnel-relay.service", "tunnel-agent.service")
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_verify_check_catches_a_wrong_key(tmp_path):
    """The control: the same check on a unit with a typo prints a warning (exit 0), which fails the check."""
    typo = (UNITS / "tunnel-relay.service").read_text().replace("PrivateTmp=yes", "PrivateTemp=yes")
    root = _fake_root(tmp_path, dropins={}, extra={"typo.service": typo})
    done = _verify(root, "typo.service")
    assert "PrivateTemp" in done.stderr


def test_sysusers_creates_the_users_the_units_run_as(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    done = subprocess.run([_tool("systemd-sysusers"), f"--root={root}", str(UNITS / "dicom-tunnel.sysusers.conf")],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    for unit_name in ("tunnel-relay", "tunnel-agent"):
        unit = _directives((UNITS / f"{unit_name}.service").read_text())
        entry = users[_last(unit, "User")]
        assert 0 < int(entry[2]) < 1000, "a system user"
        assert entry[5] == f"/var/lib/{_last(unit, 'StateDirectory')}"


@pytest.mark.parametrize("program,config", [("relay", "/etc/tunnel-relay/relay.toml"),
                                            ("agent", "/etc/tunnel-agent/agent.toml")])
def test_the_units_run_one_user_one_config_hardened(program, config):
    unit = _directives((UNITS / f"tunnel-{program}.service").read_text())
    assert _last(unit, "User") == _last(unit, "Group") == f"tunnel-{program}"
    assert _last(unit, "ExecStart").endswith(f"tunnel-{program} {'serve' if program == 'relay' else 'run'} "
                                              f"--config {config}")
    assert _last(unit, "StateDirectory") == f"tunnel-{program}"
    assert _last(unit, "ReadWritePaths") == f"/var/lib/tunnel-{program}"
    for key, value in HARDENING.items():
        assert _last(unit, key) == value, key
    bound = drain_deadline() + RELAY_STOP_BOUND if program == "relay" else AGENT_STOP_BOUND
    assert float(_last(unit, "TimeoutStopSec")) > bound


def test_the_relay_has_no_capability_unless_wireguard_asks_for_one():
    relay = _directives((UNITS / "tunnel-relay.service").read_text())
    assert _last(relay, "CapabilityBoundingSet") == "" and _last(relay, "AmbientCapabilities") == ""
    wireguard = _directives((UNITS / "tunnel-relay.service.d" / "wireguard.conf").read_text())
    assert _last(wireguard, "CapabilityBoundingSet") == "CAP_NET_ADMIN"


def test_the_registry_password_comes_as_a_credential_file():
    dropin = _directives((UNITS / "tunnel-relay.service.d" / "postgresql-registry.conf").read_text())
    name, _, source = _last(dropin, "LoadCredential").partition(":")
    assert source == "/etc/tunnel-relay/registry-password"
    assert _last(dropin, "Environment") == f"TUNNEL_RELAY_REGISTRY_PASSWORD_FILE=%d/{name}"
    relay = (UNITS / "tunnel-relay.service").read_text()
    assert "PASSWORD=" not in relay and "PASSWORD=" not in _last(dropin, "Environment")


@pytest.mark.parametrize("unit", ["tunnel-relay.service", "tunnel-agent.service"])
def test_systemd_rates_the_exposure_of_the_units_low(tmp_path, unit):
    """``systemd-analyze security`` scores 0 (locked down) to 10 (unprotected); it exits non-zero above
    the threshold, given in tenths. Both units score under 2 (the relay 1.5, the agent 1.7 with its one
    capability)."""
    root = _fake_root(tmp_path, dropins={})
    done = subprocess.run([_tool("systemd-analyze"), "security", "--offline=yes", f"--root={root}", "--threshold=20",
                           unit], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
