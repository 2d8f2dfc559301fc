"""HTTP CONNECT proxy support in the agent: the [proxy] settings, the curl-like HTTPS_PROXY/NO_PROXY choice,
the one-line reasons for a proxy's failures, and a real squid between a real agent and a real relay.

The squid scenarios prove the path from the sockets themselves (/proc): while DICOM flows, the agent has
a TCP connection to squid and none to the relay, and the relay's only tunnel peer is squid's upstream
socket; squid's access log then shows the authenticated CONNECT from the agent's own source port.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pydantic
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from tests.support.dcmtk import echoscu, start_storescp, storescu
from tests.support.ports import free_port
from tests.support.procs import ManagedProcess, ProcessTracker, wait_for_port, wait_until
from tests.support.squid import SquidHandle, running_squid
from tests.support.stack import (
    AGENT,
    AgentHandle,
    AgentRoute,
    ListenerRoute,
    RelayHandle,
    SiteDest,
    make_agent,
    make_relay,
    start_relay,
)
from tunnel_agent.config import load_agent_settings
from tunnel_agent.connect import proxy_failure
from tunnel_agent.proxy import ProxyConfig, ProxyError, ProxyRoute, choose_proxy, no_proxy_matches
from tunnel_runtime.settings import ConfigError

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
USER = "tunnel-agent"
RELAY_URL = "wss://relay.example.org:8443/tunnel"
SITE = "hospital-a"
# Inherited proxy settings (a CI runner's, a developer's) must not decide which path a test takes.
NO_ENV_PROXY = {"https_proxy": "", "HTTPS_PROXY": "", "no_proxy": "", "NO_PROXY": ""}


def new_password() -> str:
    return "pw-" + secrets.token_hex(12)


# --- [proxy] settings ------------------------------------------------------------------------------


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'relay_url = "{RELAY_URL}"\n' + text)
    return path


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("TUNNEL_AGENT_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_no_proxy_section_means_direct_or_environment(clean_env):
    config = ProxyConfig()
    assert (config.url, config.username, config.password, config.use_env) == (None, None, None, True)


@pytest.mark.parametrize(("url", "normalised"), [
    ("http://proxy.example.org:3128", "http://proxy.example.org:3128"),
    ("http://proxy.example.org:3128/", "http://proxy.example.org:3128"),
    ("HTTP://10.0.0.1:8080", "http://10.0.0.1:8080"),
    ("http://[2001:db8::1]:3128", "http://[2001:db8::1]:3128"),
])
def test_proxy_url_accepted(url, normalised):
    assert ProxyConfig(url=url).url == normalised


@pytest.mark.parametrize(("url", "reason"), [
    ("https://proxy.example.org:3128", "https:// proxies are not supported"),
    ("socks5://proxy.example.org:1080", "must be an http:// URL"),
    ("proxy.example.org:3128", "must be an http:// URL"),
    ("http://proxy.example.org", "must name the proxy port"),
    ("http://:3128", "must name the proxy host"),
    ("http://proxy.example.org:99999", "invalid port"),
    ("http://proxy.example.org:3128/path", "without a path"),
    ("http://proxy.example.org:3128/?a=b", "without a path"),
])
def test_proxy_url_refused_with_a_reason(tmp_path, clean_env, url, reason):
    with pytest.raises(ConfigError) as caught:
        load_agent_settings(write_toml(tmp_path, f'[proxy]\nurl = "{url}"\n'))
    assert [key for key, _ in caught.value.problems] == ["proxy.url"]
    assert reason in caught.value.problems[0][1]


def test_credentials_in_the_url_are_refused_without_quoting_them(tmp_path, clean_env):
    password = new_password()
    with pytest.raises(ConfigError) as caught:
        load_agent_settings(write_toml(tmp_path, f'[proxy]\nurl = "http://alice:{password}@proxy:3128"\n'))
    assert caught.value.problems == [
        ("proxy.url", "must not carry credentials; set proxy.username and proxy.password instead")]
    assert password not in str(caught.value)
    with pytest.raises(pydantic.ValidationError) as direct:
        ProxyConfig(url=f"http://alice:{password}@proxy:3128")
    assert password not in str(direct.value)


@pytest.mark.parametrize(("section", "key", "reason"), [
    ('password = "x"', "proxy.username", "is required when proxy.password is set"),
    ('username = "u"\nuse_env = false', "proxy.username", "no proxy is used"),
    ('url = "http://p:3128"\nusername = "a:b"', "proxy.username", "must not contain ':'"),
    ('url = "http://p:3128"\nusername = ""', "proxy.username", "at least 1 character"),
    ('url = "http://p:3128"\nusername = "u"\npassword = "a\\nb"', "proxy.password", "control characters"),
    ('url = "http://p:3128"\nusername = "u"\npassword = 1234', "proxy.password", "valid string"),
    ('url = "http://p:3128"\nuser = "u"', "proxy.user", "unknown key"),
])
def test_credential_rules(tmp_path, clean_env, section, key, reason):
    with pytest.raises(ConfigError) as caught:
        load_agent_settings(write_toml(tmp_path, f"[proxy]\n{section}\n"))
    assert [k for k, _ in caught.value.problems] == [key]
    assert reason in caught.value.problems[0][1]


def test_long_password_refused_without_quoting_it(tmp_path, clean_env):
    password = "p" * 2000
    with pytest.raises(ConfigError) as caught:
        load_agent_settings(write_toml(tmp_path, f'[proxy]\nurl = "http://p:3128"\nusername = "u"\n'
                                                 f'password = "{password}"\n'))
    assert caught.value.problems == [("proxy.password", "must be at most 1024 characters")]


def test_environment_overrides_and_the_password_stays_secret(tmp_path, clean_env):
    password = new_password()
    clean_env.setenv("TUNNEL_AGENT_PROXY__URL", "http://127.0.0.1:3128")
    clean_env.setenv("TUNNEL_AGENT_PROXY__USERNAME", USER)
    clean_env.setenv("TUNNEL_AGENT_PROXY__PASSWORD", password)
    settings = load_agent_settings(write_toml(tmp_path, ""))
    assert settings.proxy.url == "http://127.0.0.1:3128"
    assert settings.proxy.password is not None and settings.proxy.password.get_secret_value() == password
    dumped = settings.model_dump_json()
    assert password not in repr(settings) and password not in str(settings) and password not in dumped


def test_bad_environment_override_names_the_variable(tmp_path, clean_env):
    clean_env.setenv("TUNNEL_AGENT_PROXY__URL", "https://proxy:3128")
    with pytest.raises(ConfigError) as caught:
        load_agent_settings(write_toml(tmp_path, ""))
    (key, reason), = caught.value.problems
    assert key == "proxy.url" and "from environment variable TUNNEL_AGENT_PROXY__URL" in reason


def test_example_proxy_section_is_valid(tmp_path, clean_env):
    """The commented [proxy] block in deploy/agent.example.toml, uncommented, loads as documented."""
    lines = (DEPLOY / "agent.example.toml").read_text().splitlines()
    start = lines.index("# [proxy]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# ") or line.startswith("#  "):
            break
        block.append(line[2:])
    settings = load_agent_settings(write_toml(tmp_path, "\n".join(block) + "\n"))
    assert settings.proxy.url == "http://proxy.hospital.example:3128"
    assert settings.proxy.username == "tunnel-agent" and settings.proxy.use_env is True


# --- which proxy: configured, HTTPS_PROXY, NO_PROXY --------------------------------------------------


def test_configured_url_wins_and_ignores_no_proxy():
    config = ProxyConfig(url="http://10.1.1.1:3128", username=USER, password="s")
    env = {"HTTPS_PROXY": "http://other:8080", "NO_PROXY": "*"}
    route = choose_proxy(config, RELAY_URL, env)
    assert route == ProxyRoute("10.1.1.1", 3128, "proxy.url", USER, "s", "proxy.username/password")


def test_no_proxy_and_no_environment_is_direct():
    assert choose_proxy(ProxyConfig(), RELAY_URL, {}) is None
    assert choose_proxy(ProxyConfig(), RELAY_URL, {"HTTPS_PROXY": "  "}) is None
    assert choose_proxy(ProxyConfig(), RELAY_URL, {"HTTP_PROXY": "http://p:1", "ALL_PROXY": "http://p:1"}) is None


def test_use_env_false_ignores_https_proxy():
    assert choose_proxy(ProxyConfig(use_env=False), RELAY_URL, {"HTTPS_PROXY": "http://p:3128"}) is None


def test_https_proxy_from_environment_with_credentials():
    env = {"HTTPS_PROXY": "http://al%40ice:p%3Ass@proxy.corp:8080"}
    route = choose_proxy(ProxyConfig(), RELAY_URL, env)
    assert route == ProxyRoute("proxy.corp", 8080, "HTTPS_PROXY", "al@ice", "p:ss", "the credentials in HTTPS_PROXY")
    assert "p:ss" not in repr(route)
    assert route.url == "http://proxy.corp:8080" and route.auth_hint() == "check the credentials in HTTPS_PROXY"
    assert route.authorization() == "Basic " + base64.b64encode(b"al@ice:p:ss").decode()


def test_lower_case_wins_and_curl_defaults_apply():
    env = {"https_proxy": "proxy.corp", "HTTPS_PROXY": "http://upper:1"}
    route = choose_proxy(ProxyConfig(), RELAY_URL, env)
    assert (route.host, route.port, route.source, route.username) == ("proxy.corp", 1080, "https_proxy", None)
    assert route.auth_hint() == "the proxy wants credentials: set proxy.username and proxy.password"


def test_configured_credentials_apply_to_the_environment_proxy():
    config = ProxyConfig(username=USER, password="s")
    route = choose_proxy(config, RELAY_URL, {"HTTPS_PROXY": "http://old:creds@proxy.corp:8080"})
    assert (route.host, route.username, route.password, route.credentials_source) == (
        "proxy.corp", USER, "s", "proxy.username/password")


@pytest.mark.parametrize("no_proxy", ["relay.example.org", ".example.org", "example.org", "*",
                                      "localhost, EXAMPLE.ORG", "other.org relay.example.org."])
def test_no_proxy_exempts_the_relay(no_proxy):
    for name in ("NO_PROXY", "no_proxy"):
        assert choose_proxy(ProxyConfig(), RELAY_URL, {"HTTPS_PROXY": "http://p:3128", name: no_proxy}) is None


@pytest.mark.parametrize(("no_proxy", "host", "matches"), [
    ("example.org", "relay.example.org", True),
    ("example.org", "badexample.org", False),
    ("relay.example.org", "example.org", False),
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.0/8", "127.0.0.1", True),
    ("10.0.0.0/8", "127.0.0.1", False),
    ("::1", "[::1]", True),
    ("[::1]", "::1", True),
    ("fd00::/8", "fd12::5", True),
    ("127.0.0.1", "localhost", False),
    ("localhost", "127.0.0.1", False),
    ("", "relay.example.org", False),
    (",, ,", "relay.example.org", False),
    (".", "relay.example.org", False),
])
def test_no_proxy_matches_like_curl(no_proxy, host, matches):
    assert no_proxy_matches(no_proxy, host) is matches


@pytest.mark.parametrize(("value", "reason"), [
    ("https://alice:SECRET@proxy.corp:443", "HTTPS_PROXY names a https:// proxy at proxy.corp:443"),
    ("socks5h://alice:SECRET@proxy.corp:1080", "HTTPS_PROXY names a socks5h:// proxy at proxy.corp:1080: only"),
    ("http://alice:SECRET@proxy.corp:notaport", "HTTPS_PROXY has an invalid port"),
    ("http://alice:SECRET@:3128", "HTTPS_PROXY does not name a proxy host"),
    ("http://al%3Aice:SECRET@proxy.corp:3128", "the user name in HTTPS_PROXY must not contain ':'"),
])
def test_unusable_environment_proxy_fails_closed(value, reason):
    with pytest.raises(ProxyError) as caught:
        choose_proxy(ProxyConfig(), RELAY_URL, {"HTTPS_PROXY": value})
    assert str(caught.value).startswith(reason)
    assert "SECRET" not in str(caught.value)


# --- the proxy's failures, one line each ----------------------------------------------------------


PROXY = ProxyRoute("127.0.0.1", 3128, "proxy.url", USER, "s3cret", "proxy.username/password")
TARGET = "relay.example.org:8443"


def proxy_refusal(status: int, message: str) -> aiohttp.ClientHttpProxyError:
    url = URL("https://relay.example.org:8443/tunnel")
    info = aiohttp.RequestInfo(url, "CONNECT", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientHttpProxyError(info, (), status=status, message=message)


def connection_key(host: str, port: int):
    from aiohttp.client_reqrep import ConnectionKey

    return ConnectionKey(host, port, False, True, None, None, None)


@pytest.mark.parametrize(("proxy", "status", "message", "expected"), [
    (PROXY, 407, "Proxy Authentication Required",
     "proxy 127.0.0.1:3128 refused CONNECT to relay.example.org:8443: 407 Proxy Authentication Required "
     "(check proxy.username/password)"),
    (ProxyRoute("127.0.0.1", 3128, "HTTPS_PROXY"), 407, "x",
     "proxy 127.0.0.1:3128 refused CONNECT to relay.example.org:8443: 407 Proxy Authentication Required "
     "(the proxy wants credentials: set proxy.username and proxy.password)"),
    (PROXY, 403, "Forbidden",
     "proxy 127.0.0.1:3128 refused CONNECT to relay.example.org:8443: 403 Forbidden (the proxy's policy "
     "does not allow CONNECT to relay.example.org:8443; ask the network team to allow it)"),
    (PROXY, 503, "Service Unavailable",
     "proxy 127.0.0.1:3128 refused CONNECT to relay.example.org:8443: 503 Service Unavailable "
     "(the proxy could not reach the relay at relay.example.org:8443)"),
    (PROXY, 599, "Odd\r\nInjected: header\x00" + "x" * 200,
     "proxy 127.0.0.1:3128 refused CONNECT to relay.example.org:8443: 599 OddInjected: header" + "x" * 61),
])
def test_refused_connect_is_one_line_naming_the_proxy(proxy, status, message, expected):
    error = proxy_failure(proxy, TARGET, proxy_refusal(status, message), 10.0)
    assert isinstance(error, ProxyError) and (error.status, error.address) == (status, "127.0.0.1:3128")
    assert str(error) == expected and "\n" not in str(error)


def test_unreachable_proxy():
    exc = aiohttp.ClientProxyConnectionError(connection_key("127.0.0.1", 3128),
                                             ConnectionRefusedError(111, "Connect call failed"))
    error = proxy_failure(PROXY, TARGET, exc, 10.0)
    assert str(error) == "cannot reach proxy 127.0.0.1:3128: Connect call failed"
    assert "s3cret" not in str(error)


def test_silent_proxy_times_out_naming_it():
    error = proxy_failure(PROXY, TARGET, TimeoutError(), 5.0)
    assert str(error) == ("no tunnel to relay.example.org:8443 through proxy 127.0.0.1:3128 within 5 s "
                          "(the proxy or, behind it, the relay did not answer)")


def test_failures_past_the_proxy_pass_through():
    key = connection_key("relay.example.org", 8443)
    assert proxy_failure(PROXY, TARGET, aiohttp.ClientConnectorError(key, ConnectionResetError()), 5.0) is None
    assert proxy_failure(PROXY, TARGET, aiohttp.ClientSSLError(key, OSError("bad cert")), 5.0) is None
    assert proxy_failure(PROXY, TARGET, aiohttp.ServerDisconnectedError(), 5.0) is None


# --- a real squid between a real agent and a real relay ----------------------------------------------


@dataclass(frozen=True)
class TcpConnection:
    local_port: int
    remote_port: int


def tcp_connections(pid: int) -> list[TcpConnection]:
    """The established TCP connections owned by process `pid` (its socket inodes in /proc/net/tcp*)."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if match := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(match.group(1))
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                found.append(TcpConnection(int(fields[1].rsplit(":", 1)[1], 16),
                                           int(fields[2].rsplit(":", 1)[1], 16)))
    return found


