"""A real headless Chromium (Debian package `chromium`) driven over the DevTools protocol with aiohttp.

`start_chromium(procs, root)` runs `chromium --headless=new --remote-debugging-port=0` as a
`ManagedProcess` (ended by PID at teardown) with a profile of its own under `root`, and reads the port it
chose from `<profile>/DevToolsActivePort`. `async with DevTools.open_page(port) as page:` attaches to its
page target's WebSocket; `page.call(method, **params)` sends one command and returns its result, keeping
the events that arrive meanwhile (bounded) in `page.events`. `page.evaluate(js)` runs an expression in
the page and returns its value; `page.wait_for(js, timeout)` polls one until it is truthy, bounded in time
and count. No Playwright, no downloaded browser: what the test drives is the distribution's Chromium.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from . import missing_prerequisite
from .procs import ManagedProcess, ProcessTracker, wait_until

__all__ = ["DevTools", "DevToolsError", "find_chromium", "require_chromium", "start_chromium"]

CANDIDATES = ("chromium", "chromium-browser")
MAX_EVENTS = 2000
COMMAND_TIMEOUT = 30.0


class DevToolsError(Exception):
    """A DevTools command failed, or a page script threw."""


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    """Path of the chromium binary; if missing, fail under CI=true and skip elsewhere, saying why."""
    path = find_chromium()
    if path is None:
        missing_prerequisite("chromium not found on PATH (Debian package 'chromium'; "
                             "`bash scripts/bootstrap.sh` installs it)")
    return path


def start_chromium(procs: ProcessTracker, root: Path, *, width: int = 1400, height: int = 1000,
                   startup_timeout: float = 30.0) -> tuple[ManagedProcess, int]:
    """Start a headless Chromium with its own profile under ``root``; returns it and its DevTools port."""
    binary = require_chromium()
    profile = root / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
            f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-dev-shm-usage", "--metrics-recording-only",
            f"--window-size={width},{height}", "about:blank"]
    proc = procs.spawn(argv, name="chromium")
    active = profile / "DevToolsActivePort"

    def port() -> int | None:
        if not proc.running:
            raise RuntimeError(f"chromium exited before DevTools was up:\n{proc.describe()}")
        try:
            first = active.read_text().splitlines()[0]
        except (FileNotFoundError, IndexError):
            return None
        return int(first) if first.isdigit() else None

    return proc, wait_until(port, startup_timeout, interval=0.05, message="chromium's DevToolsActivePort")


class DevTools:
    """One DevTools WebSocket (a page target). Create with ``open_page``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)

    @classmethod
    @contextlib.asynccontextmanager
    async def open_page(cls, port: int) -> AsyncIterator[DevTools]:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list", timeout=aiohttp.ClientTimeout(10)) as r:
                targets = await r.json()
            page = next((t for t in targets if t.get("type") == "page"), None)
            if page is None:
                raise DevToolsError(f"chromium has no page target: {targets!r}")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024) as ws:
                yield cls(ws)

    @staticmethod
    async def close_browser(port: int) -> None:
        """Ask the browser to exit (``Browser.close`` on its own endpoint), so its helpers exit with it."""
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/version", timeout=aiohttp.ClientTimeout(10)) as r:
                url = (await r.json())["webSocketDebuggerUrl"]
            async with http.ws_connect(url) as ws:
                await ws.send_str(json.dumps({"id": 1, "method": "Browser.close"}))
                with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                    async with asyncio.timeout(5):
                        await ws.receive()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events arriving meanwhile go to ``events``)."""
        command_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": command_id, "method": method, "params": params}))
        async with asyncio.timeout(COMMAND_TIMEOUT):
            while True:
                message = await self._ws.receive()
                if message.type is not aiohttp.WSMsgType.TEXT:
                    raise DevToolsError(f"DevTools connection ended during {method}: {message.type.name}")
                data = json.loads(message.data)
                if data.get("id") == command_id:
                    if "error" in data:
                        raise DevToolsError(f"{method} failed: {data['error']}")
                    return data.get("result", {})
                if "method" in data:
                    self.events.append(data)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited), by value."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"page script threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, interval: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; return its value, or raise TimeoutError after ``timeout``.

        A script error counts as falsy (a page being replaced by the next one has no context to run in)."""
        value: Any = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                for _ in range(int(timeout / interval) + 2):
                    try:
                        value = await self.evaluate(expression)
                    except DevToolsError as exc:
                        value = exc
                    else:
                        if value:
                            return value
                    await asyncio.sleep(interval)
        raise TimeoutError(f"after {timeout:.0f} s, still not true ({value!r}): {expression}")

    async def navigate(self, url: str, timeout: float = 20.0) -> None:
        """Load ``url`` (following redirects) and wait until the new document has loaded."""
        await self.replacing_document(lambda: self.call("Page.navigate", url=url), timeout)

    async def replacing_document(self, action, timeout: float = 20.0) -> None:
        """Run ``action`` (a coroutine function that makes the page load another document: navigate, submit
        a form) and wait until a new document has replaced the current one and finished loading."""
        await self.evaluate("window.__devtoolsOldDocument = true")
        await action()
        await self.wait_for("window.__devtoolsOldDocument !== true && document.readyState === 'complete'", timeout)

    async def screenshot(self, path: Path) -> None:
        result = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(result["data"]))

    def requested_urls(self) -> list[str]:
        """Every URL the page requested since ``Network.enable`` (from the events seen so far)."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]
