"""``python -m tunnel_demo``: the whole product on one machine, end to end, in about ten seconds.

Theory of operation: everything listens on 127.0.0.1 on ports the kernel picked, inside one work
directory (a temporary one, removed at the end, unless ``--keep DIR``). The product runs as it would in
production: ``tunnel-relay`` and ``tunnel-agent`` are child processes started from this interpreter's
bin directory, configured by TOML files and certificates made with the product's own CLI, brought up by
the dev kit (:mod:`devkit.stack`, the same bring-up the tests and the benchmark use). The hospital
PACS (:class:`DemoPacs`) and the cloud Storage SCP (:class:`StoreScp`) run in this process on
pynetdicom threads; the PACS's C-MOVE destination ``CLOUD_STORE`` is the *agent's* local listener, so a
C-MOVE travels out of the hospital through the tunnel exactly as in a real deployment.

The steps run in order and stop at the first failure; each prints what it did (never a patient name,
patient ID or UID: the generated study carries canary PHI so a test can prove it). Whatever happens,
Ctrl-C and SIGTERM included, every child process is ended by its own PID (SIGTERM, a grace period, then
SIGKILL: the dev kit's :class:`~devkit.procs.ProcessTracker`) and the in-process SCPs are stopped. Every
PID started is appended to ``<work dir>/pids.txt`` as soon as it exists, so a test can check that none
survives.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
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

from devkit.errors import DevkitError, WaitTimeout
from devkit.ports import LOOPBACK, free_ports
from devkit.procs import ProcessTracker, StopFailed
from devkit.programs import CHECKOUT, program
from devkit.stack import (
    AgentHandle,
    AgentRoute,
    ListenerRoute,
    RelayHandle,
    SiteDest,
    enroll_agent,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)
from devkit.waits import wait_for_port, wait_until
from tunnel_demo.dataset import StudyInfo, generate_study
from tunnel_demo.fleet import FleetStep
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
# Step 9: a second site behind an emulated WAN (tunnel_bench.wanproxy), spool mode beside passthrough/direct.
WAN_SITE = "hospital-b"
WAN_RTT_MS = 80
WAN_RATE_MBIT = 200.0
WAN_INSTANCES = 20
SPOOL_AE = "CLOUD_SPOOL"  # hospital-b's spool destination: the agent answers, then forwards to the store SCP

PIDS_FILE = "pids.txt"
CONNECT_TIMEOUT_S = 20.0  # relay and agent up, tunnel connected
CLI_TIMEOUT_S = 60.0  # one `tunnel-relay ...` / `tunnel-agent status` run
DIMSE_TIMEOUT_S = 60.0
ARRIVAL_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05

_SUCCESS = 0x0000
_PENDING = (0xFF00, 0xFF01)

LOG = logging.getLogger(__name__)


class StepFailed(PacsError):  # PacsError is the tunnel_demo package's exception root
    """A step did not do what it should; the message says what, for a person to read."""


# ------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Layout:
    """Where everything lives: the work directory's files and the ports of the in-process peers (the
    relay's and the agent's are the dev kit's handles, made in step 1)."""

    root: Path
    pacs: int
    store: int

    def data(self, name: str) -> Path:
        return self.root / "data" / name


