"""``tunnel-demo``: the whole product on one machine, end to end, in about ten seconds.

Theory of operation: everything listens on 127.0.0.1 on ports the kernel picked, inside one work
directory (a temporary one, removed at the end, unless ``--keep DIR``). The product runs as it would in
production: ``tunnel-relay`` and ``tunnel-agent`` are child processes started from this interpreter's
bin directory, configured by TOML files and certificates made with the product's own CLI. The hospital
PACS (:class:`DemoPacs`) and the cloud Storage SCP (:class:`StoreScp`) run in this process on
pynetdicom threads; the PACS's C-MOVE destination ``CLOUD_STORE`` is the *agent's* local listener, so a
C-MOVE travels out of the hospital through the tunnel exactly as in a real deployment.

The steps run in order and stop at the first failure; each prints what it did (never a patient name,
patient ID or UID: the generated study carries canary PHI so a test can prove it). Whatever happens,
Ctrl-C and SIGTERM included, every child process is ended by its own PID (SIGTERM, a grace period, then
SIGKILL) and the in-process SCPs are stopped. Every PID started is appended to ``<work dir>/pids.txt``
as soon as it exists, so a test can check that none survives.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import sop_class as sc
from pynetdicom.dul import DULServiceProvider

from tunnel_demo.dataset import StudyInfo, generate_study
from tunnel_demo.localhost import LOOPBACK, free_ports
from tunnel_demo.pacs import DemoPacs, PacsError, enable_nodelay, quiet_pynetdicom
from tunnel_demo.store_scp import StoreScp

SITE = "hospital-a"
ROUTE = "pacs"
RELAY_CALLED_AE = "HOSPITAL_PACS"  # what the cloud calls the hospital PACS, at the relay
PACS_AE = "PACS"  # the PACS's own AE title (the agent rewrites HOSPITAL_PACS to it)
CLOUD_SCU_AE = "CLOUD_AI"  # the cloud service querying and pulling
CLOUD_STORE_AE = "CLOUD_STORE"  # the cloud Storage SCP (C-MOVE destination, modality target)
MODALITY_AE = "DEMO_CT"  # a modality inside the hospital sending to the cloud
ROWS = COLS = 256
DEFAULT_INSTANCES = 40
MAX_INSTANCES = 5000
MODALITY_INSTANCES = 5

PIDS_FILE = "pids.txt"
CONNECT_TIMEOUT_S = 20.0  # relay and agent up, tunnel connected
CLI_TIMEOUT_S = 60.0  # one `tunnel-relay ...` / `tunnel-agent status` run
STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL
KILL_WAIT_S = 5.0
DIMSE_TIMEOUT_S = 60.0
ARRIVAL_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
LOG_TAIL_LINES = 25

_SUCCESS = 0x0000
_PENDING = (0xFF00, 0xFF01)

LOG = logging.getLogger(__name__)


class StepFailed(PacsError):  # PacsError is the tunnel_demo package's exception root
    """A step did not do what it should; the message says what, for a person to read."""


# ------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Layout:
    """Where everything lives: the work directory's files and the ports of every listener."""

    root: Path
    relay_tunnel: int
    relay_admin: int
    relay_dicom: int
    agent_status: int
    agent_listener: int
    pacs: int
    store: int

    @property
    def state_dir(self) -> Path:
        return self.root / "relay" / "state"

    @property
    def relay_config(self) -> Path:
        return self.root / "relay" / "relay.toml"

    @property
    def agent_state(self) -> Path:
        return self.root / "agent" / "state"

    @property
    def agent_config(self) -> Path:
        return self.root / "agent" / "agent.toml"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def data(self, name: str) -> Path:
        return self.root / "data" / name


def _toml_str(value: object) -> str:
    return json.dumps(str(value))  # a JSON string of a path or AE title is a valid TOML basic string


