"""Hostile REPORT frames from an enrolled site, end to end: a hand-driven mux client holding the site's real
certificate sends what a compromised or buggy agent could (a JSON nesting bomb, a 400-digit number, more)
to a real relay. Each is ignored with one log line and no traceback; the tunnel stays up and still carries
a valid report and PINGs afterwards. Before, the bomb's RecursionError and the number's OverflowError
escaped ``parse_report`` and ended the tunnel with an exception group in the log."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tests.support.muxclient import RawAgent, raw_agent
from tests.support.procs import wait_until
from tests.support.stack import make_agent, make_relay, start_relay
from tunnel_core import mux as m
from tunnel_core.limits import MAX_REPORT

SITE = "site-a"
IGNORED = f"tunnel={SITE} ignored a health report: "


def _report(**changes: object) -> dict:
    report = {"v": 1, "version": "0.1.0", "sent_at": time.time(), "report_interval": 30.0,
              "destinations": [{"route": "pacs", "host": "127.0.0.1", "port": 104, "ok": True, "latency_ms": 1.0,
                                "last_success": time.time(), "last_failure": None, "last_failure_reason": "",
                                "checked_at": time.time()}]}
    report.update(changes)
    return report


HOSTILE = {  # name -> (payload, what the one log line says)
    "array-bomb": (b"[" * 60_000, "report nests deeper than 8 levels"),
    "object-bomb": (b'{"a":' * 13_000, "report nests deeper than 8 levels"),
    "bomb-inside-a-report": (json.dumps(_report()).encode()[:-1] + b', "x": ' + b"[" * 50_000 + b"}",
                             "report nests deeper than 8 levels"),
    "400-digit-number": (json.dumps(_report()).replace('"port": 104', '"port": ' + "9" * 400).encode(),
                         "report holds an integer of 400 digits"),
    "400-digit-sent_at": (b'{"v": 1, "destinations": [], "sent_at": -' + b"7" * 400 + b"}",
                          "report holds an integer of 400 digits"),
    "5000-digit-number": (b'{"v": 1, "destinations": [], "sent_at": ' + b"7" * 5_000 + b"}",
                          "report holds an integer of 5000 digits"),
    "not-utf8": (b'{"v": 1, "version": "\xff\xfe"}', "report is not UTF-8"),
}


async def _pong(raw: RawAgent, n: int, timeout: float = 5.0) -> None:
    """PING the relay and wait for its pong: the relay read every frame sent before it, in order."""
    opaque = n.to_bytes(8, "big")
    raw.mux.ping(opaque)
    await raw.flush()
    async with asyncio.timeout(timeout):
        while not any(isinstance(e, m.PongReceived) and e.opaque == opaque for e in raw.events):
            msg = await raw.ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, f"the relay ended the tunnel: {msg}"
            raw.events += raw.mux.receive_data(msg.data)
            for event in raw.events:
                assert not isinstance(event, m.GoAwayReceived), event
            await raw.flush()


def _site(relay) -> dict:
    return next(s for s in relay.status()["sites"] if s["name"] == SITE)


@pytest.fixture
def relay(procs, tmp_path):
    handle = make_relay(tmp_path / "relay", listener_routes=[], sites={SITE: []})
    make_agent(handle, SITE, tmp_path / "agent", routes=[])  # the site's real certificate, for the raw client
    start_relay(procs, handle)
    return handle


async def test_hostile_reports_are_ignored_in_one_line_and_the_tunnel_stays_up(relay, tmp_path):
    assert all(len(payload) <= MAX_REPORT for payload, _ in HOSTILE.values())  # the mux's own cap is not hit
    async with raw_agent(relay.tunnel_port, tmp_path / "agent" / "certs") as raw:
        raw.mux.send_report(json.dumps(_report(version="good-1")).encode())
        await _pong(raw, 1)
        assert _site(relay)["health"]["version"] == "good-1"
        for n, (payload, _why) in enumerate(HOSTILE.values()):
            raw.mux.send_report(payload)
            await _pong(raw, 100 + n)  # still answered: the session survived that report
        site = _site(relay)
        assert site["connected"]
        assert site["health"]["version"] == "good-1"  # a bad report leaves the last good one in place
        # And the same tunnel still takes a good report.
        raw.mux.send_report(json.dumps(_report(version="good-2")).encode())
        await _pong(raw, 2)
        assert _site(relay)["health"]["version"] == "good-2"
    wait_until(lambda: relay.proc.log_text().count(IGNORED) >= len(HOSTILE), 5,
               message=lambda: f"one line per ignored report:\n{relay.proc.log_tail()}")
    log = relay.proc.log_text()
    ignored = [line for line in log.splitlines() if IGNORED in line]
    assert [line.split(IGNORED, 1)[1] for line in ignored] == [why for _, why in HOSTILE.values()]
    assert all(len(line) < 200 for line in ignored)  # no attacker bytes beyond the reason
    for marker in ("Traceback", "ExceptionGroup", "RecursionError", "OverflowError", "protocol error"):
        assert marker not in log, log
    assert log.count(f"tunnel={SITE} connected") == 1  # never dropped and reconnected


async def test_a_flood_of_bad_reports_cannot_flood_the_log(relay, tmp_path):
    from relay.sites import REPORT_LOG_BURST

    flood = 200
    async with raw_agent(relay.tunnel_port, tmp_path / "agent" / "certs") as raw:
        for _ in range(flood):
            raw.mux.send_report(b"[" * 64)
        await _pong(raw, 1)
        assert _site(relay)["connected"]
        assert _site(relay)["reports_ignored"] == flood  # every one counted (status and metrics) ...
    log = relay.proc.log_text()
    assert log.count(IGNORED) == REPORT_LOG_BURST  # ... but only a burst of them logged
    assert "Traceback" not in log
