"""How both programs serve HTTP: bounded waits, no version banner, and peers' garbage kept out of the log.

- :func:`app_runner` sets aiohttp's ``keepalive_timeout`` (which also bounds the wait for a connection's
  *first* request, from the moment it is made) to ``request_timeout`` instead of aiohttp's hour, and hands
  the request handlers :func:`peer_error_logger`.
- :func:`peer_error_logger`: aiohttp logs a request it cannot parse with a traceback whose message holds
  up to 64 KiB of the peer's bytes. This logger's filter turns each such record into one line naming the
  error type and a short, escaped prefix of its text, without the traceback.
- :func:`strip_server_header` (an ``on_response_prepare`` hook) removes aiohttp's ``Server: Python/x
  aiohttp/y`` banner. aiohttp answers a request it cannot parse (400) without running the app's hooks;
  that answer still carries it.
- :func:`serve_tcp` binds a plain (no TLS) site and returns the bound address from the runner's public
  ``addresses``.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

from aiohttp import web

__all__ = ["app_runner", "peer_error_logger", "serve_tcp", "strip_server_header"]

PEER_TEXT_MAX = 80  # characters of a peer's bytes a log line may carry, escaped


class _PeerErrorFilter(logging.Filter):
    """Rewrites each record to one line: the message, the exception's type and an escaped prefix."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = repr(str(exc)[:PEER_TEXT_MAX])
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {text}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def peer_error_logger(name: str) -> logging.Logger:
    """The logger ``name`` with the one-line filter installed (once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _PeerErrorFilter) for f in logger.filters):
        logger.addFilter(_PeerErrorFilter())
    return logger


async def strip_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: the response goes out without aiohttp's ``Server`` version header."""
    response.headers.popall("Server", None)


def app_runner(app: web.Application, *, request_timeout: float, logger_name: str) -> web.AppRunner:
    """A runner for ``app`` whose connections wait at most ``request_timeout`` for a (first or next) request."""
    app.on_response_prepare.append(strip_server_header)
    return web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                         keepalive_timeout=request_timeout, logger=peer_error_logger(logger_name))


async def serve_tcp(stack: AsyncExitStack, app: web.Application, host: str, port: int, *,
                    request_timeout: float, logger_name: str) -> tuple[str, int]:
    """Serve ``app`` on ``host:port`` without TLS until ``stack`` closes; returns the bound address."""
    runner = app_runner(app, request_timeout=request_timeout, logger_name=logger_name)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, host, port).start()
    return tuple(runner.addresses[-1][:2])  # type: ignore[return-value]
