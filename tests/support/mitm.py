"""mitmproxy as the hospital's TLS-intercepting proxy (a DLP box), for tests.

mitmproxy pins its own dependency versions, so it lives in a virtualenv of its own, ``build/mitm-venv``
(made by scripts/bootstrap.sh; env MITM_VENV overrides the path), never in the project's venv.

`start_mitmproxy(procs, work_dir)` runs ``mitmdump`` in regular (HTTP proxy, CONNECT) mode on a free
port of 127.0.0.1, with everything of its own under ``work_dir``: its configuration directory, where it
generates its CA on first start (never in ~), its HOME, and the flow dump it writes (``-w``). It
intercepts every TLS connection, presenting certificates from that CA, and re-encrypts towards the
server, trusting ``upstream_ca`` if given, else anything (``ssl_insecure``). The process is tracked by
the `procs` fixture, so it is ended by PID even when the test fails.

mitmdump buffers the dump and completes WebSocket flows only when they end: call `MitmProxy.finish()`
(SIGTERM by PID, mitmdump writes out what it holds and exits) before looking at `dump_bytes()` or
`flows()`. The raw dump is a tnetstring file that holds requests, responses and WebSocket messages
byte for byte, so "is X in clear anywhere?" is ``X in dump_bytes()``.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import missing_prerequisite
from .ports import LOOPBACK, free_port
from .procs import ManagedProcess, ProcessTracker, wait_for_port, wait_until

__all__ = ["MitmProxy", "mitm_venv", "require_mitmdump", "start_mitmproxy"]

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
READ_TIMEOUT = 60.0
# Every proxy variable a test environment may set (the squid tests do): mitmdump connects directly.
_NO_PROXY_ENV = {name: "" for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                                       "ALL_PROXY")}

# Summaries of the flows in a dump, printed as JSON by the mitm venv's python (mitmproxy's own reader).
_SUMMARIZE = r"""
import json, sys
from mitmproxy import io
out = []
with open(sys.argv[1], "rb") as f:
    for flow in io.FlowReader(f).stream():
        item = {"type": flow.type}
        request = getattr(flow, "request", None)
        if request is not None:
            item.update(method=request.method, url=request.url, request_size=len(request.raw_content or b""))
        response = getattr(flow, "response", None)
        if response is not None:
            item.update(status=response.status_code, response_size=len(response.raw_content or b""))
        ws = getattr(flow, "websocket", None)
        if ws is not None:
            item["websocket"] = [{"from_client": m.from_client, "type": m.type.name.lower(),
                                  "size": len(m.content)} for m in ws.messages]
        if getattr(flow, "error", None) is not None:
            item["error"] = flow.error.msg
        out.append(item)
print(json.dumps(out))
"""


def mitm_venv() -> Path:
    return Path(os.environ.get("MITM_VENV") or ROOT / "build" / "mitm-venv")


def require_mitmdump() -> Path:
    """The ``mitmdump`` of the mitm venv; a missing one fails under CI and skips elsewhere."""
    path = mitm_venv() / "bin" / "mitmdump"
    if not os.access(path, os.X_OK):
        missing_prerequisite(f"{path} not found: run scripts/bootstrap.sh (make test does), which installs "
                             "mitmproxy into its own venv")
    return path


@dataclass(frozen=True)
class MitmProxy:
    """A running mitmdump: the proxy URL to give clients, the CA clients must trust, the flow dump."""

    process: ManagedProcess
    port: int
    confdir: Path
    flow_file: Path

    @property
    def proxy_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ca_cert(self) -> Path:
        """mitmproxy's CA certificate (PEM), generated in ``confdir`` at start."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    def finish(self) -> None:
        """End mitmdump by PID (SIGTERM: it writes out pending flows and exits). Idempotent."""
        status = self.process.stop()
        if status not in (0, -15):
            raise RuntimeError(f"mitmdump exited with status {status}:\n{self.process.describe()}")

    def dump_bytes(self) -> bytes:
        """The raw flow dump, after `finish()`."""
        self._require_finished()
        return self.flow_file.read_bytes() if self.flow_file.exists() else b""

    def flows(self) -> list[dict[str, Any]]:
        """The dump's flows summarized (method, url, status, sizes, WebSocket messages), after `finish()`."""
        self._require_finished()
        if not self.flow_file.exists():
            return []
        python = mitm_venv() / "bin" / "python"
        result = subprocess.run([python, "-c", _SUMMARIZE, self.flow_file], capture_output=True,
                                timeout=READ_TIMEOUT, check=False, env={**os.environ, "HOME": str(self.confdir)})
        if result.returncode != 0:
            raise RuntimeError(f"reading {self.flow_file} failed: {result.stderr.decode(errors='replace')}")
        return json.loads(result.stdout)

    def _require_finished(self) -> None:
        if self.process.running:
            raise RuntimeError("call finish() first: mitmdump writes its flows out when it ends")


def start_mitmproxy(procs: ProcessTracker, work_dir: Path, *, upstream_ca: Path | None = None,
                    timeout: float = START_TIMEOUT) -> MitmProxy:
    """Start mitmdump intercepting TLS on 127.0.0.1:<free port>; return once it listens and has its CA."""
    mitmdump = require_mitmdump()
    work_dir.mkdir(parents=True, exist_ok=True)
    confdir = work_dir / "mitm-conf"
    home = work_dir / "mitm-home"
    for path in (confdir, home):
        path.mkdir(mode=0o700, exist_ok=True)
    flow_file = work_dir / "flows.mitm"
    port = free_port()
    upstream = f"ssl_verify_upstream_trusted_ca={upstream_ca}" if upstream_ca else "ssl_insecure=true"
    argv = [mitmdump, "--mode", "regular", "--listen-host", LOOPBACK, "--listen-port", str(port),
            "--set", f"confdir={confdir}", "--set", upstream, "--set", "flow_detail=1", "-w", flow_file]
    proc = procs.spawn(argv, env={**_NO_PROXY_ENV, "HOME": str(home)}, name="mitmdump")
    wait_for_port(LOOPBACK, port, timeout, proc=proc)
    proxy = MitmProxy(process=proc, port=port, confdir=confdir, flow_file=flow_file)
    wait_until(proxy.ca_cert.exists, timeout, message=lambda: f"mitmproxy's CA in {confdir}\n{proc.describe()}")
    return proxy
