"""tunnel_link.private_api: every private path has a fallback, and the programs run on the fallbacks.

The end-to-end tests start a real relay and agent whose Python first runs a ``sitecustomize`` that takes
away what a future aiohttp or CPython might move: ``aiohttp._websocket.helpers.websocket_mask`` (our
import of it used to stop both programs at start-up), every WebSocket's ``_writer`` (as seen from
outside aiohttp), and ``ssl.SSLContext._msg_callback``. aiohttp itself keeps working, as it would after
a refactoring. Then DICOM must cross the tunnel both ways, over mutual TLS and over inner TLS.
"""

from __future__ import annotations

import asyncio
import os
import socket
import textwrap
from pathlib import Path

import pytest

from tests.support.dcmtk import echoscu, start_storescp, storescu
from tests.support.ports import free_port
from tests.support.stack import AgentRoute, ListenerRoute, SiteDest, make_agent, make_relay, start_agent, start_relay
from tunnel_link import innertls, private_api
from tunnel_link.transport import QueuedTransport, WebSocketTransport, as_transport

BREAK_PRIVATE_PATHS = textwrap.dedent('''
    """Test shim: aiohttp and ssl as they might look after their private API moved."""
    import os
    import ssl
    import sys

    import aiohttp._websocket.helpers as _helpers
    from aiohttp import client_ws, web_ws

    del _helpers.websocket_mask  # moved: aiohttp's own modules hold their reference, importers fail

    def _hide_writer(cls):
        def get(self):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("aiohttp"):
                return self.__dict__.get("_moved_writer")
            raise AttributeError("_writer")  # renamed, for everyone outside aiohttp

        def set(self, value):
            self.__dict__["_moved_writer"] = value

        cls._writer = property(get, set)

    _hide_writer(client_ws.ClientWebSocketResponse)
    _hide_writer(web_ws.WebSocketResponse)

    def _no_hook(self, *args):
        raise AttributeError("_msg_callback")

    ssl.SSLContext._msg_callback = property(_no_hook, _no_hook)

    with open(os.environ["BROKEN_PRIVATE_API_LOG"], "a") as log:
        log.write(" ".join(sys.argv) + "\\n")
''')


@pytest.fixture
def broken_private_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every Python process started from now on in this test runs without the private paths."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BREAK_PRIVATE_PATHS)
    marker = tmp_path / "broken-processes.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("BROKEN_PRIVATE_API_LOG", str(marker))
    return marker


@pytest.mark.parametrize("tls_mode", ["direct", "inner"])
def test_the_programs_start_and_carry_associations_without_any_private_path(procs, tmp_path, ct_study_small,
                                                                            broken_private_api, tls_mode):
    pacs_port, cloud_port = free_port(), free_port()
    start_storescp(procs, pacs_port, "PACS", tmp_path / "pacs")
    start_storescp(procs, cloud_port, "CLOUD", tmp_path / "cloud")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("HOSP_PACS", "hospital-a", "pacs")],
                       sites={"hospital-a": [SiteDest("CLOUD", cloud_port)]})
    extra = ['tls_mode = "inner"', f'outer_ca_file = "{relay.state_dir / "ca.crt"}"'] if tls_mode == "inner" else []
    agent = make_agent(relay, "hospital-a", tmp_path / "agent", routes=[AgentRoute("pacs", pacs_port, "PACS")],
                       extra=extra)
    start_relay(procs, relay)
    start_agent(procs, agent, relay)
    started = broken_private_api.read_text().splitlines()
    assert any(" serve " in f" {line} " for line in started), started  # the relay ran with the shim
    assert any(" run " in f" {line} " for line in started), started  # and so did the agent
    if tls_mode == "inner":
        assert "inner TLS" in next(s for s in relay.status()["sites"] if s["name"] == "hospital-a")["peer"]
    r = echoscu("127.0.0.1", relay.dicom_port, "HOSP_PACS", "CLOUDAI")
    assert r.ok, r.stderr
    r = echoscu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY")
    assert r.ok, r.stderr
    r = storescu("127.0.0.1", agent.listener_port, "CLOUD", "MODALITY", ct_study_small.files)
    assert r.ok, r.stderr
    assert len(list((tmp_path / "cloud").iterdir())) == len(ct_study_small.files)
    # Each program says which path it took, once (inner TLS goes through send_bytes anyway).
    assert "websocket_mask is not available" in agent.proc.log_tail()
    if tls_mode == "direct":
        assert "WebSocket writer internals are not available" in relay.proc.log_tail()


# --- the feature checks, one by one ----------------------------------------------------------------------


def test_the_mask_is_found_and_checked() -> None:
    mask = private_api.websocket_mask()
    assert mask is not None
    data = bytearray(b"\x00" * 5)
    mask(b"\xff\x00\xff\x00", data)
    assert data == b"\xff\x00\xff\x00\xff"


def test_a_moved_or_wrong_mask_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(key: bytes, data: bytearray) -> None:
        data[:] = bytes(len(data))  # does not mask

    class Module:
        websocket_mask = staticmethod(wrong)

    monkeypatch.setattr(private_api.importlib, "import_module", lambda name: Module)
    assert private_api._find_mask() is None
    monkeypatch.setattr(private_api.importlib, "import_module", lambda name: object())
    assert private_api._find_mask() is None

    def gone(name: str) -> None:
        raise ImportError(name)

    monkeypatch.setattr(private_api.importlib, "import_module", gone)
    assert private_api._find_mask() is None


class PublicOnly:
    """An aiohttp-like WebSocket with its public surface only."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock

    async def send_bytes(self, data: bytes) -> None: ...
    async def receive(self) -> None: ...
    async def close(self) -> None: ...

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.sock if name == "socket" else default


def test_without_the_private_writer_a_websocket_is_sent_through_send_bytes() -> None:
    assert private_api.raw_writer(PublicOnly()) is None
    assert WebSocketTransport.attach(PublicOnly(), client=False) is None
    assert type(as_transport(PublicOnly(), client=True)) is QueuedTransport


def test_without_the_mask_the_client_side_takes_send_bytes_and_the_server_side_stays_fast(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Writer:
        def __init__(self) -> None:
            self.transport = asyncio.WriteTransport()
            self.protocol = type("P", (), {"_drain_helper": lambda self: None})()

    class Ws(PublicOnly):
        _writer = Writer()

    assert type(as_transport(Ws(), client=False)) is WebSocketTransport
    monkeypatch.setattr(private_api, "_mask", None)
    assert type(as_transport(Ws(), client=True)) is QueuedTransport
    assert type(as_transport(Ws(), client=False)) is WebSocketTransport


def test_abort_without_the_private_writer_shuts_the_socket_down() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert private_api.abort_websocket(PublicOnly(ours))
        assert theirs.recv(1) == b""  # the peer sees the end at once
        assert not private_api.abort_websocket(PublicOnly(None))


def test_without_the_tls_hook_inner_tls_just_names_no_issuer() -> None:
    class NoHook:
        pass

    ctx = NoHook()
    assert private_api.tls_message_callback(ctx) is private_api.MISSING  # type: ignore[arg-type]
    assert not private_api.set_tls_message_callback(ctx, print)  # type: ignore[arg-type]
    assert innertls._capture_begin(ctx) is False  # type: ignore[arg-type]
    innertls._capture_end(ctx, False)  # type: ignore[arg-type]
