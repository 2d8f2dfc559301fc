"""Configuration loading: TOML plus environment, and errors that name the wrong key and say why."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pydantic
import pytest

from relay.config import RelaySettings, load_relay_settings
from tunnel_agent.config import AgentSettings, load_agent_settings
from tunnel_core.limits import MuxLimits
from tunnel_runtime.settings import ConfigError, MuxConfig, validate_ae_title

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

RELAY_TOML = """\
state_dir = "/srv/relay-state"

[tunnel]
host = "127.0.0.1"
port = 8443
path = "/tunnel"
heartbeat_interval = 5.0

[admin]
port = 8081

[[listeners]]
name = "cloud"
host = "127.0.0.1"
port = 11112
artim_timeout = 10.0

[[listeners.routes]]
called_ae = "HOSP_A_PACS"
site = "hospital-a"
route = "pacs"
allowed_calling_aes = ["CLOUD_AI"]

[[listeners.routes]]
called_ae = "HOSP_B_PACS"
site = "hospital-b"
route = "pacs"
allowed_calling_aes = ["*"]

[[sites]]
name = "hospital-a"

[[sites.destinations]]
called_ae = "CLOUD_STORE"
host = "127.0.0.1"
port = 11113
allowed_calling_aes = ["*"]

[[sites.destinations]]
called_ae = "CLOUD_QR"
host = "127.0.0.1"
port = 11114
allowed_calling_aes = ["HOSP_A_PACS"]

[[sites]]
name = "hospital-b"
"""

AGENT_TOML = """\
relay_url = "wss://relay.example.org:8443/tunnel"
cert_file = "/etc/tunnel-agent/agent.crt"
key_file = "/etc/tunnel-agent/agent.key"
ca_file = "/etc/tunnel-agent/ca.crt"
backoff_initial = 0.5
backoff_max = 30.0

[status]
port = 8082

[listener]
enabled = true
port = 11112

[[routes]]
name = "pacs"
host = "127.0.0.1"
port = 4242
called_ae = "ORTHANC"

[[routes]]
name = "archive"
host = "127.0.0.1"
port = 104
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Overrides in the developer's shell must not leak into these tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith(("TUNNEL_RELAY_", "TUNNEL_AGENT_")):
            monkeypatch.delenv(name)


def _write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _patched(base: str, old: str, new: str) -> str:
    assert old in base, f"test patch does not apply: {old!r}"
    return base.replace(old, new, 1)


def _problem_keys(err: ConfigError) -> dict[str, str]:
    return dict(err.problems)


# --- valid files -------------------------------------------------------------------------------


def test_relay_file_loads(tmp_path: Path) -> None:
    settings = load_relay_settings(_write(tmp_path, RELAY_TOML))
    assert settings.state_dir == Path("/srv/relay-state")
    assert settings.tunnel.port == 8443 and settings.tunnel.heartbeat_interval == 5.0
    assert [r.called_ae for r in settings.listeners[0].routes] == ["HOSP_A_PACS", "HOSP_B_PACS"]
    assert settings.site("hospital-a") is not None
    assert settings.site("hospital-a").destination("CLOUD_QR").allowed_calling_aes == ["HOSP_A_PACS"]
    assert settings.site("nowhere") is None
    assert settings.listener("cloud").max_associate_rq == 1024 * 1024


def test_relay_tls_paths_default_to_state_dir(tmp_path: Path) -> None:
    text = _patched(
        RELAY_TOML, 'path = "/tunnel"\n', 'path = "/tunnel"\ncert_file = ""\nca_file = "/x/ca.pem"\n'
    )
    settings = load_relay_settings(_write(tmp_path, text))
    assert settings.tunnel_cert_path == Path("/srv/relay-state/relay.crt")
    assert settings.tunnel_key_path == Path("/srv/relay-state/relay.key")
    assert settings.tunnel_ca_path == Path("/x/ca.pem")


