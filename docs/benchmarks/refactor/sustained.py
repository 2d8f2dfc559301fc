"""Sustained-load A/B for issue 11 (docs/benchmarks/REFACTOR.md).

Relay and agent as processes (the tests' stack, which both compared commits have), two `storescp --fork
--ignore` sinks, eight storescu loops sending a 100-instance CT study cloud->site (`c2s`) or site->cloud
(`s2c`). Prints the MB/s of completed studies in a SECONDS window after a 3 s warm-up. Run from the root
of a checkout:

    python docs/benchmarks/refactor/sustained.py OUT_PREFIX SECONDS c2s|s2c

With NOSPY unset, py-spy (on PATH) records raw profiles of the relay and the agent during the window into
OUT_PREFIX.relay.txt and OUT_PREFIX.agent.txt.
"""

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

from tests.support.dcmtk import require_binary, start_storescp  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.procs import ProcessTracker  # noqa: E402
from tests.support.stack import (  # noqa: E402
    AgentRoute,
    ListenerRoute,
    SiteDest,
    make_agent,
    make_relay,
    start_agent,
    start_relay,
)
from tunnel_demo.dataset import generate_study  # noqa: E402

WARM_UP = 3.0
SENDERS = 8


def main(out: Path, seconds: float, direction: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="sustained-"))
    procs = ProcessTracker(root / "logs")
    try:
        pacs, cloud = free_port(), free_port()
        start_storescp(procs, pacs, "PACS", root / "pacs", ["--fork", "--ignore"])
        start_storescp(procs, cloud, "CLOUD", root / "cloud", ["--fork", "--ignore"])
        relay = make_relay(root / "relay", listener_routes=[ListenerRoute("HOSP_PACS", "hospital-a", "pacs")],
                           sites={"hospital-a": [SiteDest("CLOUD", cloud)]})
        agent = make_agent(relay, "hospital-a", root / "agent", routes=[AgentRoute("pacs", pacs)])
        start_relay(procs, relay)
        start_agent(procs, agent, relay)
        study = generate_study(root / "study", 100, rows=512, cols=512)
        size = sum(f.stat().st_size for f in study.files)
        port, called = (relay.dicom_port, "HOSP_PACS") if direction == "c2s" else (agent.listener_port, "CLOUD")
        stop = time.monotonic() + WARM_UP + seconds + 3
        done = [0]

        def send_until_stop() -> None:
            while time.monotonic() < stop:
                result = subprocess.run([require_binary("storescu"), "-aet", "CLOUDAI", "-aec", called, "127.0.0.1",
                                         str(port), *map(str, study.files)], env={**os.environ, "TCP_NODELAY": "1"},
                                        capture_output=True, timeout=120)
                if result.returncode == 0:
                    done[0] += size

        senders = [threading.Thread(target=send_until_stop) for _ in range(SENDERS)]
        for sender in senders:
            sender.start()
        time.sleep(WARM_UP)
        start, before = time.monotonic(), done[0]
        spies = [] if os.environ.get("NOSPY") else [
            subprocess.Popen(["py-spy", "record", "--format", "raw", "-r", "200", "-d", str(int(seconds)),
                              "-p", str(proc.pid), "-o", f"{out}.{name}.txt"])
            for name, proc in (("relay", relay.proc), ("agent", agent.proc))]
        for spy in spies:
            spy.wait(seconds + 30)
        if not spies:
            time.sleep(seconds)
        moved, elapsed = done[0] - before, time.monotonic() - start
        for sender in senders:
            sender.join(180)
        print(f"{moved / 1e6 / elapsed:.0f} MB/s in the measured window ({direction}, {SENDERS} associations)")
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