@pytest.fixture
def stack(procs, tmp_path):
    """storescp as the hospital PACS and as the cloud destination, a relay, and an agent config."""
    pacs_port, cloud_port = free_port(), free_port()
    start_storescp(procs, pacs_port, "PACS", tmp_path / "pacs")
    start_storescp(procs, cloud_port, "CLOUD", tmp_path / "cloud")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("HOSP_PACS", SITE, "pacs")],
                       sites={SITE: [SiteDest("CLOUD", cloud_port)]})
    agent = make_agent(relay, SITE, tmp_path / "agent", routes=[AgentRoute("pacs", pacs_port, "PACS")])
    start_relay(procs, relay)
    return relay, agent


def add_proxy_section(agent: AgentHandle, **keys: str) -> None:
    """Append [proxy] to the agent's TOML; the file may now hold a password, so it becomes 0600."""
    lines = ["", "[proxy]"] + [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    agent.config.chmod(0o600)
    with agent.config.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def spawn_agent(procs: ProcessTracker, agent: AgentHandle, env: dict[str, str] | None = None) -> ManagedProcess:
    """`tunnel-agent run -v` (debug logging: the password must not show up even there)."""
    agent.proc = procs.spawn([AGENT, "run", "--config", str(agent.config), "-v"],
                             env={**NO_ENV_PROXY, **(env or {})}, name=f"agent-{agent.site}")
    wait_for_port("127.0.0.1", agent.status_port, 15, proc=agent.proc)
    return agent.proc


def wait_connected(agent: AgentHandle, relay: RelayHandle) -> None:
    wait_until(lambda: agent.status()["state"] == "connected", 20,
               message=lambda: f"agent connected; status {agent.status()}; log:\n{agent.proc.log_tail()}")
    wait_until(lambda: relay.site_connected(SITE), 15, message="relay sees the site")


def assert_secret_kept(password: str, agent: AgentHandle, *others: ManagedProcess) -> None:
    """Not in the agent's (debug) log, its status JSON, its command line, nor the other processes' logs."""
    assert agent.proc is not None
    assert password not in agent.proc.log_text()
    assert password not in json.dumps(agent.status())
    assert password.encode() not in Path(f"/proc/{agent.proc.pid}/cmdline").read_bytes()
    for proc in others:
        assert password not in proc.log_text()


def assert_only_through_squid(agent: AgentHandle, relay: RelayHandle, squid: SquidHandle) -> int:
    """The agent's link goes agent -> squid -> relay; returns the agent's source port towards squid."""
    assert agent.proc is not None and relay.proc is not None
    mine = tcp_connections(agent.proc.pid)
    assert relay.tunnel_port not in {c.remote_port for c in mine}, mine
    to_squid = [c.local_port for c in mine if c.remote_port == squid.port]
    assert len(to_squid) == 1, mine
    upstream = {c.local_port for c in tcp_connections(squid.proc.pid) if c.remote_port == relay.tunnel_port}
    relay_peers = {c.remote_port for c in tcp_connections(relay.proc.pid) if c.local_port == relay.tunnel_port}
    assert upstream and relay_peers == upstream
    return to_squid[0]


def test_dicom_both_ways_only_through_squid(procs, tmp_path, stack, ct_study_small):
    relay, agent = stack
    password = new_password()
    files = ct_study_small.files[:3]
    with running_squid(procs, tmp_path / "squid", users={USER: password}) as squid:
        add_proxy_section(agent, url=f"http://{squid.address}", username=USER)
        spawn_agent(procs, agent, env={"TUNNEL_AGENT_PROXY__PASSWORD": password})
        wait_connected(agent, relay)
        source_port = assert_only_through_squid(agent, relay, squid)

        echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI").check()
        echoscu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY").check()
        storescu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY", files).check()
        storescu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI", files).check()
        assert len(list((tmp_path / "cloud").iterdir())) == len(files)
        assert len(list((tmp_path / "pacs").iterdir())) == len(files)
        assert_only_through_squid(agent, relay, squid)
        assert f"connecting to the relay through proxy {squid.address} (from proxy.url)" in agent.proc.log_text()
        assert_secret_kept(password, agent, relay.proc, squid.proc)

        agent.proc.stop()  # squid logs a CONNECT when its tunnel closes
        target = f"127.0.0.1:{relay.tunnel_port}"
        entries = wait_until(lambda: squid.connects(target), 15, message=f"squid's log of CONNECT {target}")
        assert [(e.result, e.user, e.client_port) for e in entries] == [("TCP_TUNNEL/200", USER, source_port)]
        assert password not in squid.access_log.read_text()


def test_wrong_password_names_the_407_and_never_goes_direct(procs, tmp_path, stack):
    relay, agent = stack
    password, wrong = new_password(), new_password()
    with running_squid(procs, tmp_path / "squid", users={USER: password}) as squid:
        add_proxy_section(agent, url=f"http://{squid.address}", username=USER, password=wrong)
        spawn_agent(procs, agent)
        target = f"127.0.0.1:{relay.tunnel_port}"
        # At least three attempts, every one refused by squid.
        wait_until(lambda: len(squid.connects(target)) >= 3, 30,
                   message=lambda: f"three refused CONNECTs; agent log:\n{agent.proc.log_tail()}")
        assert {(e.result, e.user) for e in squid.connects(target)} == {("TCP_DENIED/407", USER)}
        status = agent.status()
        assert status["last_error"] == (
            f"ProxyError: proxy {squid.address} refused CONNECT to {target}: 407 Proxy Authentication Required "
            "(check proxy.username/password)")
        assert status["state"] != "connected" and status["connects"] == 0
        # Never a direct attempt: the relay saw no TLS connection at all, and the agent holds none to it.
        assert not relay.site_connected(SITE)
        assert relay.tunnel_port not in {c.remote_port for c in tcp_connections(agent.proc.pid)}
        assert " connected from " not in relay.proc.log_text() and "refused tunnel" not in relay.proc.log_text()
        assert_secret_kept(wrong, agent, relay.proc, squid.proc)
        assert_secret_kept(password, agent)


def test_forbidden_destination_names_the_403(procs, tmp_path, stack):
    relay, agent = stack
    password = new_password()
    with running_squid(procs, tmp_path / "squid", users={USER: password}, connect_ports=[443]) as squid:
        add_proxy_section(agent, url=f"http://{squid.address}", username=USER, password=password)
        spawn_agent(procs, agent)
        target = f"127.0.0.1:{relay.tunnel_port}"
        wait_until(lambda: "403" in agent.status()["last_error"], 20,
                   message=lambda: f"a 403 in last_error; agent log:\n{agent.proc.log_tail()}")
        assert agent.status()["last_error"] == (
            f"ProxyError: proxy {squid.address} refused CONNECT to {target}: 403 Forbidden (the proxy's policy "
            f"does not allow CONNECT to {target}; ask the network team to allow it)")
        assert not relay.site_connected(SITE)


def test_unreachable_proxy_is_named_and_never_bypassed(procs, stack):
    relay, agent = stack
    dead = free_port()  # nothing listens here
    add_proxy_section(agent, url=f"http://127.0.0.1:{dead}")
    spawn_agent(procs, agent)
    wait_until(lambda: agent.status()["last_error"].startswith(f"ProxyError: cannot reach proxy 127.0.0.1:{dead}: "),
               20, message=lambda: f"the unreachable proxy in last_error; status {agent.status()}")
    wait_until(lambda: agent.proc.log_text().count("through proxy") >= 2, 20, message="a second attempt")
    assert agent.status()["connects"] == 0 and not relay.site_connected(SITE)


def test_https_proxy_from_the_environment(procs, tmp_path, stack):
    relay, agent = stack
    password = new_password()
    with running_squid(procs, tmp_path / "squid", users={USER: password}) as squid:
        spawn_agent(procs, agent, env={"HTTPS_PROXY": f"http://{USER}:{password}@{squid.address}"})
        wait_connected(agent, relay)
        source_port = assert_only_through_squid(agent, relay, squid)
        echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI").check()
        echoscu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY").check()
        assert f"through proxy {squid.address} (from HTTPS_PROXY)" in agent.proc.log_text()
        assert_secret_kept(password, agent, relay.proc, squid.proc)
        agent.proc.stop()
        entries = wait_until(lambda: squid.connects(f"127.0.0.1:{relay.tunnel_port}"), 15, message="CONNECT logged")
        assert [(e.result, e.user, e.client_port) for e in entries] == [("TCP_TUNNEL/200", USER, source_port)]


def test_no_proxy_exempts_the_relay_end_to_end(procs, stack):
    relay, agent = stack
    dead = free_port()  # the environment's proxy is down; NO_PROXY makes that irrelevant
    spawn_agent(procs, agent, env={"https_proxy": f"http://127.0.0.1:{dead}", "NO_PROXY": "localhost,127.0.0.0/8"})
    wait_connected(agent, relay)
    assert "through proxy" not in agent.proc.log_text()
    assert relay.tunnel_port in {c.remote_port for c in tcp_connections(agent.proc.pid)}