def test_relay_defaults_without_file() -> None:
    settings = load_relay_settings(None)
    assert settings.state_dir == Path("/var/lib/tunnel-relay")
    assert (settings.tunnel.host, settings.tunnel.port, settings.tunnel.path) == ("0.0.0.0", 8443, "/tunnel")
    assert (settings.admin.host, settings.admin.port) == ("127.0.0.1", 8081)
    assert settings.listeners == [] and settings.sites == []
    assert settings.mux.to_limits() == MuxLimits()


def test_agent_file_loads_with_defaults(tmp_path: Path) -> None:
    settings = load_agent_settings(_write(tmp_path, 'relay_url = "wss://relay.example.org/tunnel"\n'))
    assert settings.relay_host == "relay.example.org"
    assert settings.state_dir == Path("/var/lib/tunnel-agent")
    assert settings.cert_file == Path("/var/lib/tunnel-agent/agent.crt")
    assert settings.key_file == Path("/var/lib/tunnel-agent/agent.key")
    assert settings.ca_file == Path("/var/lib/tunnel-agent/ca.crt")
    assert (settings.heartbeat_interval, settings.backoff_initial, settings.backoff_max) == (10.0, 0.5, 30.0)
    assert settings.connect_timeout == 10.0
    assert (settings.status.host, settings.status.port) == ("127.0.0.1", 8082)
    assert settings.listener.enabled and settings.listener.port == 11112
    assert settings.listener.artim_timeout == 10.0 and settings.listener.max_associate_rq == 1048576
    assert settings.routes == []


def test_agent_routes(tmp_path: Path) -> None:
    settings = load_agent_settings(_write(tmp_path, AGENT_TOML))
    assert settings.route("pacs").called_ae == "ORTHANC"
    assert settings.route("archive").called_ae is None
    assert settings.route("elsewhere") is None


SPOOL_TOML = """relay_url = "wss://relay.example.org/tunnel"
state_dir = "/srv/agent"
[[destinations]]
name = "cloud-ai"
called_ae = "CLOUD-AI"
mode = "spool"
[[destinations]]
name = "archive"
called_ae = "ARCHIVE"
"""


def test_agent_destinations_default_to_passthrough_and_the_spool_to_the_state_dir(tmp_path: Path) -> None:
    settings = load_agent_settings(_write(tmp_path, SPOOL_TOML))
    assert [d.name for d in settings.spooled()] == ["cloud-ai"]
    spool = settings.spooled()[0]
    assert (spool.parallel, spool.max_attempts, spool.max_bytes) == (8, 10, 0)
    assert spool.transfer_syntaxes == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    assert "1.2.840.10008.5.1.4.1.1.2" in spool.sop_classes  # CT Image Storage
    assert settings.destinations[1].mode == "passthrough"
    assert settings.spool.directory == Path("/srv/agent/spool")
    assert settings.spool.max_bytes == 10 * 1024**3


