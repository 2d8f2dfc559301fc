"""The OCI image of the product (deploy/image, docs/packaging.md): a Debian bookworm minbase root made with
debootstrap, the product's wheel and its dependency wheels installed into /opt/dicom-tunnel/venv inside it
(chroot), user 10001, committed with buildah from scratch. No RUN step and no base image from a registry:
the image is made from Debian's archive and PyPI, and builds where no image registry is reachable.

Theory of operation, in order (each step a command with a timeout, argv lists only):

1. ``base_rootfs(cache)``: ``debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates``
   into ``cache/bookworm-minbase-<UTC date>`` (a directory per day: reruns the same day reuse it, the next
   day starts fresh and picks up security updates). A half-made one (no ``.complete`` marker) is removed.
2. ``wheels(out)``: ``pip wheel --no-deps`` of this checkout, then ``pip download --only-binary=:all:`` of
   what it depends on (with the ``fast`` extra, uvloop), for CPython 3.11 on x86-64 Linux, which is
   bookworm's python3.
3. ``image_rootfs``: a copy of the base; in it (chroot) ``python3 -m venv /opt/dicom-tunnel/venv`` and
   ``pip install --no-index`` from the wheels; user and group ``tunnel`` 10001; ``/var/lib/tunnel-relay``,
   ``/var/lib/tunnel-agent`` (0700, 10001) and ``/etc/tunnel-relay``, ``/etc/tunnel-agent``; apt lists,
   caches and docs removed.
4. ``commit``: ``buildah from scratch``, the root copied in with its owners and modes (through
   ``buildah mount``: ``buildah copy`` would make every file root's), ``buildah config`` (user 10001, entry
   point tunnel-relay, ``serve --config /etc/tunnel-relay/relay.toml``, ports, labels), ``buildah commit``.

``python -m devkit.image build [--tag T] [--cache DIR] [--work DIR]`` does all of it (root needed:
debootstrap, chroot, buildah's storage). The agent runs from the same image with
``--entrypoint /opt/dicom-tunnel/venv/bin/tunnel-agent``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from devkit.errors import CommandFailed

__all__ = ["IMAGE", "VENV", "base_rootfs", "build_image", "commit", "image_rootfs", "wheels"]

ROOT = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv", "ca-certificates")
VERSION = "0.1.0"
IMAGE = f"localhost/dicom-tunnel:{VERSION}"
VENV = "/opt/dicom-tunnel/venv"
UID = 10001
DEFAULT_CACHE = Path("/var/cache/dicom-tunnel-image")
DEBOOTSTRAP_TIMEOUT = 1200.0
PIP_TIMEOUT = 600.0
STEP_TIMEOUT = 300.0
PRUNE = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info")


def _run(argv: Sequence[str | os.PathLike[str]], timeout: float = STEP_TIMEOUT) -> str:
    done = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CommandFailed(f"{[os.fspath(a) for a in argv]!r} failed ({done.returncode}):\n"
                            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def base_rootfs(cache: Path = DEFAULT_CACHE) -> Path:
    """Today's debootstrapped minbase root under ``cache`` (made if missing). Root only."""
    today = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    target = cache / f"{SUITE}-minbase-{today}"
    if (target / ".complete").exists():
        return target
    if target.exists():
        shutil.rmtree(target)
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, target, MIRROR],
         timeout=DEBOOTSTRAP_TIMEOUT)
    (target / ".complete").write_text(today + "\n")
    return target


