"""Structured logs: TUNNEL_LOG_FORMAT=json makes every line a JSON object carrying the tunnel's id."""

from __future__ import annotations

import json
import logging
import os

from tests.support.dcmtk import echoscu, start_storescp
from tests.support.ports import free_port
from tests.support.procs import wait_for_port, wait_until
from tests.support.stack import RELAY, AgentRoute, ListenerRoute, make_agent, make_relay, start_agent
from tunnel_link.cli_common import JsonFormatter


def test_json_formatter_keeps_the_message_and_the_extras() -> None:
    record = logging.LogRecord("relay", logging.INFO, __file__, 1, "tunnel=%s connected", ("site-a",), None)
    record.tunnel = "site-a"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "tunnel=site-a connected"
    assert entry["tunnel"] == "site-a" and entry["level"] == "INFO" and entry["logger"] == "relay"
    assert entry["ts"].endswith("+00:00")


def test_relay_logs_json_lines_with_tunnel_ids(procs, tmp_path):
    pacs = free_port()
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("A_PACS", "site-a", "pacs")],
                       sites={"site-a": []})
    agent = make_agent(relay, "site-a", tmp_path / "agent", routes=[AgentRoute("pacs", pacs)])
    relay.proc = procs.spawn([RELAY, "serve", "--config", str(relay.config)],
                             env={**os.environ, "TUNNEL_LOG_FORMAT": "json"}, name="relay")
    wait_for_port("127.0.0.1", relay.dicom_port, 15, proc=relay.proc)
    start_agent(procs, agent, relay)
    assert echoscu("127.0.0.1", relay.dicom_port, "A_PACS", "CLOUDAI").ok
    wait_until(lambda: '"assoc"' in relay.proc.log_tail(), 10, message="the association's log line")
    entries = [json.loads(line) for line in relay.proc.log_tail(10_000).splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in entries)
    connected = [e for e in entries if e["msg"].startswith("tunnel=site-a connected")]
    assert connected and connected[0]["tunnel"] == "site-a"
    assoc = [e["assoc"] for e in entries if "assoc" in e and e["assoc"].get("outcome") == "completed"]
    assert assoc and assoc[0]["site"] == "site-a" and assoc[0]["called_ae"] == "A_PACS"
    assert {"id", "direction", "calling_ae", "route", "bytes_from_caller", "bytes_to_caller", "duration_s"} <= \
        assoc[0].keys()
    assert assoc[0]["tunnel"] == "site-a" and isinstance(assoc[0]["stream"], int)
