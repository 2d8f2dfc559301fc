"""The agent's spool: instances received from modalities, kept durably on disk until their destination
has them (issue 12, ``mode = "spool"``). The store is synchronous and thread-safe; the asyncio callers run
its blocking calls in worker threads. Theory of operation: :mod:`tunnel_agent.spool.store`; the file
format: :mod:`tunnel_agent.spool.entryfile`; replay after a crash: :mod:`tunnel_agent.spool.replay`.
"""

from tunnel_agent.spool.entryfile import SpoolRecord
from tunnel_agent.spool.errors import SpoolError, SpoolFull, SpoolIOError, SpoolStateError
from tunnel_agent.spool.ledger import QuarantineEntry, SpoolEntry, SpoolStats
from tunnel_agent.spool.replay import ReplayCounts, ReplayReport
from tunnel_agent.spool.store import Spool, SpoolWriter

__all__ = [
    "QuarantineEntry",
    "ReplayCounts",
    "ReplayReport",
    "Spool",
    "SpoolEntry",
    "SpoolError",
    "SpoolFull",
    "SpoolIOError",
    "SpoolRecord",
    "SpoolStateError",
    "SpoolStats",
    "SpoolWriter",
]
