"""What both command-line programs share: logging set-up and running a service until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

LOG_FORMAT_ENV = "TUNNEL_LOG_FORMAT"
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every ``extra=`` field of the record
    (``tunnel``, ``stream``, ``assoc``...), for log shippers. The message is the same text as in text mode."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr: human text, or JSON lines when ``TUNNEL_LOG_FORMAT=json``."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get(LOG_FORMAT_ENV, "text").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


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
