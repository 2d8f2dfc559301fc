"""An enrolled site that drips a full-size frame one byte per WebSocket message (issue 10), against a real
relay: the relay reassembles it at a cost linear in bytes (the byte-counting proof is in test_frames.py;
the old parser re-joined its buffer per message and burned a core for 20 s on this), the dripping tunnel
stays up, and another site's C-ECHO through the same relay stays prompt throughout."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.support.dcmtk import echoscu, start_storescp
from tests.support.ports import free_port
from tests.support.rawws import client_frame, one_byte_messages, open_raw_websocket
from tests.support.stack import AgentRoute, ListenerRoute, make_agent, make_relay, start_agent, start_relay
from tunnel_core import frames as fr
from tunnel_core import mux as m
from tunnel_core.codes import ErrorCode, FrameType, TargetKind
from tunnel_core.limits import MAX_FRAME_PAYLOAD
from tunnel_link.tls import client_context

PROMPT = 1.0  # seconds a C-ECHO may take while the drip runs (it waited 2.4 s behind the old parser)
GUARD = 120.0


async def _until_pong(ws, opaque: bytes) -> None:
    """Read the relay's frames until the pong of our ping: the relay has processed all we sent before it."""
    parser = fr.FrameParser(MAX_FRAME_PAYLOAD)
    while True:
        opcode, payload = await ws.receive()
        if opcode != 0x2:
            continue
        for frame in parser.feed(payload):
            if frame.type is FrameType.PING and fr.is_pong(frame) and bytes(frame.payload) == opaque:
                return


async def test_a_one_byte_drip_of_a_full_size_frame_leaves_other_sites_prompt(procs, tmp_path: Path) -> None:
    pacs = free_port()
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("B_PACS", "hospital-b", "pacs")],
                       sites={"hospital-a": [], "hospital-b": []})
    dripper = make_agent(relay, "hospital-a", tmp_path / "agent-a", routes=[])
    other = make_agent(relay, "hospital-b", tmp_path / "agent-b", routes=[AgentRoute("pacs", pacs)])
    start_relay(procs, relay)
    start_agent(procs, other, relay)

    certs = dripper.root / "certs"
    ws = await open_raw_websocket(relay.tunnel_port, client_context(certs / "agent.crt", certs / "agent.key",
                                                                    certs / "ca.crt"))
    try:
        # Open stream 2 and reset it at once: DATA for it is then legal, discarded, its credit returned.
        mux = m.Mux(m.Role.AGENT)
        sid = mux.open_stream(fr.OpenPayload(TargetKind.CALLED_AE, "NOWHERE", "DRIP"))
        mux.reset_stream(sid, ErrorCode.NO_ERROR)
        await ws.send(bytes(mux.data_to_send()))
        frame = fr.encode(FrameType.DATA, sid, bytes(MAX_FRAME_PAYLOAD))
        ping = b"drip-end"
        drip = one_byte_messages(frame)
        started = time.monotonic()
        ws.writer.write(drip)
        ws.writer.write(client_frame(fr.encode(FrameType.PING, 0, ping)))
        done = asyncio.create_task(_until_pong(ws, ping))
        echoes = []
        async with asyncio.timeout(GUARD):
            while not done.done():
                begun = time.monotonic()
                result = await asyncio.to_thread(echoscu, "127.0.0.1", relay.dicom_port, "B_PACS", "CLOUDAI",
                                                 timeout=10)
                echoes.append(time.monotonic() - begun)
                assert result.ok, result.stdout + result.stderr
                await asyncio.sleep(0.2)
            await done
        elapsed = time.monotonic() - started
    finally:
        ws.close()
    print(f"{len(drip):,} bytes in {len(frame):,} one-byte messages taken in {elapsed:.1f}s; "
          f"{len(echoes)} C-ECHOs meanwhile, slowest {max(echoes):.2f}s")
    assert len(echoes) >= 2, "the drip ended before another site's echo could be tried during it"
    assert max(echoes) <= PROMPT, f"another site's C-ECHO waited {max(echoes):.2f}s behind the drip"
