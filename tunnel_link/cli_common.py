"""What both command-line programs share: logging set-up and running a service until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def run_service(main: Callable[[], Coroutine[Any, Any, None]], stop: Callable[[], None]) -> int:
    """Run ``main()`` on a fresh loop; SIGTERM and SIGINT call ``stop()`` for a clean shutdown."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        await main()

    if os.environ.get("TUNNEL_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop  # optional extra (pip install '.[fast]'): a faster event loop and TLS transport
        except ImportError:
            pass
        else:
            uvloop.run(runner())
            return 0
    asyncio.run(runner())
    return 0
