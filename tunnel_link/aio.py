"""Small asyncio helpers shared by the relay and the agent."""

from __future__ import annotations

import asyncio

__all__ = ["cancel_and_wait", "wait_for_events"]


async def cancel_and_wait(task: asyncio.Task) -> None:
    """Cancel ``task`` and wait until it has finished (for ``AsyncExitStack.push_async_callback``)."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def wait_for_events(events: list[asyncio.Event], timeout: float) -> bool:
    """Wait until every event is set, for at most ``timeout`` seconds; True if they all were."""
    try:
        async with asyncio.timeout(timeout):
            for event in events:
                await event.wait()
    except TimeoutError:
        return False
    return True