def relay_toml(layout: Layout) -> str:
    """The relay's configuration: one cloud listener and one site (see deploy/relay.example.toml)."""
    return "\n".join([
        f"state_dir = {_toml_str(layout.state_dir)}",
        "[tunnel]", f"host = {_toml_str(LOOPBACK)}", f"port = {layout.relay_tunnel}",
        "[admin]", f"host = {_toml_str(LOOPBACK)}", f"port = {layout.relay_admin}",
        "[[listeners]]", 'name = "cloud"', f"host = {_toml_str(LOOPBACK)}", f"port = {layout.relay_dicom}",
        "[[listeners.routes]]", f"called_ae = {_toml_str(RELAY_CALLED_AE)}", f"site = {_toml_str(SITE)}",
        f"route = {_toml_str(ROUTE)}", f"allowed_calling_aes = {json.dumps([CLOUD_SCU_AE])}",
        "[[sites]]", f"name = {_toml_str(SITE)}",
        "[[sites.destinations]]", f"called_ae = {_toml_str(CLOUD_STORE_AE)}",
        f"host = {_toml_str(LOOPBACK)}", f"port = {layout.store}",
        f"allowed_calling_aes = {json.dumps([PACS_AE, MODALITY_AE])}",
    ]) + "\n"


def agent_toml(layout: Layout) -> str:
    """The agent's configuration: its state directory (enrollment fills it: relay URL, key, certificate,
    pinned CA), one route to the PACS, a local listener."""
    return "\n".join([
        f"state_dir = {_toml_str(layout.agent_state)}",
        "backoff_initial = 0.1", "backoff_max = 2.0", "connect_timeout = 5.0",
        "[status]", f"host = {_toml_str(LOOPBACK)}", f"port = {layout.agent_status}",
        "[listener]", f"host = {_toml_str(LOOPBACK)}", f"port = {layout.agent_listener}",
        "[[routes]]", f"name = {_toml_str(ROUTE)}", f"host = {_toml_str(LOOPBACK)}", f"port = {layout.pacs}",
        f"called_ae = {_toml_str(PACS_AE)}",
    ]) + "\n"


