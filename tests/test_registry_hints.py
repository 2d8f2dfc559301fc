"""relay.notify on a real PostgreSQL: every write to the shared registry NOTIFYs at commit, "change" for a
registry change and "presence" for the fleet's presence, and a relay's hints session hears each within a
second and hands it to the event loop; a server that goes away and comes back is listened to again by
itself. Time bounds here are generous deadlines for waits, not measurements."""

from __future__ import annotations

import asyncio
import time

from relay.engines import PostgresTarget
from relay.notify import RETRY, RegistryHints
from relay.registry import Registry

WAIT = 5.0


async def _next(heard: asyncio.Queue[str]) -> str:
    return await asyncio.wait_for(heard.get(), WAIT)


async def test_every_write_is_a_hint_and_the_session_comes_back_with_the_server(postgres) -> None:
    target = PostgresTarget.from_url(postgres.url, postgres.password)
    heard: asyncio.Queue[str] = asyncio.Queue()
    hints = RegistryHints(target, heard.put_nowait)
    hints.start()
    writer = Registry.connect(target)
    try:
        assert await asyncio.to_thread(hints.listening.wait, WAIT)  # a hint only counts once LISTEN ran
        await asyncio.to_thread(writer.add_site, "st-marys", time.time(), "test")
        assert await _next(heard) == "change"
        await asyncio.to_thread(writer.announce, "relay-a", "", "serving", ["st-marys"], time.time(), 15.0)
        assert await _next(heard) == "presence"
        assert heard.empty()

        await asyncio.to_thread(postgres.stop)
        await asyncio.to_thread(postgres.start)
        deadline = time.monotonic() + WAIT + RETRY
        while time.monotonic() < deadline:  # bounded: the session reconnects after RETRY
            try:
                await asyncio.to_thread(writer.add_site, f"site-{int(time.monotonic() * 1000)}", time.time(), "t")
            except Exception:  # the writer's own connection is opened again on its next call
                await asyncio.sleep(0.2)
                continue
            try:
                assert await asyncio.wait_for(heard.get(), 0.5) == "change"
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("no hint heard after the server came back")
    finally:
        writer.close()
        await hints.stop()
