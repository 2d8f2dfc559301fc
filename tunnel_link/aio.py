"""Small asyncio helpers shared by the relay and the agent."""

from __future__ import annotations

import asyncio

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(task: asyncio.Task) -> None:
    """Cancel ``task`` and wait until it has finished (for ``AsyncExitStack.push_async_callback``)."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
