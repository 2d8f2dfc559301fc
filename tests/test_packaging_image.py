"""The OCI image (deploy/image/build.sh, devkit/image.py, docs/packaging.md), built for real and run for
real: debootstrap's bookworm minbase (cached per day under /var/cache/dicom-tunnel-image; CI starts fresh
and takes a few minutes), the product's wheels, buildah from scratch; then a relay container and an agent
container from it, read-only, as uid 10001, on the host's network (127.0.0.1 only), configs and state made
on the host by the dev kit and bind-mounted at the same paths, carry a C-ECHO from dcmtk to a storescp PACS.

podman runs without systemd here: ``--cgroup-manager=cgroupfs --events-backend=file``, runc (crun refuses
this machine's hybrid cgroups), and limits within the host's (rootful podman's defaults are above them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit import image
from tests.support import missing_prerequisite
from tests.support.dcmtk import echoscu, start_storescp
from tests.support.ports import free_port
from tests.support.procs import wait_for_port, wait_until
from tests.support.stack import AgentRoute, ListenerRoute, make_agent, make_relay

pytestmark = pytest.mark.slow

TAG = "localhost/dicom-tunnel:test"
PODMAN = ["podman", "--cgroup-manager=cgroupfs", "--events-backend=file", "--runtime=runc"]
RUN = ["run", "--rm", "--read-only", f"--user={image.UID}", "--network=host", "--ulimit=nofile=20000:20000",
       "--ulimit=nproc=4096:4096", "--tmpfs=/tmp"]
PROGRAMS = ("debootstrap", "buildah", "podman", "runc", "chroot")
BUILD_TIMEOUT = 1500.0
START_TIMEOUT = 60.0


def _podman(*argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *argv], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[str]:
    if os.geteuid() != 0:
        missing_prerequisite("building the image needs root (debootstrap, chroot, buildah's storage)")
    missing = [name for name in PROGRAMS if shutil.which(name) is None]
    if missing:
        missing_prerequisite(f"{', '.join(missing)} not installed (scripts/bootstrap.sh installs them)")
    image_id = image.build_image(tmp_path_factory.mktemp("image"), tag=TAG)
    try:
        yield image_id
    finally:
        _podman("rmi", "--force", TAG)


def test_the_image_runs_as_10001_with_the_product_and_nothing_writable(built):
    config = _podman("image", "inspect", TAG, "--format", "{{.Config.User}} {{json .Config.Entrypoint}}")
    assert config.stdout.split() == ["10001:10001", f'["{image.VENV}/bin/tunnel-relay"]']
    probe = ("id -u; stat -c '%u %a' /var/lib/tunnel-relay /var/lib/tunnel-agent; "
             f"{image.VENV}/bin/tunnel-agent --help >/dev/null && echo agent; touch /opt/x 2>/dev/null || echo ro")
    done = _podman(*RUN, "--entrypoint=/bin/sh", TAG, "-c", probe)
    assert done.stdout.split("\n")[:5] == ["10001", "10001 700", "10001 700", "agent", "ro"], done.stderr


def _container(procs, name: str, mounts: list[Path], argv: list[str], entrypoint: str | None = None):
    volumes = [f"--volume={path}:{path}" for path in mounts]
    extra = [f"--entrypoint={entrypoint}"] if entrypoint else []
    return procs.spawn([*PODMAN, *RUN, f"--name={name}", *volumes, *extra, TAG, *argv], name=name)


@pytest.fixture
def containers(procs) -> Iterator[list[str]]:
    names: list[str] = []
    try:
        yield names
    finally:  # the podman clients are ended by PID (procs); a container they leave behind is removed here
        for process in reversed(procs.processes):
            procs.stop(process)
        for name in names:
            _podman("rm", "--force", "--ignore", "--time=5", name)


def test_a_c_echo_crosses_a_relay_and_an_agent_running_from_the_image(built, procs, containers, tmp_path):
    pacs = free_port()
    start_storescp(procs, pacs, "PACS", tmp_path / "pacs")
    relay = make_relay(tmp_path / "relay", listener_routes=[ListenerRoute("SM_PACS", "st-marys", "pacs")],
                       sites={"st-marys": []})
    agent = make_agent(relay, "st-marys", tmp_path / "agent", routes=[AgentRoute("pacs", pacs)], heartbeat=1.0)
    for root in (relay.root, agent.root):  # made here as root; the containers run as 10001
        subprocess.run(["chown", "-R", f"{image.UID}:{image.UID}", str(root)], check=True, timeout=60)
    tag = f"{os.getpid()}-{free_port()}"
    containers += [f"relay-{tag}", f"agent-{tag}"]
    relay.proc = _container(procs, f"relay-{tag}", [relay.root], ["serve", "--config", str(relay.config)])
    wait_for_port("127.0.0.1", relay.dicom_port, START_TIMEOUT, proc=relay.proc)
    agent.proc = _container(procs, f"agent-{tag}", [agent.root], ["run", "--config", str(agent.config)],
                            entrypoint=f"{image.VENV}/bin/tunnel-agent")
    wait_until(lambda: relay.site_connected("st-marys"), START_TIMEOUT, message="the agent container connected",
               watch=[relay.proc, agent.proc])
    result = echoscu("127.0.0.1", relay.dicom_port, "SM_PACS", "CLOUDAI")
    assert result.ok, result
    assert (relay.state_dir / "admin.token").stat().st_uid == image.UID  # written by the relay in its container
