"""The demo, run as `make demo` runs it: `python -m tunnel_demo` from the checkout, as a subprocess, on its defaults.

What must hold: exit status 0; the summary lists every step as succeeded; nothing printed (or logged by
the relay and the agent) carries PHI — neither the canary patient name/ID nor any UID of the study;
every process the demo started (it lists their PIDs in `pids.txt`) is gone when it returns; without
`--keep` its temporary work directory is removed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from pydicom import dcmread

from tests.support import missing_prerequisite
from tests.support.procs import wait_until
from tunnel_demo.dataset import PHI_PATIENT_ID, PHI_PATIENT_NAME

ROOT = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, "-m", "tunnel_demo"]  # a development package: run from the checkout, not installed
DEMO_MAIN = ROOT / "tunnel_demo" / "__main__.py"
DEMO_TIMEOUT_S = 180
STOP_GRACE_S = 15
STEPS = 11
SUMMARY_ROW = re.compile(r"^\s+(\d+)\s{2}(.+?)\s{2,}(✔ ok|✘ FAILED|✘ interrupted|– not run)(?:\s|$)")


def run_demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the demo to completion; on timeout SIGTERM it (it then ends its own children), then SIGKILL."""
    if not DEMO_MAIN.exists():
        missing_prerequisite(f"{DEMO_MAIN} is missing: run the tests from a checkout of the repository")
    full_env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    proc = subprocess.Popen([*DEMO, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8", env=full_env, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=STOP_GRACE_S)
        pytest.fail(f"tunnel-demo did not finish within {DEMO_TIMEOUT_S} s\n{out}\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_GRACE_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def summary_rows(stdout: str) -> list[tuple[int, str, str]]:
    _, found, tail = stdout.partition("\nSummary\n")
    assert found, f"no summary in the output:\n{stdout}"
    return [(int(m[1]), m[2].strip(), m[3]) for line in tail.splitlines() if (m := SUMMARY_ROW.match(line))]


def recorded_pids(work_dir: Path) -> list[int]:
    lines = (work_dir / "pids.txt").read_text().splitlines()
    return [int(line.split()[0]) for line in lines if line.strip()]


def end_leftovers(pids: list[int], work_dir: Path) -> None:
    """Safety net: end, by PID, a listed process that is still alive AND runs on this demo's files."""
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if any(str(work_dir) in arg for arg in process.cmdline()):
                process.kill()
                process.wait(timeout=STOP_GRACE_S)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.TimeoutExpired):
            continue


def assert_all_ended(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def study_uids(pacs_dir: Path) -> set[str]:
    uids: set[str] = set()
    for path in pacs_dir.rglob("*.dcm"):
        ds = dcmread(path, stop_before_pixels=True)
        uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID}
    return uids


def test_demo_runs_every_step_without_phi_and_leaves_no_process(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    result = run_demo("--keep", str(work))
    pids = recorded_pids(work) if (work / "pids.txt").exists() else []
    try:
        shown = f"exit status {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        assert result.returncode == 0, shown
        rows = summary_rows(result.stdout)
        assert [n for n, _, _ in rows] == list(range(1, STEPS + 1)), shown
        assert all(state == "✔ ok" for _, _, state in rows), shown
        assert f"All {STEPS} steps succeeded" in result.stdout, shown

        printed = result.stdout + result.stderr
        logs = {p.name: p.read_text(errors="replace") for p in (work / "logs").glob("*.log")}
        assert {"relay.log", "agent.log", "agent-wan.log"} <= set(logs)
        secrets = {PHI_PATIENT_NAME, PHI_PATIENT_ID, "CANARY"} | study_uids(work / "data" / "pacs")
        secrets |= study_uids(work / "data" / "modality")
        for path in ("direct", "passthrough", "spool"):  # the WAN step's studies, spooled ones included
            secrets |= study_uids(work / "data" / f"wan-{path}")
        assert len(secrets) > 40 + 5  # the UIDs were found, so the check below means something
        for secret in secrets:
            assert secret not in printed, f"PHI/UID {secret!r} printed by tunnel-demo"
            for name, text in logs.items():
                assert secret not in text, f"PHI/UID {secret!r} in {name}"

        assert len(pids) >= 5  # 2 CLI runs, relay, agent, agent status
        assert_all_ended(pids)
    finally:
        end_leftovers(pids, work)


def test_demo_removes_its_temporary_directory(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = run_demo("--instances", "3", env={"TMPDIR": str(scratch)})
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert f"All {STEPS} steps succeeded" in result.stdout
    assert list(scratch.iterdir()) == []


def test_demo_refuses_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    for args in (["--instances", "0"], ["--keep", str(tmp_path / "busy")]):
        result = run_demo(*args)
        assert result.returncode == 2, result.stderr
        assert "tunnel-demo: error:" in result.stderr


def test_demo_failure_is_reported_and_ends_children(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    # The relay is pointed at a state directory without its CA: it exits at start-up.
    result = run_demo("--keep", str(work), "--instances", "2",
                      env={"TUNNEL_RELAY_STATE_DIR": str(tmp_path / "no-such-state")})
    pids = recorded_pids(work)
    try:
        assert result.returncode == 1, f"{result.stdout}\n{result.stderr}"
        rows = summary_rows(result.stdout)
        assert [state for _, _, state in rows] == ["✔ ok"] * 3 + ["✘ FAILED"] + ["– not run"] * (STEPS - 4)
        assert "relay exited" in result.stdout and "last lines of" in result.stdout
        assert "Demo FAILED - step 4" in result.stdout
        assert_all_ended(pids)
    finally:
        end_leftovers(pids, work)


def test_demo_sigterm_mid_transfer_ends_children(tmp_path: Path) -> None:
    if not DEMO_MAIN.exists():
        missing_prerequisite(f"{DEMO_MAIN} is missing: run the tests from a checkout of the repository")
    work, out_path = tmp_path / "demo", tmp_path / "demo.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([*DEMO, "--keep", str(work), "--instances", "400"], stdout=out, cwd=ROOT,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    pids: list[int] = []
    try:
        wait_until(lambda: f"[7/{STEPS}]" in out_path.read_text(errors="replace") or proc.poll() is not None,
                   DEMO_TIMEOUT_S, interval=0.05, message=lambda: f"the C-MOVE step\n{out_path.read_text()}")
        assert proc.poll() is None, out_path.read_text()
        pids = recorded_pids(work)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)  # the demo's own clean-up is bounded well below this
        output = out_path.read_text(encoding="utf-8")
        assert status == 130, output
        assert "✘ interrupted" in output and "stopped relay" in output and "stopped agent" in output
        assert_all_ended(pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_GRACE_S)
        end_leftovers(pids, work)
