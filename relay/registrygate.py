"""The registry as the event loop uses it: every call in the registry's own worker thread, with a deadline.

Theory of operation: the registry's engines block (``relay.engines``), and a shared PostgreSQL server that
stops answering (a partition, a failover, a stopped host) holds a call until its deadline. On the event loop
that would stop every tunnel of the relay, for everyone, for as long. :class:`AsyncRegistry` therefore runs
each call in one worker thread of its own (an engine is used by one thread at a time) and waits at most
``timeout`` for it: a late call raises RegistryUnavailable naming the database (the call itself still ends
in the thread, at the engine's own deadline, and its answer is dropped). At most ``max_waiting`` calls wait
at once; past that a call fails at once, so a database that is down cannot pile up work in memory.

Its thread is a daemon of its own (not a ``ThreadPoolExecutor``'s, which the interpreter joins at exit): a
relay told to stop while a call hangs on a frozen server gives the registry ``CLOSE_TIMEOUT`` to close and
then exits anyway, instead of waiting for the server for as long as it stays frozen.

The gateway remembers whether the database answered the last call (:attr:`available`, :attr:`last_error`,
:attr:`unavailable_since`): status, metrics and readiness read that, never the database itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from relay.registry import Registry, RegistryUnavailable

__all__ = ["DEFAULT_TIMEOUT", "AsyncRegistry"]

T = TypeVar("T")

log = logging.getLogger("relay")

DEFAULT_TIMEOUT = 10.0  # seconds for one registry call, queueing included (the engine's own limit is 5 s)
MAX_WAITING = 256  # registry calls in flight or queued at once
CLOSE_TIMEOUT = 3.0  # seconds a stopping relay waits for the registry to close behind the calls queued


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
        self._executor = _DaemonThread("registry")

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
        """Close the registry in its thread after the calls queued, waiting at most ``CLOSE_TIMEOUT``."""
        closed = self._executor.submit(self.registry.close)
        self._executor.shutdown(wait=False)
        try:
            closed.result(CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("registry %s not closed within %.0f s (a call still waits on it); stopping anyway",
                        self.where, CLOSE_TIMEOUT)

    def _unavailable(self, message: str) -> RegistryUnavailable:
        if self.available:
            self.unavailable_since = self.clock()
        self.available, self.last_error = False, message
        return RegistryUnavailable(message)


class _DaemonThread(Executor):
    """One daemon thread running what is submitted, in order; work cancelled while it waited is skipped."""

    def __init__(self, name: str) -> None:
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._shut = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._shut:
            raise RuntimeError("the registry's thread is shut down")
        future: Future[Any] = Future()
        self._work.put((future, functools.partial(fn, *args, **kwargs)))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more work; what is queued still runs. ``wait``: until it has (unbounded: tests only)."""
        if not self._shut:
            self._shut = True
            self._work.put(None)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up while it waited: never run it late
            try:
                future.set_result(call())
            except BaseException as exc:  # handed to the caller, which raises it
                future.set_exception(exc)