@pytest.mark.parametrize(("extra", "key", "reason"), [
    ('[[destinations]]\nname = "cloud-ai"\ncalled_ae = "OTHER"\n', "destinations.2.name", "duplicate destination name"),
    ('[[destinations]]\nname = "other"\ncalled_ae = "CLOUD-AI"\n', "destinations.2.called_ae",
     "duplicate destination called_ae"),
    ('[[destinations]]\nname = "x"\ncalled_ae = "X"\nsop_classes = ["1.2.x"]\n', "destinations.2.sop_classes",
     "not UIDs"),
    ('[[destinations]]\nname = "x"\ncalled_ae = "X"\nmode = "store"\n', "destinations.2.mode", "passthrough"),
    ('[[destinations]]\nname = "x"\ncalled_ae = "X"\nparallel = 0\n', "destinations.2.parallel", "1"),
])
def test_agent_destination_errors_name_the_key(tmp_path: Path, extra: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_agent_settings(_write(tmp_path, SPOOL_TOML + extra))
    assert key in str(caught.value) and reason in str(caught.value)


@pytest.mark.parametrize(
    ("name", "loader"),
    [("relay.example.toml", load_relay_settings), ("agent.example.toml", load_agent_settings)],
)
def test_example_files_load(name: str, loader) -> None:
    settings = loader(DEPLOY / name)
    assert isinstance(settings, RelaySettings | AgentSettings)


@pytest.mark.parametrize("name", ["relay.example.toml", "agent.example.toml"])
def test_example_files_document_every_mux_limit(name: str) -> None:
    text = (DEPLOY / name).read_text()
    for field in dataclasses.fields(MuxLimits):
        assert f"{field.name} = {field.default}" in text


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_relay_settings(_write(tmp_path, RELAY_TOML))
    with pytest.raises(pydantic.ValidationError):
        settings.state_dir = Path("/tmp")  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        settings.tunnel.port = 1  # type: ignore[misc]


# --- environment overrides ----------------------------------------------------------------------


def test_relay_env_beats_file_and_keeps_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNEL_RELAY_TUNNEL__PORT", "9443")
    monkeypatch.setenv("TUNNEL_RELAY_STATE_DIR", "/elsewhere")
    settings = load_relay_settings(_write(tmp_path, RELAY_TOML))
    assert settings.tunnel.port == 9443
    assert settings.tunnel.path == "/tunnel" and settings.tunnel.heartbeat_interval == 5.0
    assert settings.state_dir == Path("/elsewhere")
    assert settings.tunnel_cert_path == Path("/elsewhere/relay.crt")


def test_agent_env_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNEL_AGENT_RELAY_URL", "wss://other.example.org/t")
    monkeypatch.setenv("TUNNEL_AGENT_LISTENER__ENABLED", "false")
    monkeypatch.setenv("TUNNEL_AGENT_MUX__MAX_STREAMS", "16")
    settings = load_agent_settings(_write(tmp_path, AGENT_TOML))
    assert settings.relay_host == "other.example.org"
    assert settings.listener.enabled is False and settings.listener.port == 11112
    assert settings.mux.to_limits().max_streams == 16
    assert len(settings.routes) == 2


def test_agent_env_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNEL_AGENT_RELAY_URL", "wss://127.0.0.1:8443/tunnel")
    assert load_agent_settings(None).relay_host == "127.0.0.1"


def test_bad_env_value_names_key_and_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNEL_RELAY_ADMIN__PORT", "70000")
    with pytest.raises(ConfigError) as info:
        load_relay_settings(_write(tmp_path, RELAY_TOML))
    reason = _problem_keys(info.value)["admin.port"]
    assert "65535" in reason and "TUNNEL_RELAY_ADMIN__PORT" in reason


# --- file-level errors ---------------------------------------------------------------------------


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_relay_settings(path)
    assert str(path) in str(info.value) and "not found" in str(info.value)


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    text = _patched(RELAY_TOML, "port = 8081\n", "port = = 8081\n")
    line = text.splitlines().index("port = = 8081") + 1
    with pytest.raises(ConfigError) as info:
        load_relay_settings(_write(tmp_path, text))
    assert f"line {line}" in str(info.value)


def test_config_error_lists_every_problem(tmp_path: Path) -> None:
    text = _patched(RELAY_TOML, "port = 8443", "port = 0")
    text = _patched(text, 'called_ae = "CLOUD_QR"', 'called_ae = "A\\\\B"')
    with pytest.raises(ConfigError) as info:
        load_relay_settings(_write(tmp_path, text))
    message = str(info.value)
    assert "tunnel.port: " in message
    assert "sites.0.destinations.1.called_ae: AE title must be 1-16 printable ASCII" in message


RELAY_BAD_CASES = [
    pytest.param(
        'called_ae = "HOSP_B_PACS"',
        'called_ae = "BAD\\\\AE"',
        "listeners.0.routes.1.called_ae",
        "AE title must be 1-16 printable ASCII characters, no backslash",
        id="backslash-in-ae",
    ),
    pytest.param(
        'called_ae = "HOSP_A_PACS"',
        'called_ae = "SEVENTEEN_CHARS_X"',
        "listeners.0.routes.0.called_ae",
        "1-16 printable ASCII",
        id="ae-too-long",
    ),
    pytest.param(
        'called_ae = "HOSP_A_PACS"',
        'called_ae = "    "',
        "listeners.0.routes.0.called_ae",
        "all spaces",
        id="ae-blank",
    ),
    pytest.param(
        'called_ae = "HOSP_B_PACS"',
        'called_ae = "HOSP_A_PACS"',
        "listeners.0.routes.1.called_ae",
        "duplicate called AE title",
        id="duplicate-called-ae-in-listener",
    ),
    pytest.param(
        'called_ae = "CLOUD_QR"',
        'called_ae = "CLOUD_STORE"',
        "sites.0.destinations.1.called_ae",
        "duplicate called AE title",
        id="duplicate-destination-ae",
    ),
    pytest.param(
        'site = "hospital-b"',
        'site = "hospital-c"',
        "listeners.0.routes.1.site",
        "unknown site 'hospital-c'",
        id="route-to-unknown-site",
    ),
    pytest.param(
        'name = "hospital-b"',
        'name = "hospital-a"',
        "sites.1.name",
        "duplicate site name",
        id="duplicate-site",
    ),
    pytest.param(
        'name = "hospital-a"',
        'name = "Hospital_A"',
        "sites.0.name",
        "a-z, 0-9",
        id="bad-site-name",
    ),
    pytest.param(
        'route = "pacs"',
        'route = "-pacs"',
        "listeners.0.routes.0.route",
        "a-z, 0-9",
        id="bad-route-name",
    ),
    pytest.param(
        'allowed_calling_aes = ["CLOUD_AI"]',
        "allowed_calling_aes = []",
        "listeners.0.routes.0.allowed_calling_aes",
        "at least one",
        id="empty-allow-list",
    ),
    pytest.param(
        'allowed_calling_aes = ["CLOUD_AI"]',
        'allowed_calling_aes = ["CLOUD_AI", "*"]',
        "listeners.0.routes.0.allowed_calling_aes",
        "only entry",
        id="star-with-others",
    ),
    pytest.param(
        'route = "pacs"\nallowed_calling_aes = ["CLOUD_AI"]',
        'allowed_calling_aes = ["CLOUD_AI"]',
        "listeners.0.routes.0.route",
        "required key is missing",
        id="missing-route",
    ),
    pytest.param("port = 8443", "prot = 8443", "tunnel.prot", "unknown key", id="typo-in-section"),
    pytest.param("state_dir =", "statedir =", "statedir", "unknown key", id="typo-top-level"),
    pytest.param("port = 8443", "port = 0", "tunnel.port", "greater than or equal to 1", id="port-zero"),
    pytest.param("port = 11112", "port = 65536", "listeners.0.port", "65535", id="port-too-big"),
    pytest.param("port = 11113", 'port = "x"', "sites.0.destinations.0.port", "integer", id="port-not-int"),
    pytest.param("port = 8081", "port = 8443", "admin.port", "already used by tunnel.port", id="port-clash"),
    pytest.param(
        "artim_timeout = 10.0",
        "artim_timeout = 0",
        "listeners.0.artim_timeout",
        "greater than 0",
        id="zero-timeout",
    ),
    pytest.param(
        "heartbeat_interval = 5.0",
        "heartbeat_interval = -1",
        "tunnel.heartbeat_interval",
        "greater than 0",
        id="negative-heartbeat",
    ),
    pytest.param('path = "/tunnel"', 'path = "tunnel"', "tunnel.path", "pattern", id="relative-path"),
    pytest.param(
        "[admin]",
        "[mux]\nstream_window = 8388608\nconnection_window = 4194304\n\n[admin]",
        "mux",
        "connection_window must be at least stream_window",
        id="mux-inconsistent",
    ),
    pytest.param("[admin]", "[mux]\nmax_streams = 0\n\n[admin]", "mux.max_streams", "greater", id="mux-zero"),
    pytest.param("[admin]", "[mux]\nwindow = 1\n\n[admin]", "mux.window", "unknown key", id="mux-typo"),
]


@pytest.mark.parametrize(("old", "new", "key", "reason"), RELAY_BAD_CASES)
def test_relay_error_names_key(tmp_path: Path, old: str, new: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_relay_settings(_write(tmp_path, _patched(RELAY_TOML, old, new)))
    problems = _problem_keys(info.value)
    assert key in problems, f"{key} not among {problems}"
    assert reason in problems[key]
    assert f"{key}: {problems[key]}" in str(info.value)


AGENT_BAD_CASES = [
    pytest.param(
        'relay_url = "wss://',
        'relay_url = "ws://',
        "relay_url",
        "ws:// is refused",
        id="plain-ws",
    ),
    pytest.param('relay_url = "wss://', 'relay_url = "https://', "relay_url", "wss://", id="https-url"),
    pytest.param(
        "relay.example.org:8443",
        "relay.example.org:99999",
        "relay_url",
        "invalid port",
        id="url-bad-port",
    ),
    pytest.param("wss://relay", "wss://user:pw@relay", "relay_url", "credentials", id="url-credentials"),
    pytest.param(
        "backoff_initial = 0.5",
        "backoff_initial = 60.0",
        "backoff_initial",
        "must not exceed backoff_max",
        id="backoff-order",
    ),
    pytest.param("backoff_max = 30.0", "backoff_max = 0", "backoff_max", "greater than 0", id="zero-backoff"),
    pytest.param(
        'name = "archive"', 'name = "pacs"', "routes.1.name", "duplicate route name", id="dup-route"
    ),
    pytest.param('name = "pacs"', 'name = "PACS"', "routes.0.name", "a-z, 0-9", id="bad-route-name"),
    pytest.param(
        'called_ae = "ORTHANC"',
        'called_ae = ""',
        "routes.0.called_ae",
        "all spaces",
        id="empty-called-ae",
    ),
    pytest.param("port = 4242", "port = 0", "routes.0.port", "greater than or equal to 1", id="route-port"),
    pytest.param("enabled = true", "enable = true", "listener.enable", "unknown key", id="listener-typo"),
    pytest.param("port = 8082", "port = 11112", "status.port", "already used", id="status-port-clash"),
    pytest.param("[status]", "[satus]", "satus", "unknown key", id="section-typo"),
]


@pytest.mark.parametrize(("old", "new", "key", "reason"), AGENT_BAD_CASES)
def test_agent_error_names_key(tmp_path: Path, old: str, new: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_agent_settings(_write(tmp_path, _patched(AGENT_TOML, old, new)))
    problems = _problem_keys(info.value)
    assert key in problems, f"{key} not among {problems}"
    assert reason in problems[key]


def test_disabled_listener_may_share_status_port(tmp_path: Path) -> None:
    text = _patched(AGENT_TOML, "enabled = true\nport = 11112", "enabled = false\nport = 8082")
    assert load_agent_settings(_write(tmp_path, text)).listener.enabled is False


# --- AE titles and mux -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("PACS", "PACS"), ("  PACS  ", "PACS"), ("A" * 16, "A" * 16), ("CT 1", "CT 1"), ("~!@#", "~!@#")],
)
def test_ae_title_valid(raw: str, expected: str) -> None:
    assert validate_ae_title(raw) == expected


@pytest.mark.parametrize("raw", ["", "   ", "A" * 17, "A\\B", "PACS\t", "PÄCS", "A\nB", "A\x00"])
def test_ae_title_invalid(raw: str) -> None:
    with pytest.raises(ValueError):
        validate_ae_title(raw)


def test_mux_config_mirrors_mux_limits() -> None:
    names = [field.name for field in dataclasses.fields(MuxLimits)]
    assert list(MuxConfig.model_fields) == names
    assert MuxConfig().to_limits() == MuxLimits()
    assert MuxConfig(max_streams=7).to_limits().max_streams == 7
    with pytest.raises(pydantic.ValidationError):
        MuxConfig(bogus=1)


def test_agent_paths_follow_state_dir(tmp_path: Path) -> None:
    settings = load_agent_settings(_write(tmp_path, f'state_dir = "{tmp_path}/st"\n'))
    assert settings.relay_url is None
    assert (settings.cert_file, settings.key_file, settings.ca_file) == (
        tmp_path / "st/agent.crt", tmp_path / "st/agent.key", tmp_path / "st/ca.crt")


def test_agent_without_relay_url_needs_an_enrollment(tmp_path: Path) -> None:
    from tunnel_agent.enroll import EnrollError, with_enrollment

    settings = load_agent_settings(_write(tmp_path, f'state_dir = "{tmp_path}/st"\n'))
    with pytest.raises(EnrollError, match="not enrolled"):
        with_enrollment(settings)
    (tmp_path / "st").mkdir()
    (tmp_path / "st/enrollment.json").write_text(json.dumps(
        {"relay_url": "wss://relay.example.org:8443/tunnel", "site": "a", "ca_fingerprint": "0" * 64,
         "not_after": 0}))
    assert with_enrollment(settings).relay_url == "wss://relay.example.org:8443/tunnel"


# --- the relay URL: the enrollment token's, unless the operator sets one (issue 10) -------------------------

ENROLLED_URL = "wss://relay.hospital-cloud.test:8443/tunnel"


def _enrolled_state(tmp_path: Path) -> Path:
    state = tmp_path / "st"
    state.mkdir()
    (state / "enrollment.json").write_text(json.dumps(
        {"relay_url": ENROLLED_URL, "site": "a", "ca_fingerprint": "0" * 64, "not_after": 0}))
    return state


def test_the_tokens_relay_url_wins_over_an_unset_one(tmp_path: Path) -> None:
    from tunnel_agent.enroll import relay_url_mismatch, with_enrollment

    state = _enrolled_state(tmp_path)
    settings = with_enrollment(load_agent_settings(_write(tmp_path, f'state_dir = "{state}"\n')))
    assert settings.relay_url == ENROLLED_URL and settings.relay_host == "relay.hospital-cloud.test"
    assert relay_url_mismatch(settings) is None
    assert with_enrollment(settings) == settings  # applied twice (the CLI, then the agent): the same


def test_an_explicit_relay_url_wins_over_the_token_and_the_mismatch_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunnel_agent.enroll import relay_url_mismatch, with_enrollment

    state = _enrolled_state(tmp_path)
    moved = "wss://relay-2.hospital-cloud.test:8443/tunnel"
    in_file = with_enrollment(load_agent_settings(_write(tmp_path, f'state_dir = "{state}"\nrelay_url = "{moved}"\n')))
    assert in_file.relay_url == moved
    mismatch = relay_url_mismatch(in_file)
    assert mismatch is not None and moved in mismatch and ENROLLED_URL in mismatch and "Remove relay_url" in mismatch
    same_toml = _write(tmp_path, f'state_dir = "{state}"\nrelay_url = "{ENROLLED_URL}"\n', "same.toml")
    same = with_enrollment(load_agent_settings(same_toml))
    assert same.relay_url == ENROLLED_URL and relay_url_mismatch(same) is None
    monkeypatch.setenv("TUNNEL_AGENT_RELAY_URL", moved)
    from_env = with_enrollment(load_agent_settings(_write(tmp_path, f'state_dir = "{state}"\n', "env.toml")))
    assert from_env.relay_url == moved


def test_the_example_agent_config_dials_no_placeholder_and_shows_state_dir() -> None:
    settings = load_agent_settings(DEPLOY / "agent.example.toml")
    assert settings.relay_url is None  # the enrollment token's URL is used
    assert "state_dir" in settings.model_fields_set
    text = (DEPLOY / "agent.example.toml").read_text()
    assert "\nrelay_url" not in text and "\n# relay_url" in text


def test_refusal_retries_default_long(tmp_path: Path) -> None:
    settings = load_agent_settings(_write(tmp_path, 'relay_url = "wss://relay.example.org/tunnel"\n'))
    assert (settings.revoked_retry, settings.refused_retry) == (3600.0, 300.0)
    assert settings.revoked_retry > settings.backoff_max
    text = (DEPLOY / "agent.example.toml").read_text()
    assert "revoked_retry = 3600.0" in text and "refused_retry = 300.0" in text