@contextlib.contextmanager
def failing_step() -> Iterator[None]:
    """A dev kit error (a program exited, a wait ran out, a CLI run failed) fails the step, saying why."""
    try:
        yield
    except (DevkitError, subprocess.TimeoutExpired) as exc:
        raise StepFailed(str(exc)) from exc


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
        # Logs in <work dir>/logs (relay.log, agent.log); every PID in pids.txt as soon as it exists.
        self.procs = ProcessTracker(layout.root / "logs", pids_file=layout.root / PIDS_FILE)
        self.relay: RelayHandle | None = None
        self.agent: AgentHandle | None = None
        self.pacs: DemoPacs | None = None
        self.store: StoreScp | None = None
        self.study: StudyInfo | None = None
        self.modality_study: StudyInfo | None = None
        self.wan_studies: dict[str, StudyInfo] = {}
        self.study_uid: str | None = None
        self._scu_aes: list[AE] = []
        self._cleanup = contextlib.ExitStack()  # what a step opened beyond processes (the fleet's PostgreSQL)

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
            (f"Spool mode over an emulated {WAN_RTT_MS} ms WAN, beside the direct path", self.step_wan),
            ("A fleet: two relays on one PostgreSQL registry", self.step_fleet),
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
        try:
            lines = [str(ended) for ended in self.procs.stop_all()]
        except StopFailed as exc:
            lines = [str(ended) for ended in exc.ended]
        for peer in (self.pacs, self.store):
            if peer is not None:
                peer.stop()
        with contextlib.suppress(Exception):  # the processes are ended already; this removes their files
            self._cleanup.close()
        _end_stray_dicom_threads()
        return lines

    def _scu(self, ae_title: str, *sop_classes: str) -> AE:
        ae = scu_ae(ae_title, *sop_classes)
        self._scu_aes.append(ae)
        return ae

    # ---- 1. certificates and configuration ----
    def step_pki(self) -> str:
        lay = self.layout
        with failing_step():
            self.relay = make_relay(
                lay.root / "relay", listener_routes=[ListenerRoute(RELAY_CALLED_AE, SITE, ROUTE, [CLOUD_SCU_AE])],
                sites={SITE: [SiteDest(CLOUD_STORE_AE, lay.store, [PACS_AE, MODALITY_AE])],
                       WAN_SITE: [SiteDest(CLOUD_STORE_AE, lay.store, [MODALITY_AE]),
                                  SiteDest(SPOOL_AE, lay.store, [MODALITY_AE, "TUNNEL-HEALTH"])]},
                procs=self.procs)
            # Enrollment fills the agent's state directory: relay URL, key, certificate, pinned CA.
            self.agent = make_agent(self.relay, SITE, lay.root / "agent", routes=[AgentRoute(ROUTE, lay.pacs, PACS_AE)],
                                    backoff_max=2.0, enrolled=True, procs=self.procs)
        self.console.detail(f"$ tunnel-relay ca init: the relay's CA, its server certificate for {LOOPBACK}")
        self.console.debug(f"relay config: {self.relay.config}\nagent config: {self.agent.config}")
        self.console.detail(f"routing: {RELAY_CALLED_AE} at the relay -> site {SITE}, route {ROUTE!r} "
                            f"(callers: {CLOUD_SCU_AE})")
        self.console.detail(f"site {SITE} may send to: {CLOUD_STORE_AE} (callers: {PACS_AE}, {MODALITY_AE})")
        return "relay CA and certificate, relay.toml, agent.toml"

    @property
    def relay_dicom(self) -> int:
        """The relay's DICOM port (the cloud's way in)."""
        assert self.relay is not None
        return self.relay.dicom_port

    @property
    def agent_listener(self) -> int:
        """The agent's DICOM listener (the hospital's way out)."""
        assert self.agent is not None
        return self.agent.listener_port

    # ---- 2. studies ----
    def step_generate(self) -> str:
        self.study = generate_study(self.layout.data("pacs") / "study", self.instances, rows=ROWS, cols=COLS)
        self.modality_study = generate_study(self.layout.data("modality"), MODALITY_INSTANCES,
                                             rows=ROWS, cols=COLS, seed=1)
        self.wan_studies = {path: generate_study(self.layout.data(f"wan-{path}"), WAN_INSTANCES, rows=ROWS,
                                                 cols=COLS, seed=seed)
                            for seed, path in enumerate(("direct", "passthrough", "spool"), start=2)}
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
                             {CLOUD_STORE_AE: (LOOPBACK, self.agent_listener)})
        self.pacs.start()
        if self.pacs.instance_count != self.instances:
            raise StepFailed(f"the PACS indexed {self.pacs.instance_count} of {self.instances} instances")
        self.console.detail(f"hospital PACS  {PACS_AE:<12} {LOOPBACK}:{lay.pacs}  (move destination "
                            f"{CLOUD_STORE_AE} = the agent, {LOOPBACK}:{self.agent_listener})")
        self.console.detail(f"cloud store    {CLOUD_STORE_AE:<12} {LOOPBACK}:{lay.store}")
        return f"PACS :{lay.pacs}, store :{lay.store}"

    # ---- 4. relay and agent ----
    def step_tunnel(self) -> str:
        relay, agent = self.relay, self.agent
        assert relay is not None and agent is not None
        verbose = ["-v"] if self.console.verbose else []
        with failing_step():
            start_relay(self.procs, relay, args=verbose, timeout=CONNECT_TIMEOUT_S)
            assert relay.proc is not None
            self.console.detail(f"relay  pid {relay.proc.pid}: tunnel {relay.url}, DICOM {LOOPBACK}:{relay.dicom_port}")
            # The one-line join: `site add` on the relay prints a token, `enroll` on the agent redeems it.
            enroll_agent(relay, agent, procs=self.procs)
            self.console.detail(f"$ tunnel-relay site add {SITE}, then tunnel-agent enroll: token redeemed")
            started = time.monotonic()
            start_agent(self.procs, agent, relay, wait_listener=True, args=verbose, name="agent",
                        timeout=CONNECT_TIMEOUT_S)
        assert agent.proc is not None
        self.console.detail(f"agent  pid {agent.proc.pid}: DICOM listener {LOOPBACK}:{agent.listener_port}, "
                            f"status http://{LOOPBACK}:{agent.status_port}")
        self.console.debug(f"logs: {relay.proc.log_path}, {agent.proc.log_path}")
        self.console.detail(f"tunnel up: agent -> relay mutual-TLS WebSocket connected in "
                            f"{_seconds(time.monotonic() - started)}")
        return "enrolled with a one-line token; connected"

    # ---- 5. C-ECHO ----
    def step_echo(self) -> str:
        ae = self._scu(CLOUD_SCU_AE, sc.Verification)
        started = time.monotonic()
        with associated(ae, self.relay_dicom, RELAY_CALLED_AE) as assoc:
            set_up = time.monotonic() - started
            echo_started = time.monotonic()
            code = _status_code(assoc.send_c_echo(), "C-ECHO")
            round_trip = time.monotonic() - echo_started
        if code != _SUCCESS:
            raise StepFailed(f"C-ECHO status 0x{code:04X}")
        self.console.detail(f"{CLOUD_SCU_AE} -> relay :{self.relay_dicom} ({RELAY_CALLED_AE}) "
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
        with associated(ae, self.relay_dicom, RELAY_CALLED_AE) as assoc:
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
        with associated(ae, self.relay_dicom, RELAY_CALLED_AE) as assoc:
            final = self._move(assoc, identifier)
        elapsed = time.monotonic() - started
        completed, failed, warning = (int(final.get(f"NumberOf{k}Suboperations", 0) or 0)
                                      for k in ("Completed", "Failed", "Warning"))
        self.console.detail(f"path: {PACS_AE} -> agent :{self.agent_listener} -> tunnel -> relay -> "
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

    def _verify_arrival(self, study: StudyInfo, *, quiet: bool = False) -> None:
        """Every instance of ``study`` is at the cloud store SCP, with the same pixel data."""
        assert self.store is not None
        expected = dict(zip(study.sop_instance_uids, study.files, strict=True))

        def arrived() -> dict[str, Path]:
            return {p.stem: p for p in self.store.received if p.stem in expected}

        with contextlib.suppress(WaitTimeout):  # what did arrive is counted below
            wait_until(lambda: len(arrived()) == len(expected), ARRIVAL_TIMEOUT_S, interval=POLL_INTERVAL_S)
        received = arrived()
        if len(received) != len(expected):
            raise StepFailed(f"only {len(received)} of {len(expected)} instances arrived at {CLOUD_STORE_AE}")
        differing = sum(1 for uid, src in expected.items()
                        if dcmread(received[uid]).PixelData != dcmread(src).PixelData)
        if differing:
            raise StepFailed(f"{differing} instance(s) arrived with different pixel data")
        if not quiet:
            self.console.detail(f"verified at {CLOUD_STORE_AE}: all {len(expected)} instances arrived, "
                                "pixel data identical")

    # ---- 8. C-STORE from a modality ----
    def step_store(self) -> str:
        assert self.modality_study is not None
        ae = self._scu(MODALITY_AE, sc.CTImageStorage)
        started = time.monotonic()
        with associated(ae, self.agent_listener, CLOUD_STORE_AE) as assoc:
            for path in self.modality_study.files:
                code = _status_code(assoc.send_c_store(path), "C-STORE")
                if code != _SUCCESS:
                    raise StepFailed(f"C-STORE status 0x{code:04X}")
        elapsed = time.monotonic() - started
        count = len(self.modality_study.files)
        self.console.detail(f"{MODALITY_AE} -> agent :{self.agent_listener} ({CLOUD_STORE_AE}) "
                            f"-> tunnel -> relay -> {CLOUD_STORE_AE} :{self.layout.store}")
        self.console.detail(f"{count} instances stored, status 0x0000 each, in {_seconds(elapsed)}")
        self._verify_arrival(self.modality_study)
        return f"{count} instances"

    # ---- 9. spool mode over an emulated WAN ----
    def step_wan(self) -> str:
        relay, lay = self.relay, self.layout
        assert relay is not None
        tunnel_proxy = self._wan_proxy("wanproxy-tunnel", relay.tunnel_port)  # hospital-b's link to the relay
        direct_proxy = self._wan_proxy("wanproxy-direct", lay.store)  # the same link, straight to the cloud
        root = lay.root / "agent-wan"
        agent = make_agent(relay, WAN_SITE, root, routes=[], relay_url=f"wss://{LOOPBACK}:{tunnel_proxy}/tunnel",
                           extra=[f'state_dir = "{root / "state"}"'], procs=self.procs,
                           sections=["[[destinations]]", 'name = "cloud-spool"', f'called_ae = "{SPOOL_AE}"',
                                     'mode = "spool"'])
        with failing_step():
            start_agent(self.procs, agent, relay, wait_listener=True, name="agent-wan", timeout=CONNECT_TIMEOUT_S)
        self.console.detail(f"site {WAN_SITE}: its agent reaches the relay through an emulated WAN "
                            f"({WAN_RTT_MS} ms RTT, {WAN_RATE_MBIT:.0f} Mbit/s); the direct path crosses the same link")
        rows = [("direct (no tunnel)", direct_proxy, CLOUD_STORE_AE, "direct"),
                ("tunnel, passthrough", agent.listener_port, CLOUD_STORE_AE, "passthrough"),
                (f"tunnel, spool ({SPOOL_AE})", agent.listener_port, SPOOL_AE, "spool")]
        times = {}
        for label, port, called, key in rows:
            done, at_cloud = self._timed_store(self.wan_studies[key], port, called)
            times[key] = at_cloud
            self.console.detail(f"{label:<28} modality done in {_seconds(done):>7}, cloud holds all "
                                f"{WAN_INSTANCES} after {_seconds(at_cloud):>7}")
        gain = times["direct"] / times["spool"]
        self.console.detail(f"spool mode: the modality is answered at LAN speed from the agent's disk, and the "
                            f"cloud has the study {gain:.1f}x sooner than direct")
        return f"cloud holds all {gain:.1f}x sooner than direct"

    def _wan_proxy(self, name: str, target_port: int) -> int:
        port, = free_ports(1)
        proc = self.procs.spawn([sys.executable, "-m", "tunnel_bench.wanproxy", "--listen-port", str(port),
                                 "--target-port", str(target_port), "--delay-ms", str(WAN_RTT_MS / 2),
                                 "--rate-mbit", str(WAN_RATE_MBIT)], name=name, cwd=CHECKOUT)
        with failing_step():
            wait_for_port(LOOPBACK, port, CONNECT_TIMEOUT_S, proc=proc)
        return port

    def _timed_store(self, study: StudyInfo, port: int, called_ae: str) -> tuple[float, float]:
        """(seconds until the modality had every C-STORE-RSP, seconds until the store SCP held them all)."""
        ae = self._scu(MODALITY_AE, sc.CTImageStorage)
        started = time.monotonic()
        with associated(ae, port, called_ae) as assoc:
            for path in study.files:
                code = _status_code(assoc.send_c_store(path), "C-STORE")
                if code != _SUCCESS:
                    raise StepFailed(f"C-STORE to {called_ae} status 0x{code:04X}")
        done = time.monotonic() - started
        assert self.store is not None
        wanted = set(study.sop_instance_uids)
        with contextlib.suppress(WaitTimeout):  # _verify_arrival says what is missing
            wait_until(lambda: wanted <= {p.stem for p in self.store.received}, ARRIVAL_TIMEOUT_S,
                       interval=0.01)
        at_cloud = time.monotonic() - started
        self._verify_arrival(study, quiet=True)
        return done, at_cloud

    # ---- 10. tunnel-agent status ----
    def step_fleet(self) -> str:
        def echo(port: int, called_ae: str) -> float:
            ae = self._scu(CLOUD_SCU_AE, sc.Verification)
            with associated(ae, port, called_ae) as assoc:
                started = time.monotonic()
                code = _status_code(assoc.send_c_echo(), "C-ECHO")
                round_trip = time.monotonic() - started
            if code != _SUCCESS:
                raise StepFailed(f"C-ECHO through relay-b: status 0x{code:04X}")
            return round_trip

        with failing_step():
            return FleetStep(self.procs, self._cleanup, self.layout.root / "fleet", self.layout.pacs, PACS_AE,
                             CLOUD_SCU_AE, echo, self.console.detail).run()

    def step_status(self) -> str:
        assert self.agent is not None
        config = self.agent.config
        argv = [*program("tunnel-agent", "tunnel_agent.cli"), "status", "--config", str(config)]
        with failing_step():
            done = self.procs.run(argv, name="tunnel-agent status", timeout=CLI_TIMEOUT_S)
        status, output = done.returncode, done.stdout + done.stderr
        self.console.detail(f"$ tunnel-agent status --config {config.name}")
        self.console.detail(output.rstrip())
        if status != 0:
            raise StepFailed(f"tunnel-agent status exited with status {status} (0 means connected)")
        return "connected"


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
    layout = Layout(root, *free_ports(2))
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
