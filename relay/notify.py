"""The PostgreSQL registry's hints: LISTEN on the channel every write NOTIFYs, so a relay acts on another
relay's change at once instead of at its next periodic read.

Theory of operation: every write transaction on PostgreSQL ends with ``pg_notify`` on
``relay.engines.NOTIFY_CHANNEL`` ("change" for a registry change, "presence" for the fleet's presence),
delivered at commit to every session listening. :class:`RegistryHints` holds one direct session of its
own (the one connection per relay that is not the registry's worker), in a daemon thread, and calls
``on_hint(kind)`` on the event loop for each notification. A hint is only that: the revocation sweep and
the presence reads still run on their own timers, so a hint lost while the session was down costs at
most one period. A dropped session is opened again after ``RETRY`` seconds, said once in the log.
Nothing here blocks the event loop, and stopping waits at most ``STOP_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import psycopg

from relay.engines import NOTIFY_CHANNEL, PostgresTarget

__all__ = ["POLL", "RETRY", "RegistryHints"]

log = logging.getLogger("relay")

POLL = 1.0  # seconds one wait for notifications lasts (the thread checks for a stop between waits)
RETRY = 2.0  # seconds before a lost listening session is opened again
STOP_TIMEOUT = 3.0
KINDS = frozenset({"change", "presence"})


class RegistryHints:
    """Build with the registry's target and ``on_hint(kind)``; ``start()`` on the event loop, ``stop()``."""

    def __init__(self, target: PostgresTarget, on_hint: Callable[[str], None]) -> None:
        self.target = target
        self.on_hint = on_hint
        self.received = 0
        self._stop = threading.Event()
        self.listening = threading.Event()  # set while the session listens (tests wait on it)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="registry-hints", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STOP_TIMEOUT)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(**self.target.connect_args()) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.listening.set()
                    if failing:
                        log.info("registry hints: listening again on %s", self.target.where)
                    failing = False
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=POLL):
                            self._deliver(notice.payload)
            except psycopg.Error as exc:
                if not failing:
                    log.warning("registry hints: %s: %s; the relays' periodic reads go on",
                                self.target.where, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                failing = True
                self.listening.clear()
                self._stop.wait(RETRY)

    def _deliver(self, payload: str) -> None:
        if payload not in KINDS or self._loop is None:
            return  # another writer's payload: not ours to act on
        self.received += 1
        try:
            self._loop.call_soon_threadsafe(self.on_hint, payload)
        except RuntimeError:  # the loop closed while we waited
            self._stop.set()
