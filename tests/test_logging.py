"""Structured logs: TUNNEL_LOG_FORMAT=json makes every line a JSON object carrying the tunnel's id."""

from __future__ import annotations

import json
import logging
import os

from tests.support.dcmtk import echoscu, start_storescp
from tests.support.ports import free_port
from tests.support.procs import wait_for_port, wait_until
from tests.support.stack import RELAY, AgentRoute, ListenerRoute, make_agent, make_relay, start_agent
from tunnel_runtime.service import JsonFormatter


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


async def test_a_pipe_server_handler_sees_its_peer_from_its_first_line():
    """PipeServer starts the handler once the connection is made: ``peer`` is the caller's host:port from
    the start (before, the handler ran first and refusals were logged with ``peer=None``)."""
    import asyncio

    from tunnel_link.pipe import Pipe, PipeServer

    seen: asyncio.Queue[tuple[str, object]] = asyncio.Queue(maxsize=4)

    async def handler(pipe: Pipe) -> None:
        seen.put_nowait((pipe.peer, pipe.transport))

    server = PipeServer(handler)
    host, port = await server.start("127.0.0.1", 0)
    try:
        async with asyncio.timeout(5):
            _reader, writer = await asyncio.open_connection(host, port)
            peer, transport = await seen.get()
        me = "{}:{}".format(*writer.get_extra_info("sockname")[:2])
        assert peer == me and transport is not None
        writer.close()
    finally:
        await server.close()


def test_refusals_before_association_name_the_callers_address(procs, tmp_path):
    """Every refusal before an association (not DICOM, an AE title that is not one, silent past ARTIM) is
    one JSON record whose ``peer`` is the caller's "host:port"; the bad title is escaped, never raw."""
    from tests.support.rawdicom import associate_rq, connect, read_until_closed

    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("A_PACS", "site-a", "pacs")],
                       sites={"site-a": []}, artim=1.0)
    relay.proc = procs.spawn([RELAY, "serve", "--config", str(relay.config)],
                             env={**os.environ, "TUNNEL_LOG_FORMAT": "json"}, name="relay")
    wait_for_port("127.0.0.1", relay.dicom_port, 15, proc=relay.proc)
    good = associate_rq("A_PACS", "CLOUDAI")
    firsts = {
        "http": b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n",
        "bad-called": good[:10] + b"A_PACS\x00\n".ljust(16) + good[26:],
        "bad-calling": good[:26] + b" " * 16 + good[42:],
        "silent": b"",
    }
    callers: dict[str, str] = {}
    for name, first in firsts.items():
        with connect(relay.dicom_port) as sock:
            callers[name] = "{}:{}".format(*sock.getsockname()[:2])
            sock.sendall(first)
            read_until_closed(sock, timeout=5)

    def records() -> list[dict]:
        return [json.loads(line) for line in relay.proc.log_text().splitlines() if line.startswith("{")]

    def refusal(peer: str) -> list[dict]:
        return [e for e in records() if e.get("peer") == peer]

    for name, peer in callers.items():
        (entry,) = wait_until(lambda p=peer: refusal(p), 10, message=lambda n=name: f"the {n} refusal's record")
        assert entry["msg"].startswith(f"peer={peer} "), entry
        assert entry["logger"] == "tunnel.association" and "exc" not in entry
    assert refusal(callers["bad-called"])[0]["msg"] == (
        f"peer={callers['bad-called']} rejected 1/1/7: called AE title 'A_PACS\\x00\\x0a' is not a valid AE title")
    assert " rejected 1/1/3: calling AE title '' " in refusal(callers["bad-calling"])[0]["msg"]
    assert not [e for e in records() if "peer=None" in e["msg"] or "peer=-" in e["msg"]]
