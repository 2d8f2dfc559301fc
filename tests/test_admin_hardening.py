"""The relay's HTTP guards (relay/guard.py): the admin port's Host allow-list, wrong admin tokens throttled per
source without ever locking out the right token, and no Server version header on either port.

Pure parts first (Host parsing, settings), then one real relay process for the module. Clients pick their
source address inside 127.0.0.0/8 (127.0.0.1 is "the operator"); each test uses its own addresses, because
the relay's limiter remembers every source for the module's lifetime.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest

from relay.config import AdminConfig, EnrollmentRateLimit, LoginRateLimit, load_relay_settings
from relay.guard import host_allowed, parse_host
from tests.support.procs import wait_until
from tests.support.stack import ListenerRoute, make_relay, start_relay
from tunnel_core.ratelimit import RateLimits
from tunnel_runtime.settings import ConfigError

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALLOWED_NAME = "relay-admin.test"
LOGIN_BURST = LoginRateLimit().per_source_burst
TIMEOUT = aiohttp.ClientTimeout(total=10)


# --- pure parts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "host"), [
    ("localhost", "localhost"), ("LocalHost:8081", "localhost"), ("localhost.:8081", "localhost"),
    ("127.0.0.1", "127.0.0.1"), ("127.0.0.1:8081", "127.0.0.1"), ("[::1]", "::1"), ("[::1]:8081", "::1"),
    ("relay-admin.test:80", "relay-admin.test"),
    ("::1", None), ("[::1", None), ("[evil.example]:80", None), ("localhost:80x", None), ("localhost:", None),
    ("localhost:8081:1", None), ("", None), (":8081", None), ("localhost:1234567", None),
])
def test_host_header_parsing(value, host):
    assert parse_host(value) == host


@pytest.mark.parametrize(("value", "allowed"), [
    ("localhost:8081", True), ("127.0.0.1:8081", True), ("[::1]:8081", True), ("10.1.2.3:8081", True),
    ("[2001:db8::5]", True), (f"{ALLOWED_NAME}:8081", True), (ALLOWED_NAME.upper(), True),
    ("evil.example", False), ("evil.example:8081", False), ("127.0.0.1.evil.example", False),
    ("localhost.evil.example", False), (f"{ALLOWED_NAME}.evil.example", False), ("", False), (None, False),
])
def test_host_allow_list(value, allowed):
    assert host_allowed(value, frozenset({ALLOWED_NAME})) is allowed


def test_limit_settings_have_safe_defaults_and_are_documented_in_the_example():
    settings = load_relay_settings(None)
    assert settings.admin.allowed_hosts == [] and settings.admin.host_names() == ["127.0.0.1"]
    enroll, login = settings.enrollment.rate_limit.to_limits(), settings.admin.login_rate_limit.to_limits()
    assert isinstance(enroll, RateLimits) and enroll.per_source_rate == pytest.approx(6 / 60)
    assert login.per_source_burst == 10 and login.total_rate == pytest.approx(10 / 60)
    text = (DEPLOY / "relay.example.toml").read_text()
    for model in (EnrollmentRateLimit(), LoginRateLimit()):
        for name, value in model.model_dump().items():
            assert f"# {name} = {value}" in text, name
    assert "allowed_hosts = []" in text
    example = load_relay_settings(DEPLOY / "relay.example.toml")
    assert example.enrollment.rate_limit == EnrollmentRateLimit() and example.admin.allowed_hosts == []


def test_limit_settings_refuse_nonsense(tmp_path):
    for bad in ("[admin]\nport = 8081\nallowed_hosts = [\"evil.example/x\"]\n",
                "[admin]\nport = 8081\nallowed_hosts = [\"\"]\n",
                "[admin.login_rate_limit]\nper_source_burst = 0\n",
                "[enrollment.rate_limit]\ntotal_per_minute = 0\n",
                "[enrollment.rate_limit]\nwhat = 1\n"):
        path = tmp_path / "relay.toml"
        path.write_text(bad)
        with pytest.raises(ConfigError):
            load_relay_settings(path)
    assert AdminConfig(host="admin.internal", allowed_hosts=["a.example"]).host_names() == ["a.example",
                                                                                            "admin.internal"]


# --- a real relay process --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay(module_procs, tmp_path_factory):
    handle = make_relay(tmp_path_factory.mktemp("hardening") / "relay",
                        listener_routes=[ListenerRoute("HOSP_PACS", "hospital-a", "pacs")],
                        sites={"hospital-a": []})
    admin_section = f'[admin]\nhost = "127.0.0.1"\nport = {handle.admin_port}\n'
    text = handle.config.read_text()
    assert admin_section in text
    handle.config.write_text(text.replace(admin_section, admin_section + f'allowed_hosts = ["{ALLOWED_NAME}"]\n'))
    start_relay(module_procs, handle)
    return handle


def admin_client(relay, source: str = "127.0.0.1", **kwargs) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(f"http://127.0.0.1:{relay.admin_port}", timeout=TIMEOUT,
                                 connector=aiohttp.TCPConnector(local_addr=(source, 0)), **kwargs)


async def _status(http: aiohttp.ClientSession, method: str, path: str, **kwargs) -> tuple[int, dict, str]:
    async with http.request(method, path, allow_redirects=False, **kwargs) as r:
        return r.status, dict(r.headers), await r.text()


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


async def test_a_foreign_host_header_is_refused_before_any_handler(relay):
    async with admin_client(relay) as http:
        for path in ("/healthz", "/metrics", "/login", "/api/status", "/static/dashboard.js", "/no-such-page"):
            for host in ("evil.example", f"evil.example:{relay.admin_port}", "127.0.0.1.evil.example",
                         "localhost.evil.example"):
                status, headers, body = await _status(
                    http, "GET", path, headers={"Host": host, "Authorization": f"Bearer {relay.admin_token}"})
                assert status == 421, (path, host)
                assert "evil" not in body and len(body) < 200 and "Server" not in headers
        status, _, body = await _status(http, "POST", "/login", headers={"Host": "evil.example"},
                                        data={"token": relay.admin_token})
        assert status == 421 and "Set-Cookie" not in body
        for host in (f"localhost:{relay.admin_port}", f"127.0.0.1:{relay.admin_port}", f"[::1]:{relay.admin_port}",
                     "localhost", f"{ALLOWED_NAME}:{relay.admin_port}"):
            status, _, _ = await _status(http, "GET", "/healthz", headers={"Host": host})
            assert status == 200, host
    for request in (b"GET /healthz HTTP/1.0\r\n\r\n", b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"):
        answer = _raw_request(relay.admin_port, request)  # no Host header at all
        assert answer.split(b" ", 2)[1] in (b"400", b"421"), answer
    async with admin_client(relay) as http:
        status, _, text = await _status(http, "GET", "/metrics")
        assert status == 200
        refused = next(line for line in text.splitlines() if line.startswith("dicom_tunnel_admin_misdirected_total "))
        assert float(refused.split()[-1]) >= 6 * 4 + 1


async def _log_in(http: aiohttp.ClientSession, token: str) -> tuple[int, dict, str]:
    return await _status(http, "POST", "/login", data={"token": token})


async def test_wrong_dashboard_tokens_throttle_only_their_source_and_never_the_right_token(relay):
    async with admin_client(relay, "127.0.0.2") as noisy, admin_client(relay, "127.0.0.3") as other, \
            admin_client(relay, "127.0.0.1") as operator:
        for i in range(LOGIN_BURST):
            status, _, _ = await _log_in(noisy, f"wrong-{i}")
            assert status == 401, i
        async with asyncio.timeout(60):
            for i in range(200):  # a flood: every one throttled, none processed
                status, headers, page = await _log_in(noisy, f"wrong-again-{i}")
                assert status == 429 and int(headers["Retry-After"]) >= 1
                assert "Too many wrong tokens" in page and "Set-Cookie" not in headers
        status, _, _ = await _log_in(other, "wrong-from-elsewhere")
        assert status == 401  # another source is not locked out by the noisy one
        status, headers, _ = await _log_in(operator, relay.admin_token)
        assert status == 303 and "relay_session=" in headers.get("Set-Cookie", "")
        status, headers, _ = await _log_in(noisy, relay.admin_token)
        assert status == 303 and "relay_session=" in headers.get("Set-Cookie", "")  # throttled, the right token
        # The admin API's bearer token shares the limiter: wrong is throttled for that source, right is not.
        status, headers, body = await _status(noisy, "GET", "/api/status", headers={"Authorization": "Bearer nope"})
        assert status == 429 and int(headers["Retry-After"]) >= 1 and "too many wrong admin tokens" in body
        status, _, _ = await _status(noisy, "GET", "/api/status",
                                     headers={"Authorization": f"Bearer {relay.admin_token}"})
        assert status == 200
        status, _, _ = await _status(other, "GET", "/api/status", headers={"Authorization": "Bearer nope"})
        assert status == 401
        status, _, _ = await _status(noisy, "GET", "/api/status")  # no token at all is no guess
        assert status == 401
        status, _, metrics = await _status(operator, "GET", "/metrics")
    line = next(x for x in metrics.splitlines() if x.startswith('dicom_tunnel_throttled_total{endpoint="login"}'))
    assert float(line.split()[-1]) == 200 + 1
    wait_until(lambda: "wrong admin tokens from 127.0.0.2" in relay.proc.log_text(), 10,
               message="one summary line for the throttled source")
    lines = [x for x in relay.proc.log_text().splitlines() if "127.0.0.2" in x]
    assert 1 <= len(lines) <= 2, lines  # not one line per attempt
    assert relay.admin_token not in relay.proc.log_text()


async def test_no_response_names_the_server_software(relay):
    async with admin_client(relay) as http:
        for method, path, kwargs in (("GET", "/healthz", {}), ("GET", "/login", {}), ("GET", "/", {}),
                                     ("GET", "/static/dashboard.css", {}), ("GET", "/metrics", {}),
                                     ("GET", "/no-such-page", {}), ("GET", "/api/status", {}),
                                     ("POST", "/login", {"data": {"token": "wrong"}}),
                                     ("GET", "/healthz", {"headers": {"Host": "evil.example"}})):
            _, headers, _ = await _status(http, method, path, **kwargs)
            assert "Server" not in headers, (path, headers)
    tls = aiohttp.TCPConnector(ssl=_pinned(relay))
    async with aiohttp.ClientSession(f"https://127.0.0.1:{relay.tunnel_port}", connector=tls, timeout=TIMEOUT) as http:
        for method, path in (("GET", "/enroll/v1/ca"), ("GET", "/no-such-page"), ("POST", "/enroll/v1/renew"),
                             ("GET", "/tunnel")):
            status, headers, _ = await _status(http, method, path, json={} if method == "POST" else None)
            assert status != 500 and "Server" not in headers, (path, status, headers)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # a tunnel upgrade without a certificate
            await http.ws_connect("/tunnel")
        assert refused.value.status == 403 and "Server" not in (refused.value.headers or {})


def _pinned(relay):
    import ssl

    return ssl.create_default_context(cafile=str(relay.state_dir / "ca.crt"))