def wheels(out: Path) -> list[Path]:
    """The product's wheel (from this checkout) and every dependency's, for bookworm's CPython 3.11."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--wheel-dir", out, ROOT], timeout=PIP_TIMEOUT)
    product, = out.glob("dicom_tunnel-*.whl")
    _run([*pip, "download", "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
          "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--dest", out, f"dicom-tunnel[fast] @ {product.as_uri()}"],
         timeout=PIP_TIMEOUT)
    return sorted(out.glob("*.whl"))


def _chroot(root: Path, *argv: str, timeout: float = STEP_TIMEOUT) -> str:
    env_argv = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", *argv]
    return _run(["chroot", root, *env_argv], timeout=timeout)


def _add_user(root: Path) -> None:
    with open(root / "etc/passwd", "a", encoding="utf-8") as passwd:
        passwd.write(f"tunnel:x:{UID}:{UID}:DICOM tunnel:/var/lib/tunnel-relay:/usr/sbin/nologin\n")
    with open(root / "etc/group", "a", encoding="utf-8") as group:
        group.write(f"tunnel:x:{UID}:\n")
    for state in ("var/lib/tunnel-relay", "var/lib/tunnel-agent"):
        (root / state).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(root / state, UID, UID)
        (root / state).chmod(0o700)
    for config in ("etc/tunnel-relay", "etc/tunnel-agent"):
        (root / config).mkdir(mode=0o755, exist_ok=True)


def image_rootfs(base: Path, wheel_dir: Path, work: Path) -> Path:
    """A copy of ``base`` with the product installed in VENV and user 10001: the image's root."""
    root = work / "rootfs"
    if root.exists():
        shutil.rmtree(root)
    _run(["cp", "-a", base, root])
    (root / ".complete").unlink(missing_ok=True)
    staged = root / "tmp/wheels"
    shutil.copytree(wheel_dir, staged)
    _chroot(root, "python3", "-m", "venv", VENV)
    _chroot(root, f"{VENV}/bin/pip", "--disable-pip-version-check", "install", "--no-index", "--no-compile",
            "--find-links", "/tmp/wheels", "dicom-tunnel[fast]", timeout=PIP_TIMEOUT)
    _chroot(root, f"{VENV}/bin/python", "-m", "compileall", "-q", f"{VENV}/lib")  # a read-only root writes no .pyc
    shutil.rmtree(staged)
    _add_user(root)
    for path in PRUNE:
        for child in (root / path).glob("*"):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    return root


def commit(root: Path, tag: str = IMAGE) -> str:
    """Commit ``root`` as image ``tag`` (buildah from scratch, no RUN); returns the image id."""
    container = _run(["buildah", "from", "scratch"]).strip()
    try:
        mount = Path(_run(["buildah", "mount", container]).strip())
        _run(["cp", "-a", f"{root}/.", mount])
        _run(["buildah", "umount", container])
        _run(["buildah", "config", f"--user={UID}:{UID}", f"--entrypoint=[\"{VENV}/bin/tunnel-relay\"]",
              "--cmd=[\"serve\", \"--config\", \"/etc/tunnel-relay/relay.toml\"]",
              f"--env=PATH={VENV}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--env=LANG=C.UTF-8",
              "--env=PYTHONDONTWRITEBYTECODE=1", "--workingdir=/", "--stop-signal=SIGTERM",
              "--port=8443/tcp", "--port=11112/tcp", "--port=8081/tcp",
              f"--label=org.opencontainers.image.version={VERSION}",
              "--label=org.opencontainers.image.title=dicom-tunnel",
              f"--label=org.opencontainers.image.base.name=debian:{SUITE} (debootstrap minbase)", container])
        return _run(["buildah", "commit", "--rm", container, tag], timeout=PIP_TIMEOUT).strip().splitlines()[-1]
    except BaseException:
        subprocess.run(["buildah", "rm", container], capture_output=True, timeout=STEP_TIMEOUT)
        raise


def build_image(work: Path, *, tag: str = IMAGE, cache: Path = DEFAULT_CACHE) -> str:
    """Every step: the base root (cached per day), the wheels, the image's root, the commit. The image id."""
    base = base_rootfs(cache)
    wheel_dir = work / "wheels"
    if wheel_dir.exists():
        shutil.rmtree(wheel_dir)
    wheels(wheel_dir)
    root = image_rootfs(base, wheel_dir, work)
    try:
        return commit(root, tag)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.image", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the image (root)")
    build.add_argument("--tag", default=IMAGE)
    build.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where debootstrapped roots are kept")
    build.add_argument("--work", type=Path, default=ROOT / "build" / "image")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    print(build_image(args.work, tag=args.tag, cache=args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
