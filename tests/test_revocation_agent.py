"""The agent is told it was revoked, says so and does not hammer the relay (issue 10, point 8).

First the pure decision (``tunnel_core.refusal``: wire token or GOAWAY code → kind, words, retry delay) and
how the agent reads the relay's answer off aiohttp's and the inner TLS's errors; then real relay and agent
processes: revoked while connected (GOAWAY REVOKED), revoked before connecting (403 + ``Tunnel-Refused``),
and the same refusal in inner-TLS mode (the relay's policy close), each seen through ``tunnel-agent status``,
``/readyz`` and ``tunnel-agent diagnose``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from tests.support.procs import wait_until
from tests.support.stack import (
    AGENT,
    RELAY,
    AgentHandle,
    ListenerRoute,
    RelayHandle,
    _cli,
    enroll,
    enroll_agent,
    make_agent,
    make_relay,
    site_add,
    start_agent,
    start_relay,
)
from tunnel_agent.cli import _human
from tunnel_agent.connect import refusal_token
from tunnel_core.codes import ErrorCode
from tunnel_core.health import AgentState, agent_readiness
from tunnel_core.refusal import (
    REFUSED_HEADER,
    RefusalKind,
    RefusalToken,
    close_message,
    refusal_from_goaway,
    refusal_from_token,
    retry_delay,
    token_of_close_message,
)
from tunnel_link.innertls import InnerTlsError, InnerTlsFailure

SITE = "st-marys"
REVOKED_RETRY, REFUSED_RETRY = 3600.0, 300.0  # the agent's defaults, which these processes run with
FAR_OFF = 3000.0  # seconds: "the next attempt is far off" (the backoff these agents run with caps at 1 s)
WAIT = 20.0
NO_ENV_PROXY = {"https_proxy": "", "HTTPS_PROXY": "", "no_proxy": "", "NO_PROXY": ""}


# --- the pure decision ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("token", "kind", "words"), [
    ("site-revoked", RefusalKind.REVOKED, "this site is revoked"),
    ("certificate-revoked", RefusalKind.REVOKED, "this site's certificate is revoked"),
    ("unknown-certificate", RefusalKind.REFUSED, "no record of this certificate"),
    ("site-mismatch", RefusalKind.REFUSED, "for another site"),
    ("no-certificate", RefusalKind.REFUSED, "no client certificate reached the relay"),
])
def test_each_token_is_classified_and_said_in_words(token, kind, words):
    refusal = refusal_from_token(token, site=SITE)
    assert refusal is not None and refusal.kind is kind and refusal.code == token
    line = refusal.describe()
    assert line.startswith(f"{kind.value} by the relay: ") and words in line and f"({token})" in line
    if token != "no-certificate":  # what to do: re-enroll this very site
        assert f"`tunnel-relay site add {SITE}`" in line and "`tunnel-agent enroll --force`" in line
    else:
        assert 'tls_mode = "inner"' in line
    assert refusal_from_token(f"  {token.upper()} ") == refusal_from_token(token)  # header values: any case


def test_no_token_is_no_decision_and_an_unknown_one_is_quoted_safely():
    assert refusal_from_token(None) is None and refusal_from_token("") is None and refusal_from_token("  ") is None
    odd = refusal_from_token("quota-exceeded\x1b[31m" + "x" * 100)
    assert odd is not None and odd.kind is RefusalKind.REFUSED
    assert "\x1b" not in odd.describe() and len(odd.code) <= 40 and odd.code.startswith("quota-exceeded?")


def test_only_goaway_revoked_is_a_refusal():
    refusal = refusal_from_goaway(ErrorCode.REVOKED, site=SITE)
    assert refusal is not None and refusal.kind is RefusalKind.REVOKED
    assert "(GOAWAY REVOKED)" in refusal.describe() and f"site add {SITE}" in refusal.describe()
    for code in (None, *(c for c in ErrorCode if c is not ErrorCode.REVOKED)):
        assert refusal_from_goaway(code) is None, code


def test_retry_delay_follows_the_kind():
    revoked, refused = refusal_from_token("site-revoked"), refusal_from_token("site-mismatch")
    assert revoked is not None and refused is not None
    assert retry_delay(revoked, revoked_retry=3600, refused_retry=300) == 3600
    assert retry_delay(refused, revoked_retry=3600, refused_retry=300) == 300


@pytest.mark.parametrize("token", list(RefusalToken))
def test_close_message_round_trips_and_fits_a_close_frame(token):
    message = close_message(token)
    assert len(message) <= 123  # RFC 6455 §5.5: a control frame's payload, less the 2-byte code
    assert token_of_close_message(message.decode()) == token.value


@pytest.mark.parametrize("text", [None, "", "inner TLS handshake failed", ": nothing", "a b: c", "x" * 60 + ": y",
                                  "révoqué: non"])
def test_other_close_messages_carry_no_token(text):
    assert token_of_close_message(text) is None


def _handshake_error(status: int, headers: dict[str, str] | None) -> aiohttp.WSServerHandshakeError:
    proxy = CIMultiDictProxy(CIMultiDict(headers)) if headers is not None else None
    return aiohttp.WSServerHandshakeError(None, (), status=status, message="Invalid response status",  # type: ignore[arg-type]
                                          headers=proxy)


def test_the_agent_reads_the_token_where_the_relay_puts_it():
    assert refusal_token(_handshake_error(403, {REFUSED_HEADER: "site-revoked"}), inner=False) == "site-revoked"
    assert refusal_token(_handshake_error(403, {"tunnel-refused": "site-revoked"}), inner=False) == "site-revoked"
    assert refusal_token(_handshake_error(403, {}), inner=False) is None  # an older relay: no decision
    assert refusal_token(_handshake_error(403, None), inner=False) is None
    assert refusal_token(_handshake_error(404, {REFUSED_HEADER: "site-revoked"}), inner=False) is None
    # Inner-TLS mode: the relay never answers 403 there; one is the inspecting proxy's, headers or not.
    assert refusal_token(_handshake_error(403, {REFUSED_HEADER: "site-revoked"}), inner=True) is None
    closed = InnerTlsError(InnerTlsFailure.REFUSED_BY_PEER, "inner TLS: the relay refused the session",
                           close_message=close_message(RefusalToken.CERTIFICATE_REVOKED).decode())
    assert refusal_token(closed, inner=True) == "certificate-revoked"
    assert refusal_token(closed, inner=False) is None
    lost = InnerTlsError(InnerTlsFailure.CONNECTION_LOST, "gone", close_message="site-revoked: forged")
    assert refusal_token(lost, inner=True) is None
    assert refusal_token(TimeoutError(), inner=False) is None


def test_readiness_and_the_human_status_say_revoked():
    line = refusal_from_token("site-revoked", site=SITE).describe()  # type: ignore[union-attr]
    ready = agent_readiness(state=AgentState.REVOKED, last_error=line)
    assert not ready.ready and ready.reason == line
    assert agent_readiness(state=AgentState.REFUSED, last_error="").reason == "tunnel refused"
    status = {"state": "revoked", "relay_url": "wss://relay.test:8443/tunnel", "reconnects": 0, "last_error": line,
              "next_attempt": time.time() + 3600, "routes": [], "listener": None, "associations": [], "health": None}
    text = _human(status)
    assert "state:        revoked (the relay revoked this site" in text
    assert f"last error:   {line}" in text
    assert "next attempt: " in text and "(in 60 min), or as soon as a new certificate is in place" in text


# --- real relay and agent processes --------------------------------------------------------------------


@pytest.fixture
def relay(procs, tmp_path) -> RelayHandle:
    handle = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("SM_PACS", SITE, "pacs")],
                        sites={SITE: []})
    start_relay(procs, handle)
    return handle


def _agent(relay: RelayHandle, root, *, inner: bool = False) -> AgentHandle:
    # Inner-TLS mode without an interceptor: the outer TLS ends at the relay, whose CA it then trusts.
    extra = ['tls_mode = "inner"', f'outer_ca_file = "{relay.state_dir / "ca.crt"}"'] if inner else []
    agent = make_agent(relay, SITE, root, routes=[], enrolled=True, extra=extra)
    enroll_agent(relay, agent)
    return agent


def _status_cli(agent: AgentHandle) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, "status", "--config", str(agent.config)], capture_output=True, text=True,
                          timeout=30)


def _diagnose_auth(agent: AgentHandle) -> dict[str, str]:
    result = subprocess.run([AGENT, "diagnose", "--config", str(agent.config), "--json"], capture_output=True,
                            text=True, timeout=90, env={**os.environ, **NO_ENV_PROXY})
    assert result.returncode == 1, result.stdout + result.stderr
    return next(step for step in json.loads(result.stdout)["steps"] if step["name"] == "auth")


def _readyz(agent: AgentHandle) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.status_port}/readyz", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _told(agent: AgentHandle, state: str) -> dict:
    return wait_until(lambda: (s := agent.status())["state"] == state and s, WAIT,
                      message=lambda: f"agent {state}: {agent.status()}\n{agent.proc.log_tail()}")


def _refusals_logged(relay: RelayHandle) -> int:
    return relay.proc.log_text().count("refused /tunnel")


def _assert_waits_long(status: dict, retry: float) -> None:
    assert status["next_attempt"] is not None
    left = status["next_attempt"] - time.time()
    assert FAR_OFF < left <= retry, f"next attempt in {left:.0f} s"


def test_revoked_while_connected_the_agent_says_so_and_stays_away(procs, tmp_path, relay):
    agent = _agent(relay, tmp_path / "agent")
    start_agent(procs, agent, relay)
    _cli(RELAY, "site", "revoke", SITE, "--config", str(relay.config), "--reason", "contract ended")
    status = _told(agent, "revoked")
    assert "revoked by the relay:" in status["last_error"] and "(GOAWAY REVOKED)" in status["last_error"]
    assert f"`tunnel-relay site add {SITE}`" in status["last_error"]
    _assert_waits_long(status, REVOKED_RETRY)
    assert status["connects"] == 1
    assert _refusals_logged(relay) == 0  # it did not come back to be refused

    human = _status_cli(agent)
    assert human.returncode == 3, human.stdout + human.stderr
    assert "state:        revoked (the relay revoked this site" in human.stdout
    assert "next attempt: " in human.stdout and "min), or as soon as a new certificate" in human.stdout
    code, ready = _readyz(agent)
    assert code == 503 and ready["reason"].startswith("revoked by the relay:")

    auth = _diagnose_auth(agent)  # its own tunnel attempt gets the 403 and the header
    assert auth["outcome"] == "fail"
    assert auth["detail"].startswith("revoked by the relay: this site is revoked (site-revoked)"), auth
    assert "the running agent is revoked" in auth["detail"]
    assert f"`tunnel-relay site add {SITE}`" in auth["hint"] and "enroll --force" in auth["hint"]
    assert _refusals_logged(relay) == 1  # diagnose's, not the agent's
    assert agent.status()["connects"] == 1 and agent.status()["state"] == "revoked"


def test_revoked_before_connecting_then_reinstated_and_re_enrolled(procs, tmp_path, relay):
    agent = _agent(relay, tmp_path / "agent")
    relay.admin("POST", f"/api/sites/{SITE}/revoke", {})
    start_agent(procs, agent, relay, wait_connected=False)
    status = _told(agent, "revoked")
    assert status["last_error"].startswith("revoked by the relay: this site is revoked (site-revoked); ")
    assert status["connects"] == 0
    _assert_waits_long(status, REVOKED_RETRY)
    assert _refusals_logged(relay) == 1  # one attempt, one refusal: no hammering
    assert "revoked" in _status_cli(agent).stdout
    assert "(site-revoked)" in _diagnose_auth(agent)["detail"]

    # `site add` reinstates the site with a new token; enrolling with it replaces the certificate, and the
    # waiting agent notices and connects at once instead of an hour later.
    result = enroll(agent, site_add(relay, SITE), "--force")
    assert result.returncode == 0, result.stderr
    _told(agent, "connected")
    wait_until(lambda: relay.site_connected(SITE), WAIT, message="the relay serves the re-enrolled site")
    assert agent.status()["last_error"] == ""


def test_inner_tls_mode_is_told_by_the_relays_close(procs, tmp_path, relay):
    agent = _agent(relay, tmp_path / "agent", inner=True)
    serial = relay.admin("GET", f"/api/certificates?site={SITE}")["certificates"][0]["serial"]
    _cli(RELAY, "cert", "revoke", serial, "--config", str(relay.config))
    start_agent(procs, agent, relay, wait_connected=False)
    status = _told(agent, "revoked")
    assert status["last_error"].startswith("revoked by the relay: this site's certificate is revoked "
                                           "(certificate-revoked); ")
    # Refused before READY: the agent never counted a tunnel.
    assert status["connects"] == 0
    _assert_waits_long(status, REVOKED_RETRY)
    assert relay.proc.log_text().count("refused /tunnel/inner") == 1
    auth = _diagnose_auth(agent)
    assert auth["detail"].startswith("revoked by the relay: this site's certificate is revoked "
                                     "(certificate-revoked)"), auth