def program(name: str, module: str) -> list[str]:
    """argv prefix of one of the product's programs: the console script next to this interpreter."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


# ------------------------------------------------------------------------------------------ children
@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Children:
    """Every process the demo starts. Each PID is recorded at once; all are ended by PID in ``stop_all``.

    Children get their own session, so a Ctrl-C in the terminal reaches only the demo, which then ends
    them in order. Signals go through the ``Popen`` object, which has not reaped the child yet, so the PID
    cannot belong to another process.
    """

    def __init__(self, pids_file: Path) -> None:
        self._pids_file = pids_file
        self._running: list[Child] = []

    def _record(self, pid: int, name: str) -> None:
        with open(self._pids_file, "a", encoding="ascii") as fh:
            fh.write(f"{pid} {name}\n")

    def spawn(self, name: str, argv: Sequence[str], log_path: Path) -> Child:
        """Start a long-running program, stdout and stderr to ``log_path``; ended by ``stop_all``."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(name, popen, log_path)
        self._running.append(child)
        self._record(popen.pid, name)
        return child

    def run(self, name: str, argv: Sequence[str], timeout: float = CLI_TIMEOUT_S,
            stdin: str | None = None) -> tuple[int, str]:
        """Run a short command to completion, ``stdin`` on its standard input (secrets go there, never
        into argv); returns (exit status, stdout and stderr)."""
        popen = subprocess.Popen(list(argv), stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        self._record(popen.pid, name)
        try:
            output, _ = popen.communicate(input=stdin, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise StepFailed(f"{name} did not finish within {timeout:.0f} s") from exc
        finally:
            _end(popen)
        return popen.returncode, output

    def stop_all(self) -> list[str]:
        """End every long-running child, newest first; returns one line per child saying how it ended."""
        lines = []
        while self._running:
            child = self._running.pop()
            status, killed = _end(child.popen)
            how = "did not stop on SIGTERM, killed" if killed else f"exit status {status}"
            lines.append(f"{child.name} (pid {child.popen.pid}): {how}")
        return lines


def _end(popen: subprocess.Popen[Any]) -> tuple[int | None, bool]:
    """SIGTERM, wait, SIGKILL, wait — by PID. Returns (exit status, whether SIGKILL was needed)."""
    if popen.poll() is not None:
        return popen.returncode, False
    popen.send_signal(signal.SIGTERM)
    try:
        return popen.wait(timeout=STOP_GRACE_S), False
    except subprocess.TimeoutExpired:
        popen.kill()
    try:
        return popen.wait(timeout=KILL_WAIT_S), True
    except subprocess.TimeoutExpired:
        return None, True


# ------------------------------------------------------------------------------------------ console
@dataclass
class StepResult:
    number: int
    title: str
    state: str = "skipped"  # "ok" | "failed" | "interrupted" | "skipped"
    seconds: float = 0.0
    note: str = ""


class Console:
    """What a person watching sees: numbered steps, indented details, a ✔ or ✘ per step, a summary."""

    def __init__(self, total: int, verbose: bool, stream: Any = None) -> None:
        self._stream = stream or sys.stdout
        self.total = total
        self.verbose = verbose
        encoding = getattr(self._stream, "encoding", None) or "ascii"
        try:
            "✔✘–·→".encode(encoding)
            self.ok, self.fail, self.dash = "✔", "✘", "–"
        except (UnicodeEncodeError, LookupError):
            self.ok, self.fail, self.dash = "OK", "X", "-"

    def say(self, text: str = "") -> None:
        """Print a line; a closed output (``tunnel-demo | head``) must not stop the demo or its clean-up."""
        try:
            print(text, file=self._stream, flush=True)
        except (BrokenPipeError, ValueError):
            self._stream = open(os.devnull, "w", encoding="utf-8")

    def begin(self, number: int, title: str) -> None:
        self.say(f"\n[{number}/{self.total}] {title}")

    def detail(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            self.say(f"      {line}")

    def debug(self, text: str) -> None:
        if self.verbose:
            self.detail(text)

    def end(self, result: StepResult) -> None:
        ok = result.state == "ok"
        self.say(f"      {self.ok} done in {_seconds(result.seconds)}" if ok else
                 f"      {self.fail} {result.state}: {result.note}")

    def summary(self, results: list[StepResult]) -> None:
        width = max(len(r.title) for r in results)
        marks = {"ok": f"{self.ok} ok", "failed": f"{self.fail} FAILED",
                 "interrupted": f"{self.fail} interrupted", "skipped": f"{self.dash} not run"}
        self.say("\nSummary")
        self.say(f"  {'#':>2}  {'step':<{width}}  {'result':<13}  {'time':>8}  notes")
        for r in results:
            time_text = _seconds(r.seconds) if r.state != "skipped" else ""
            note = r.note if r.state == "ok" else (r.note.splitlines() or [""])[0][:60]
            row = f"  {r.number:>2}  {r.title:<{width}}  {marks[r.state]:<13}  {time_text:>8}  {note}"
            self.say(row.rstrip())


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def poll_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` every POLL_INTERVAL_S: True once it holds, False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_INTERVAL_S) + 2):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S)
    return bool(predicate())


# ------------------------------------------------------------------------------------------ DICOM helpers
def scu_ae(ae_title: str, *sop_classes: str) -> AE:
    """A requesting AE with bounded timeouts, proposing explicit then implicit VR little endian."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 30, DIMSE_TIMEOUT_S, DIMSE_TIMEOUT_S
    for uid in sop_classes:
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    return ae


@contextlib.contextmanager
def associated(ae: AE, port: int, called_ae: str) -> Iterator[Any]:
    """An established association to 127.0.0.1:``port``: released on normal exit, aborted otherwise."""
    handlers = [(evt.EVT_CONN_OPEN, enable_nodelay)]
    assoc = ae.associate(LOOPBACK, port, ae_title=called_ae, evt_handlers=handlers)
    if not assoc.is_established:
        how = "rejected (reason logged above)" if assoc.is_rejected else "aborted" if assoc.is_aborted \
            else "not set up (no answer)"
        raise StepFailed(f"association {ae.ae_title} -> {called_ae} on port {port} was {how}")
    try:
        yield assoc
    except BaseException:
        assoc.abort()  # a release would wait for an unfinished operation (a C-MOVE) to end
        raise
    if assoc.is_established:
        assoc.release()
    if assoc.is_alive():
        assoc.abort()


def _status_code(status: Dataset | None, what: str) -> int:
    if status is None or "Status" not in status:
        raise StepFailed(f"{what}: no response (timed out or the association was aborted)")
    return int(status.Status)


def _study_line(match: Dataset) -> str:
    """One C-FIND match without PHI: date, modalities, description, instance count (no names, IDs, UIDs)."""
    date = str(match.get("StudyDate", "") or "")
    if len(date) == 8:
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    mods = match.get("ModalitiesInStudy", "") or ""
    mods = "/".join(mods) if not isinstance(mods, str) else mods
    desc = str(match.get("StudyDescription", "") or "")
    count = match.get("NumberOfStudyRelatedInstances", "?")
    return f"StudyDate {date or '?'} | {mods or '?'} | {desc or '(no description)'} | {count} instances"


# ------------------------------------------------------------------------------------------ the demo
class Demo:
    """The steps, in order. Construct, ``run_steps()``, then always ``close()``."""

    def __init__(self, layout: Layout, instances: int, console: Console) -> None:
        self.layout, self.instances, self.console = layout, instances, console
        self.children = Children(layout.root / PIDS_FILE)
        self.relay: Child | None = None
        self.agent: Child | None = None
        self.pacs: DemoPacs | None = None
        self.store: StoreScp | None = None
        self.study: StudyInfo | None = None
        self.modality_study: StudyInfo | None = None
        self.study_uid: str | None = None
        self._scu_aes: list[AE] = []

    def steps(self) -> list[tuple[str, Callable[[], str]]]:
        return [
            ("Certificates and configuration", self.step_pki),
            ("Generate CT studies", self.step_generate),
            ("Start the hospital PACS and the cloud store SCP", self.step_peers),
            ("Start the relay and the agent, wait for the tunnel", self.step_tunnel),
            ("C-ECHO cloud -> hospital PACS", self.step_echo),
            ("C-FIND studies on the hospital PACS", self.step_find),
            ("C-MOVE the study to CLOUD_STORE", self.step_move),
            ("C-STORE from a hospital modality to the cloud", self.step_store),
            ("tunnel-agent status", self.step_status),
        ]

    def run_steps(self, results: list[StepResult]) -> None:
        """Run every step in order, filling ``results``; stops at the first failure."""
        for result, (_, action) in zip(results, self.steps(), strict=True):
            self.console.begin(result.number, result.title)
            started = time.monotonic()
            try:
                result.note = action() or ""
                result.state = "ok"
            except KeyboardInterrupt:
                result.state, result.note = "interrupted", "Ctrl-C or SIGTERM"
                raise
            except StepFailed as exc:
                result.state, result.note = "failed", str(exc)
            except Exception as exc:  # an unexpected error still ends the demo cleanly, and says what
                result.state, result.note = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                result.seconds = time.monotonic() - started
                self.console.end(result)
            if result.state != "ok":
                return

    def close(self) -> list[str]:
        """Stop everything started, children by PID first. Safe to call at any point, and twice."""
        for ae in self._scu_aes:
            ae.shutdown()
        lines = self.children.stop_all()
        for peer in (self.pacs, self.store):
            if peer is not None:
                peer.stop()
        _end_stray_dicom_threads()
        return lines

    def _scu(self, ae_title: str, *sop_classes: str) -> AE:
        ae = scu_ae(ae_title, *sop_classes)
        self._scu_aes.append(ae)
        return ae

    # ---- 1. certificates and configuration ----
    def step_pki(self) -> str:
        lay = self.layout
        relay_cli = program("tunnel-relay", "relay.cli")
        self._cli("tunnel-relay ca init", [*relay_cli, "ca", "init", "--state-dir", str(lay.state_dir),
                                           "--hostname", LOOPBACK])
        lay.relay_config.write_text(relay_toml(lay))
        lay.agent_config.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lay.agent_config.write_text(agent_toml(lay))
        self.console.debug(f"relay config: {lay.relay_config}\nagent config: {lay.agent_config}")
        self.console.detail(f"routing: {RELAY_CALLED_AE} at the relay -> site {SITE}, route {ROUTE!r} "
                            f"(callers: {CLOUD_SCU_AE})")
        self.console.detail(f"site {SITE} may send to: {CLOUD_STORE_AE} (callers: {PACS_AE}, {MODALITY_AE})")
        return "relay CA and certificate, relay.toml, agent.toml"

    def _cli(self, name: str, argv: list[str], stdin: str | None = None) -> str:
        status, output = self.children.run(name, argv, stdin=stdin)
        if status != 0:
            raise StepFailed(f"{name} exited with status {status}:\n{output.strip()}")
        self.console.detail(f"$ {name}: {output.strip().splitlines()[-1] if output.strip() else 'ok'}")
        return output

    # ---- 2. studies ----
    def step_generate(self) -> str:
        self.study = generate_study(self.layout.data("pacs") / "study", self.instances, rows=ROWS, cols=COLS)
        self.modality_study = generate_study(self.layout.data("modality"), MODALITY_INSTANCES,
                                             rows=ROWS, cols=COLS, seed=1)
        mb = self.study.total_bytes / 1e6
        self.console.detail(f"on the PACS:  {self.instances} CT instances {ROWS}x{COLS}, {mb:.1f} MB")
        self.console.detail(f"at the modality: {MODALITY_INSTANCES} new CT instances (a second study)")
        return f"{self.instances} + {MODALITY_INSTANCES} instances"

    # ---- 3. in-process peers ----
    def step_peers(self) -> str:
        lay = self.layout
        self.store = StoreScp(CLOUD_STORE_AE, LOOPBACK, lay.store, lay.data("cloud-store"))
        self.store.start()
        self.pacs = DemoPacs(PACS_AE, LOOPBACK, lay.pacs, lay.data("pacs"),
                             {CLOUD_STORE_AE: (LOOPBACK, lay.agent_listener)})
        self.pacs.start()
        if self.pacs.instance_count != self.instances:
            raise StepFailed(f"the PACS indexed {self.pacs.instance_count} of {self.instances} instances")
        self.console.detail(f"hospital PACS  {PACS_AE:<12} {LOOPBACK}:{lay.pacs}  (move destination "
                            f"{CLOUD_STORE_AE} = the agent, {LOOPBACK}:{lay.agent_listener})")
        self.console.detail(f"cloud store    {CLOUD_STORE_AE:<12} {LOOPBACK}:{lay.store}")
        return f"PACS :{lay.pacs}, store :{lay.store}"

    # ---- 4. relay and agent ----
    def step_tunnel(self) -> str:
        lay = self.layout
        verbose = ["-v"] if self.console.verbose else []
        self.relay = self.children.spawn(
            "relay", [*program("tunnel-relay", "relay.cli"), "serve", "--config", str(lay.relay_config),
                      *verbose], lay.log("relay"))
        self.console.detail(f"relay  pid {self.relay.popen.pid}: tunnel wss://{LOOPBACK}:{lay.relay_tunnel}"
                            f"/tunnel, DICOM {LOOPBACK}:{lay.relay_dicom}")
        self._wait("the relay's admin port to accept connections", lambda: _port_open(lay.relay_admin))
        self._enroll()
        self.agent = self.children.spawn(
            "agent", [*program("tunnel-agent", "tunnel_agent.cli"), "run", "--config", str(lay.agent_config),
                      *verbose], lay.log("agent"))
        self.console.detail(f"agent  pid {self.agent.popen.pid}: DICOM listener "
                            f"{LOOPBACK}:{lay.agent_listener}, status http://{LOOPBACK}:{lay.agent_status}")
        self.console.debug(f"logs: {lay.log('relay')}, {lay.log('agent')}")
        started = time.monotonic()
        self._wait("the relay's DICOM port to accept connections", lambda: _port_open(lay.relay_dicom))
        self._wait("the agent to report 'connected'", lambda: self._agent_state() == "connected")
        self._wait(f"the relay to see site {SITE}", self._relay_sees_site)
        self._wait("the agent's DICOM listener to accept connections", lambda: _port_open(lay.agent_listener))
        self.console.detail(f"tunnel up: agent -> relay mutual-TLS WebSocket connected in "
                            f"{_seconds(time.monotonic() - started)}")
        return "enrolled with a one-line token; connected"

    def _enroll(self) -> None:
        """The one-line join: `site add` on the relay prints a token, `enroll` on the agent redeems it."""
        lay = self.layout
        added = self._cli("tunnel-relay site add", [*program("tunnel-relay", "relay.cli"), "site", "add", SITE,
                                                    "--config", str(lay.relay_config), "--json"])
        try:
            token = json.loads(added)["token"]
        except (ValueError, KeyError) as exc:
            raise StepFailed(f"tunnel-relay site add printed no token:\n{added}") from exc
        self._cli("tunnel-agent enroll", [*program("tunnel-agent", "tunnel_agent.cli"), "enroll", "--config",
                                          str(lay.agent_config)], stdin=token + "\n")

    def _wait(self, what: str, predicate: Callable[[], bool], timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Poll ``predicate`` until true; fail at once if a child died, or after ``timeout`` s, with logs."""

        def ready() -> bool:
            for child in (self.relay, self.agent):
                if child is not None and child.popen.poll() is not None:
                    raise StepFailed(f"{child.name} exited (status {child.popen.returncode}) while "
                                     f"waiting for {what}\n{self._log_tails()}")
            return predicate()

        if not poll_until(ready, timeout):
            raise StepFailed(f"timed out after {timeout:.0f} s waiting for {what}\n{self._log_tails()}")

    def _log_tails(self) -> str:
        parts = []
        for child in (self.relay, self.agent):
            if child is not None:
                parts.append(f"--- last lines of {child.log_path} ---\n{child.log_tail()}")
        return "\n".join(parts)

    def _agent_state(self) -> str | None:
        status = _http_json(f"http://{LOOPBACK}:{self.layout.agent_status}/api/status")
        return status.get("state") if status else None

    def _relay_sees_site(self) -> bool:
        token = (self.layout.state_dir / "admin.token").read_text().strip()
        status = _http_json(f"http://{LOOPBACK}:{self.layout.relay_admin}/api/status", token)
        sites = status.get("sites", []) if status else []
        return any(s.get("name") == SITE and s.get("connected") for s in sites)

    # ---- 5. C-ECHO ----
    def step_echo(self) -> str:
        ae = self._scu(CLOUD_SCU_AE, sc.Verification)
        started = time.monotonic()
        with associated(ae, self.layout.relay_dicom, RELAY_CALLED_AE) as assoc:
            set_up = time.monotonic() - started
            echo_started = time.monotonic()
            code = _status_code(assoc.send_c_echo(), "C-ECHO")
            round_trip = time.monotonic() - echo_started
        if code != _SUCCESS:
            raise StepFailed(f"C-ECHO status 0x{code:04X}")
        self.console.detail(f"{CLOUD_SCU_AE} -> relay :{self.layout.relay_dicom} ({RELAY_CALLED_AE}) "
                            f"-> tunnel -> agent -> {PACS_AE}")
        self.console.detail(f"association set-up {_seconds(set_up)}; C-ECHO status 0x0000 (Success), "
                            f"round trip {_seconds(round_trip)}")
        return f"round trip {_seconds(round_trip)}"

    # ---- 6. C-FIND ----
    def step_find(self) -> str:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        # Only non-PHI return keys, plus the study UID for the C-MOVE (used, never printed).
        for keyword in ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "StudyDescription",
                        "NumberOfStudyRelatedInstances"):
            setattr(query, keyword, "")
        ae = self._scu(CLOUD_SCU_AE, sc.StudyRootQueryRetrieveInformationModelFind)
        with associated(ae, self.layout.relay_dicom, RELAY_CALLED_AE) as assoc:
            matches = self._find(assoc, query)
        for match in matches:
            self.console.detail(_study_line(match))
        wanted = self.study.study_uid if self.study else None
        found = [m for m in matches if str(m.get("StudyInstanceUID", "")) == wanted]
        if not found:
            raise StepFailed(f"{len(matches)} match(es), none of them the generated study")
        count = found[0].get("NumberOfStudyRelatedInstances")
        if count is None or int(count) != self.instances:
            raise StepFailed(f"the PACS reports {count} instances in the study, expected {self.instances}")
        self.study_uid = wanted
        return f"{len(matches)} {'study' if len(matches) == 1 else 'studies'}"

    @staticmethod
    def _find(assoc: Any, query: Dataset) -> list[Dataset]:
        matches = []
        for status, identifier in assoc.send_c_find(query, sc.StudyRootQueryRetrieveInformationModelFind):
            code = _status_code(status, "C-FIND")
            if code in _PENDING and identifier is not None:
                matches.append(identifier)
            elif code == _SUCCESS:
                return matches
            else:
                raise StepFailed(f"C-FIND failed with status 0x{code:04X}")
        raise StepFailed("C-FIND ended without a final status")

    # ---- 7. C-MOVE ----
    def step_move(self) -> str:
        assert self.study is not None and self.store is not None
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = self.study_uid
        ae = self._scu(CLOUD_SCU_AE, sc.StudyRootQueryRetrieveInformationModelMove)
        started = time.monotonic()
        with associated(ae, self.layout.relay_dicom, RELAY_CALLED_AE) as assoc:
            final = self._move(assoc, identifier)
        elapsed = time.monotonic() - started
        completed, failed, warning = (int(final.get(f"NumberOf{k}Suboperations", 0) or 0)
                                      for k in ("Completed", "Failed", "Warning"))
        self.console.detail(f"path: {PACS_AE} -> agent :{self.layout.agent_listener} -> tunnel -> relay -> "
                            f"{CLOUD_STORE_AE} :{self.layout.store}")
        self.console.detail(f"sub-operations: {completed} completed, {failed} failed, {warning} warning")
        code = int(final.Status)
        if code != _SUCCESS or completed != self.instances:
            raise StepFailed(f"C-MOVE final status 0x{code:04X}, {completed}/{self.instances} completed")
        mb = self.study.total_bytes / 1e6
        self.console.detail(f"{mb:.1f} MB in {_seconds(elapsed)} = {mb / elapsed:.1f} MB/s "
                            "(paced by the pynetdicom PACS and SCP; the tunnel's own speed: benchmarks)")
        self._verify_arrival(self.study)
        return f"{completed} instances, {mb / elapsed:.1f} MB/s"

    @staticmethod
    def _move(assoc: Any, identifier: Dataset) -> Dataset:
        model = sc.StudyRootQueryRetrieveInformationModelMove
        for status, _ in assoc.send_c_move(identifier, CLOUD_STORE_AE, model):
            code = _status_code(status, "C-MOVE")
            if code not in _PENDING:
                return status
        raise StepFailed("C-MOVE ended without a final status")

    def _verify_arrival(self, study: StudyInfo) -> None:
        """Every instance of ``study`` is at the cloud store SCP, with the same pixel data."""
        assert self.store is not None
        expected = dict(zip(study.sop_instance_uids, study.files, strict=True))

        def arrived() -> dict[str, Path]:
            return {p.stem: p for p in self.store.received if p.stem in expected}

        poll_until(lambda: len(arrived()) == len(expected), ARRIVAL_TIMEOUT_S)
        received = arrived()
        if len(received) != len(expected):
            raise StepFailed(f"only {len(received)} of {len(expected)} instances arrived at {CLOUD_STORE_AE}")
        differing = sum(1 for uid, src in expected.items()
                        if dcmread(received[uid]).PixelData != dcmread(src).PixelData)
        if differing:
            raise StepFailed(f"{differing} instance(s) arrived with different pixel data")
        self.console.detail(f"verified at {CLOUD_STORE_AE}: all {len(expected)} instances arrived, "
                            "pixel data identical")

    # ---- 8. C-STORE from a modality ----
    def step_store(self) -> str:
        assert self.modality_study is not None
        ae = self._scu(MODALITY_AE, sc.CTImageStorage)
        started = time.monotonic()
        with associated(ae, self.layout.agent_listener, CLOUD_STORE_AE) as assoc:
            for path in self.modality_study.files:
                code = _status_code(assoc.send_c_store(path), "C-STORE")
                if code != _SUCCESS:
                    raise StepFailed(f"C-STORE status 0x{code:04X}")
        elapsed = time.monotonic() - started
        count = len(self.modality_study.files)
        self.console.detail(f"{MODALITY_AE} -> agent :{self.layout.agent_listener} ({CLOUD_STORE_AE}) "
                            f"-> tunnel -> relay -> {CLOUD_STORE_AE} :{self.layout.store}")
        self.console.detail(f"{count} instances stored, status 0x0000 each, in {_seconds(elapsed)}")
        self._verify_arrival(self.modality_study)
        return f"{count} instances"

    # ---- 9. tunnel-agent status ----
    def step_status(self) -> str:
        config = self.layout.agent_config
        argv = [*program("tunnel-agent", "tunnel_agent.cli"), "status", "--config", str(config)]
        status, output = self.children.run("tunnel-agent status", argv)
        self.console.detail(f"$ tunnel-agent status --config {config.name}")
        self.console.detail(output.rstrip())
        if status != 0:
            raise StepFailed(f"tunnel-agent status exited with status {status} (0 means connected)")
        return "connected"


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_json(url: str, token: str | None = None) -> dict[str, Any] | None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as response:
            data = json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------ entry point
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel-demo",
        description="Run the DICOM tunnel end to end on 127.0.0.1: relay, agent, a hospital PACS, a cloud "
                    "store SCP; C-ECHO, C-FIND, C-MOVE and C-STORE through the tunnel.")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="work in DIR (new or empty) and keep it: configs, certificates, logs, pids.txt")
    parser.add_argument("--instances", type=int, default=DEFAULT_INSTANCES,
                        help=f"instances in the CT study on the PACS (default {DEFAULT_INSTANCES})")
    parser.add_argument("-v", "--verbose", action="store_true", help="more detail; relay and agent log debug")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 1 <= args.instances <= MAX_INSTANCES:
        parser.error(f"--instances must be between 1 and {MAX_INSTANCES}")
    if args.keep is not None and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
        parser.error(f"--keep {args.keep}: choose a new or empty directory")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    quiet_pynetdicom()
    # SIGTERM behaves like Ctrl-C (also when started with SIGINT ignored, as a shell's `cmd &` does): both
    # raise KeyboardInterrupt, which unwinds through _run's finally, which ends every child.
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in signals}
    try:
        root = Path(tempfile.mkdtemp(prefix="tunnel-demo-")) if args.keep is None else args.keep.resolve()
        root.mkdir(parents=True, exist_ok=True)
        return _run(root, args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(root: Path, args: argparse.Namespace) -> int:
    layout = Layout(root, *free_ports(7))
    demo: Demo | None = None
    console = Console(0, args.verbose)
    results: list[StepResult] = []
    interrupted = False
    try:
        demo = Demo(layout, args.instances, console)
        steps = demo.steps()
        console.total = len(steps)
        results = [StepResult(i, title) for i, (title, _) in enumerate(steps, start=1)]
        console.say("tunnel-demo: a cloud service and a hospital talk DICOM through the tunnel, "
                    f"all on {LOOPBACK}")
        console.say(f"work directory: {root}" + ("" if args.keep else " (removed at the end)"))
        demo.run_steps(results)
    except KeyboardInterrupt:
        interrupted = True
        console.say(f"\n{console.fail} interrupted, stopping everything")
    finally:
        # A second Ctrl-C must not cut clean-up short; it is bounded (a few seconds per child).
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        _clean_up(demo, root, keep=args.keep is not None, console=console)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _conclude(console, results, interrupted, root if args.keep else None)


def _end_stray_dicom_threads(timeout: float = 5.0) -> None:
    """A Ctrl-C that lands inside pynetdicom's ``associate()`` can leave that association's upper-layer
    thread (not a daemon) behind, unknown to its AE, and the interpreter would wait for it at exit: stop
    every one still running and give each a bounded moment to end."""
    strays = [t for t in threading.enumerate() if isinstance(t, DULServiceProvider) and t.is_alive()]
    for thread in strays:
        thread.kill_dul()
    deadline = time.monotonic() + timeout
    for thread in strays:
        thread.join(max(0.0, deadline - time.monotonic()))


def _clean_up(demo: Demo | None, root: Path, *, keep: bool, console: Console) -> None:
    try:
        lines = demo.close() if demo is not None else []
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    console.say("")
    for line in lines:
        console.say(f"stopped {line}")


def _conclude(console: Console, results: list[StepResult], interrupted: bool, kept: Path | None) -> int:
    if results:
        console.summary(results)
    if kept is not None:
        console.say(f"\nkept {kept} (logs in {kept / 'logs'}, PIDs in {kept / PIDS_FILE})")
    failed = [r for r in results if r.state in ("failed", "interrupted")]
    if interrupted:
        console.say(f"\n{console.fail} Interrupted.")
        return 130
    if failed or not results:
        first = failed[0] if failed else None
        reason = "no steps ran"
        if first is not None:
            reason = f"step {first.number} ({first.title}) failed: {(first.note.splitlines() or [''])[0]}"
        console.say(f"\n{console.fail} Demo FAILED - {reason}")
        return 1
    console.say(f"\n{console.ok} All {len(results)} steps succeeded: the tunnel carried DICOM both ways.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
