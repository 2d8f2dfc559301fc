"""One WireGuard interface, driven with ``ip`` and ``wg`` (the package's only subprocess use).

Theory of operation
- ``WireGuardInterface`` runs argv lists with a timeout on every call and no shell. ``up`` tries the
  kernel (``ip link add <if> type wireguard``) and otherwise runs ``wireguard-go`` in the foreground
  (WG_PROCESS_FOREGROUND=1) as our own child: we hold its PID through the ``Popen`` object (no PID-reuse
  race, no pidfile), see it exit, and end it with SIGTERM, after which it deletes its TUN device and its
  UAPI socket itself. A daemonized wireguard-go would be found again only through its socket; the
  socket's peer credentials name the parent that created it and then exited, so the daemon could not be
  signalled by PID reliably.
- Crash recovery (``recover_stale``) needs no PID: deleting ``/var/run/wireguard/<if>.sock`` makes a
  surviving wireguard-go exit (it watches the file with inotify; wg-quick uses the same contract on the
  BSDs), and a kernel or TUN link of that name is then deleted. A link of another kind is never touched.
- The UAPI socket directory is shared by every network namespace, so userspace interface names must be
  unique on the host, not only inside one namespace.

The methods block (subprocess); call them from asyncio through ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Literal

from tunnel_wireguard.dump import WgDump, parse_dump, parse_port
from tunnel_wireguard.errors import WireGuardCommandError, WireGuardError
from tunnel_wireguard.keys import load_private_key, validate_key

UAPI_DIR = Path("/var/run/wireguard")
COMMAND_TIMEOUT = 10.0
START_TIMEOUT = 10.0
STOP_GRACE = 5.0
POLL_INTERVAL = 0.02
LINK_POLL_INTERVAL = 0.1  # each poll runs `ip link show`
STDERR_CHARS = 300
COMMANDS_KEPT = 1000
# Linux IFNAMSIZ is 16 with the NUL; the characters are the ones wg-quick accepts, and no leading "-"
# (wireguard-go would read "-h" as an interface name and create it).
_IFNAME = re.compile(r"[A-Za-z0-9_=+.][A-Za-z0-9_=+.-]{0,14}")

Implementation = Literal["kernel", "userspace"]


def guard_table_name(interface: str) -> str:
    """The nftables table guarding ``interface`` (``replies_only``): a name nft accepts, unique per interface."""
    return "dtunnel_guard_" + re.sub(r"[^A-Za-z0-9_]", lambda m: f"x{ord(m.group()):02x}", interface)


def validate_interface_name(name: str) -> str:
    """Return ``name`` if it is a usable interface name (1-15 of [A-Za-z0-9_=+.-], no leading '-')."""
    if not isinstance(name, str) or not _IFNAME.fullmatch(name):
        raise ValueError(f"bad interface name {name!r}: 1-15 characters of A-Z a-z 0-9 _ = + . -, not starting with -")
    return name


class WireGuardInterface:
    """One WireGuard interface, in the current or a named network namespace.

    Call ``up(...)``, then ``set_peer``/``remove_peer``/``dump`` as needed, and ``down()`` at the end
    (also usable as a context manager). Every command failure raises WireGuardCommandError.
    ``commands`` records every argv this object ran, for audit and tests.
    """

    def __init__(
        self,
        *,
        netns: str | None = None,
        implementation: Literal["auto", "kernel", "userspace"] = "auto",
        command_timeout: float = COMMAND_TIMEOUT,
        start_timeout: float = START_TIMEOUT,
        uapi_dir: Path = UAPI_DIR,
    ) -> None:
        if implementation not in ("auto", "kernel", "userspace"):
            raise ValueError(f"implementation must be auto, kernel or userspace, not {implementation!r}")
        self.netns = netns
        self.requested = implementation
        self.command_timeout = command_timeout
        self.start_timeout = start_timeout
        self.uapi_dir = Path(uapi_dir)
        self.name: str | None = None
        self.implementation: Implementation | None = None
        self.kernel_error: str | None = None  # why the kernel path was not taken (auto mode)
        # The newest argv this object ran (bounded: an agent calls dump() for as long as it runs).
        self.commands: deque[tuple[str, ...]] = deque(maxlen=COMMANDS_KEPT)
        self._child: subprocess.Popen[bytes] | None = None
        self._child_log: IO[bytes] | None = None

    def __enter__(self) -> WireGuardInterface:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # -- public surface ----------------------------------------------------------------------------

    @property
    def wireguard_go_pid(self) -> int | None:
        """PID of our wireguard-go child while it runs (userspace only), else None."""
        if self._child is not None and self._child.poll() is None:
            return self._child.pid
        return None

    def up(
        self,
        name: str,
        private_key_path: str | os.PathLike[str],
        address_cidr: str,
        listen_port: int | None = None,
        *,
        mtu: int | None = None,
        recover: bool = True,
        replies_only: bool = False,
        no_forward: bool = False,
    ) -> None:
        """Create interface ``name``, load the key from its file, add ``address_cidr`` and bring it up.

        With ``recover`` (default) a stale interface or socket of that name is removed first.
        ``replies_only`` (the agent): an nftables table accepts on this interface only packets of
        connections this host opened, and forwards nothing from it, so the peer cannot reach any local
        service or the network behind the host through the tunnel. ``no_forward`` (the relay): nothing that
        arrives on this interface is forwarded, so one peer can never reach another through this host,
        whatever the host's ``ip_forward``. Both need ``nft``.
        On failure everything created so far is removed again before the error propagates.
        """
        if self.name is not None:
            raise WireGuardError(f"interface {self.name} is already up; call down() first")
        validate_interface_name(name)
        address = str(ipaddress.ip_interface(address_cidr))
        key_path = os.fspath(Path(private_key_path).resolve())
        load_private_key(key_path)  # fail early, with a clear message, on a bad or world-readable file
        if listen_port is not None and not 0 <= int(listen_port) <= 65535:
            raise ValueError("listen_port must be 0..65535")
        if recover:
            self.recover_stale(name)
        self._create(name)
        try:
            if replies_only or no_forward:
                self._guard(name, replies_only=replies_only)
            self._configure(key_path, address, listen_port, mtu)
        except BaseException as exc:
            try:
                self.down()
            except WireGuardError as cleanup:
                exc.add_note(f"removing the half-made interface failed too: {cleanup}")
            raise

    def down(self) -> None:
        """Remove the interface and end our wireguard-go. Idempotent; safe after a failed up()."""
        name, implementation = self.name, self.implementation
        self.name = self.implementation = None
        if name is None:
            return
        try:
            if implementation == "userspace":
                self._stop_child()
                self._unlink_socket(name)
            if self._link_kind(name) is not None:
                self._run(["ip", "link", "delete", "dev", name])
            self._unguard(name)
        finally:
            self._close_child_log()

    def recover_stale(self, name: str) -> bool:
        """Remove what a crashed run left under ``name``: its UAPI socket and a WireGuard/TUN link.

        Deleting the socket makes a surviving wireguard-go exit and remove its TUN device; whatever
        link of a WireGuard kind remains is then deleted. A link of any other kind raises WireGuardError
        and is left alone. Returns True if anything was removed.
        """
        validate_interface_name(name)
        if name == self.name:
            raise WireGuardError(f"interface {name} is ours and up; call down() instead")
        removed = self._unguard(name)
        removed = self._unlink_socket(name) or removed
        if removed:
            # wireguard-go notices the deletion and exits, taking its TUN device with it.
            self._wait(lambda: self._link_kind(name) is None, self.start_timeout, interval=LINK_POLL_INTERVAL)
        kind = self._link_kind(name)
        if kind is None:
            return removed
        if kind not in ("wireguard", "tun"):
            raise WireGuardError(f"interface {name} exists and is of kind {kind!r}, not WireGuard; not deleting it")
        self._run(["ip", "link", "delete", "dev", name])
        return True

    def set_peer(
        self,
        public_key: str,
        *,
        allowed_ips: Sequence[str],
        endpoint: str | None = None,
        persistent_keepalive: int | None = None,
        preshared_key_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Add or update a peer; ``allowed_ips`` replaces its list. ``endpoint`` is ``host:port``."""
        name = self._require_up()
        argv = ["wg", "set", name, "peer", validate_key(public_key)]
        if preshared_key_path is not None:
            argv += ["preshared-key", os.fspath(Path(preshared_key_path).resolve())]
        nets = [str(ipaddress.ip_network(item, strict=False)) for item in allowed_ips]
        argv += ["allowed-ips", ",".join(nets)]
        if endpoint is not None:
            argv += ["endpoint", _endpoint_argument(endpoint)]
        if persistent_keepalive is not None:
            if not 0 <= int(persistent_keepalive) <= 65535:
                raise ValueError("persistent_keepalive must be 0..65535 seconds")
            argv += ["persistent-keepalive", str(int(persistent_keepalive)) if persistent_keepalive else "off"]
        self._run(argv)

    def remove_peer(self, public_key: str) -> None:
        """Remove a peer; its packets are dropped from this moment on."""
        self._run(["wg", "set", self._require_up(), "peer", validate_key(public_key), "remove"])

    def dump(self) -> WgDump:
        """The interface's state from ``wg show <if> dump`` (private and preshared keys dropped)."""
        return parse_dump(self._run(["wg", "show", self._require_up(), "dump"]))

    # -- internals ---------------------------------------------------------------------------------

    def _require_up(self) -> str:
        if self.name is None:
            raise WireGuardError("the interface is not up")
        return self.name

    def _create(self, name: str) -> None:
        if self.requested in ("auto", "kernel"):
            try:
                self._run(["ip", "link", "add", "dev", name, "type", "wireguard"])
            except WireGuardCommandError as exc:
                if self.requested == "kernel":
                    raise
                self.kernel_error = exc.detail
            else:
                self.name, self.implementation = name, "kernel"
                return
        self._start_wireguard_go(name)
        self.name, self.implementation = name, "userspace"

    def _configure(self, key_path: str, address: str, listen_port: int | None, mtu: int | None) -> None:
        name = self._require_up()
        argv = ["wg", "set", name, "private-key", key_path]
        if listen_port is not None:
            argv += ["listen-port", str(int(listen_port))]
        self._run(argv)
        if mtu is not None:
            self._run(["ip", "link", "set", "dev", name, "mtu", str(int(mtu))])
        self._run(["ip", "address", "add", address, "dev", name])
        self._run(["ip", "link", "set", "dev", name, "up"])

    def _start_wireguard_go(self, name: str) -> None:
        argv = self._full_argv(["wireguard-go", name])
        socket_path = self._socket_path(name)
        if socket_path.exists():  # its owner would answer our `wg set`; up(recover=True) removes it
            raise WireGuardError(f"{socket_path} exists: another wireguard-go serves {name}; recover_stale() first")
        self.commands.append(tuple(argv))
        self._child_log = tempfile.TemporaryFile(prefix="wireguard-go-")
        try:
            self._child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._child_log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "WG_PROCESS_FOREGROUND": "1"},
                start_new_session=True,  # a terminal's Ctrl-C reaches us, and we end it in order
            )
        except OSError as exc:
            self._close_child_log()
            raise WireGuardCommandError(argv, exc.strerror or str(exc)) from None
        child = self._child
        ready = self._wait(lambda: child.poll() is not None or socket_path.exists(), self.start_timeout)
        if child.poll() is not None or not ready:
            detail = "exited before its UAPI socket appeared" if child.poll() is not None else "no UAPI socket in time"
            log = self._child_log_tail()
            self._stop_child()
            self._close_child_log()
            raise WireGuardCommandError(argv, f"{detail}: {log}" if log else detail, child.returncode)

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is None or child.poll() is not None:
            return
        child.terminate()  # by our own Popen: the PID cannot have been reused
        try:
            child.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=STOP_GRACE)

    def _child_log_tail(self) -> str:
        if self._child_log is None:
            return ""
        self._child_log.seek(0)
        return _one_line(self._child_log.read().decode("utf-8", "replace"))

    def _close_child_log(self) -> None:
        log, self._child_log = self._child_log, None
        if log is not None:
            log.close()

    def _socket_path(self, name: str) -> Path:
        return self.uapi_dir / f"{name}.sock"

    def _unlink_socket(self, name: str) -> bool:
        try:
            self._socket_path(name).unlink()
        except FileNotFoundError:
            return False
        return True

    def _link_kind(self, name: str) -> str | None:
        """None if no link ``name`` exists (in our namespace); else its kind ("wireguard", "tun", "veth"...)."""
        links = json.loads(self._run(["ip", "-json", "-details", "link", "show"]) or "[]")
        for link in links:
            if link.get("ifname") == name:
                return str(link.get("linkinfo", {}).get("info_kind", "") or "unknown")
        return None

    def _full_argv(self, argv: Sequence[str]) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, *argv]

    # -- inbound guard (nftables) --------------------------------------------------------------------

    def _guard(self, name: str, *, replies_only: bool) -> None:
        table = guard_table_name(name)
        input_chain = (f"  chain input {{ type filter hook input priority -10; policy accept;\n"
                       f'    iifname "{name}" ct state established,related accept\n'
                       f'    iifname "{name}" counter drop\n  }}\n') if replies_only else ""
        # add+delete first: replaces a table left by a crash, in the same atomic transaction.
        script = (f"add table inet {table}\ndelete table inet {table}\n"
                  f"table inet {table} {{\n{input_chain}"
                  f"  chain forward {{ type filter hook forward priority -10; policy accept;\n"
                  f'    iifname "{name}" counter drop\n  }}\n}}\n')
        self._run(["nft", "-f", "-"], stdin=script.encode())

    def _unguard(self, name: str) -> bool:
        """Delete the guard table of ``name`` if it exists; True if it did."""
        table = guard_table_name(name)
        try:
            self._run(["nft", "list", "table", "inet", table])
        except WireGuardCommandError:
            return False  # no such table (or no nft at all: then there is nothing to remove either)
        self._run(["nft", "delete", "table", "inet", table])
        return True

    def _run(self, argv: Sequence[str], stdin: bytes | None = None) -> str:
        """Run ``argv`` (no shell, bounded time); return stdout or raise WireGuardCommandError."""
        full = self._full_argv(argv)
        self.commands.append(tuple(full))
        try:
            done = subprocess.run(
                full,
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=self.command_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise WireGuardCommandError(full, f"no answer within {self.command_timeout:g} s") from None
        except OSError as exc:
            detail = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
            raise WireGuardCommandError(full, detail) from None
        if done.returncode != 0:
            detail = _one_line(done.stderr.decode("utf-8", "replace")) or "no error output"
            raise WireGuardCommandError(full, detail, done.returncode)
        return done.stdout.decode("utf-8", "replace")

    @staticmethod
    def _wait(predicate: Callable[[], bool], timeout: float, interval: float = POLL_INTERVAL) -> bool:
        """Poll ``predicate`` until true or ``timeout`` s pass (bounded in count too); return its last value."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / interval) + 2):
            if predicate():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(interval, remaining))
        return bool(predicate())


def _endpoint_argument(endpoint: str) -> str:
    """Check ``host:port`` (a name or numeric host; IPv6 in brackets) well enough to pass it to wg."""
    text = str(endpoint)
    if not text or text.startswith("-") or any(ch.isspace() for ch in text):
        raise ValueError("an endpoint is host:port")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("an endpoint is host:port")
    parse_port(port)
    return text


def _one_line(text: str) -> str:
    """Whitespace collapsed to single spaces, at most STDERR_CHARS characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= STDERR_CHARS else flat[: STDERR_CHARS - 3] + "..."
