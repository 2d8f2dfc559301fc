"""What a program reports about itself in its status: memory, descriptors, tasks (for leak hunting)."""

from __future__ import annotations

import asyncio

import psutil

_SELF = psutil.Process()


def process_stats() -> dict[str, int]:
    """Call from inside the running event loop."""
    return {
        "rss": _SELF.memory_info().rss,
        "fds": _SELF.num_fds(),
        "tasks": len(asyncio.all_tasks()),
    }
