"""What a program reports about itself in its status: memory, descriptors, tasks (for leak hunting)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

import psutil

_SELF = psutil.Process()


@dataclass(frozen=True, slots=True)
class ProcessStats:
    rss: int  # resident memory, bytes
    fds: int  # open file descriptors
    tasks: int  # asyncio tasks

    def as_dict(self) -> dict[str, int]:
        """The status APIs' ``process`` object."""
        return asdict(self)


def process_stats() -> ProcessStats:
    """Call from inside the running event loop."""
    return ProcessStats(rss=_SELF.memory_info().rss, fds=_SELF.num_fds(), tasks=len(asyncio.all_tasks()))
