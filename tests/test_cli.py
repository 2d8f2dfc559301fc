"""The programs' start-up errors: a wrong key is named, missing certificates are a clear message and a
non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess

from tests.support.stack import AGENT, RELAY


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30)


def test_relay_names_the_wrong_key(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('state_dir = "x"\n[tunnel]\nport = 70000\n[admin]\nprot = 1\n')
    result = _run(RELAY, "serve", "--config", str(cfg))
    assert result.returncode == 2
    assert "tunnel.port" in result.stderr and "admin.prot" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_certificates_are_a_clear_error(tmp_path):
    relay_cfg = tmp_path / "relay.toml"
    relay_cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n[tunnel]\nport = 18443\n[admin]\nport = 18081\n')
    result = _run(RELAY, "serve", "--config", str(relay_cfg))
    assert result.returncode == 1 and "cannot load CA certificate" in result.stderr, result.stderr
    agent_cfg = tmp_path / "agent.toml"
    agent_cfg.write_text(f'relay_url = "wss://127.0.0.1:18443/tunnel"\ncert_file = "{tmp_path}/a.crt"\n'
                         f'key_file = "{tmp_path}/a.key"\nca_file = "{tmp_path}/ca.crt"\n')
    result = _run(AGENT, "run", "--config", str(agent_cfg))
    assert result.returncode == 1 and "cannot start" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_agent_refuses_plain_ws(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('relay_url = "ws://relay.example.org/tunnel"\n')
    result = _run(AGENT, "run", "--config", str(cfg))
    assert result.returncode == 2 and "relay_url" in result.stderr


def test_status_when_the_agent_is_not_running(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('relay_url = "wss://relay.example.org/tunnel"\n[status]\nport = 1\n[listener]\nport = 2\n')
    result = _run(AGENT, "status", "--config", str(cfg))
    assert result.returncode == 1 and "not running" in result.stderr
