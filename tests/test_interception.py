"""TLS interception on the hospital's path: the agent fails closed and names who intercepted."""

from __future__ import annotations

import asyncio
import ssl

from relay import pki
from tests.support.ports import free_port
from tests.support.procs import wait_until
from tests.support.stack import AgentRoute, ListenerRoute, make_agent, make_relay, start_agent


async def test_agent_refuses_an_intercepting_certificate_and_names_its_issuer(procs, tmp_path):
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("X", "site-a", "pacs")],
                       sites={"site-a": []})
    agent = make_agent(relay, "site-a", tmp_path / "agent", routes=[AgentRoute("pacs", free_port())])
    # An inspection box at the relay's address: a certificate for the right name from another CA.
    box = tmp_path / "box"
    pki.init_ca(box, common_name="Hospital Inspection CA")
    bundle = pki.issue_server_cert(box, ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(bundle.cert, bundle.key)
    received: list[bytes] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received.append(await asyncio.wait_for(reader.read(65536), 5))
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", relay.tunnel_port, ssl=ctx)
    try:
        start_agent(procs, agent, wait_connected=False)

        def last_error() -> str:
            return agent.status()["last_error"]
        await asyncio.to_thread(wait_until, lambda: "Hospital Inspection CA" in last_error(), 20,
                                message=lambda: f"the interceptor named in last_error: {last_error()!r}")
    finally:
        server.close()
        await server.wait_closed()
    error = last_error()
    assert "issued by 'CN=Hospital Inspection CA'" in error
    assert "exempt 127.0.0.1 from TLS inspection" in error
    assert agent.status()["state"] != "connected" and agent.status()["connects"] == 0
    assert not any(received), "the agent sent application data to the interceptor"
