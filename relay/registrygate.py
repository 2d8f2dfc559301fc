"""The registry as the event loop uses it: every call in the registry's own worker thread, with a deadline.

Theory of operation: the registry's engines block (``relay.engines``), and a shared PostgreSQL server that
stops answering (a partition, a failover, a stopped host) holds a call until its deadline. On the event loop
that would stop every tunnel of the relay, for everyone, for as long. :class:`AsyncRegistry` therefore runs
each call in one worker thread of its own (an engine is used by one thread at a time) and waits at most
``timeout`` for it: a late call raises RegistryUnavailable naming the database (the call itself still ends
in the thread, at the engine's own deadline, and its answer is dropped). At most ``max_waiting`` calls wait
at once; past that a call fails at once, so a database that is down cannot pile up work in memory.

The gateway remembers whether the database answered the last call (:attr:`available`, :attr:`last_error`,
:attr:`unavailable_since`): status, metrics and readiness read that, never the database itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from relay.registry import Registry, RegistryUnavailable

__all__ = ["DEFAULT_TIMEOUT", "AsyncRegistry"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0  # seconds for one registry call, queueing included (the engine's own limit is 5 s)
MAX_WAITING = 256  # registry calls in flight or queued at once


class AsyncRegistry:
    """Wrap an open :class:`Registry`; ``await call(lambda r: r.method(...))`` from the event loop. ``close()``
    closes the registry in its thread after the calls already queued."""

    def __init__(self, registry: Registry, *, timeout: float = DEFAULT_TIMEOUT, max_waiting: int = MAX_WAITING,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.clock = clock
        self.where = registry.where
        self.shared = registry.kind == "postgresql"  # every relay of a fleet reads and writes it
        self.available = True
        self.last_error = ""
        self.unavailable_since: float | None = None
        self._waiting = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")

    async def call(self, fn: Callable[[Registry], T], *, timeout: float | None = None) -> T:
        """``fn(registry)`` in the registry's thread. Raises what it raises (RegistryError...), or
        RegistryUnavailable when it took longer than ``timeout`` or too many calls are waiting."""
        if self._waiting >= self.max_waiting:
            raise self._unavailable(f"registry database {self.where} is not keeping up "
                                    f"({self._waiting} calls waiting)")
        self._waiting += 1
        limit = self.timeout if timeout is None else timeout
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, fn, self.registry)
            result = await asyncio.wait_for(future, limit)
        except TimeoutError:
            raise self._unavailable(f"registry database {self.where} did not answer within {limit:g}s") from None
        except RegistryUnavailable as exc:
            raise self._unavailable(str(exc)) from None
        finally:
            self._waiting -= 1
        self.available, self.last_error, self.unavailable_since = True, "", None
        return result

    def close(self) -> None:
        self._executor.submit(self.registry.close)
        self._executor.shutdown(wait=True)

    def _unavailable(self, message: str) -> RegistryUnavailable:
        if self.available:
            self.unavailable_since = self.clock()
        self.available, self.last_error = False, message
        return RegistryUnavailable(message)
