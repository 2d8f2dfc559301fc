"""The agent's WireGuard registration: its key, the relay's answer, and the cache of that answer.

The agent sends its WireGuard public key to ``POST /enroll/v1/wireguard`` on the relay's TLS port
(``relay_url``'s host and port, mutual TLS with the site certificate, through ``[proxy]`` like enrollment):
:func:`register`. The relay answers with this site's tunnel address, its own public key and UDP endpoint,
and the tunnel URL; :func:`parse_registration` checks the answer field by field (pure). It is cached in
``state_dir/wireguard.json`` together with the relay URL and public key it belongs to
(:func:`save_registration`, :func:`load_registration`). The private key is made (0600) on first use
(:func:`ensure_key`) and never overwritten.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from tunnel_agent.config import AgentSettings
from tunnel_agent.connect import proxy_failure, target_of
from tunnel_agent.proxy import choose_proxy
from tunnel_link.tls import TlsConfigError, client_context
from tunnel_wireguard.errors import InvalidKeyError
from tunnel_wireguard.keys import generate_private_key, public_key_of, validate_key

__all__ = [
    "REGISTER_PATH",
    "REGISTRATION_FILE",
    "Registration",
    "WireGuardPathError",
    "load_registration",
    "parse_registration",
    "ensure_key",
    "register",
    "save_registration",
]

log = logging.getLogger("agent")

REGISTER_PATH = "/enroll/v1/wireguard"
REGISTRATION_FILE = "wireguard.json"
DEFAULT_KEEPALIVE = 25  # seconds; also what an answer without one, or with "off", gets
MAX_ANSWER = 64 * 1024  # bytes of the relay's registration answer we are willing to read


class WireGuardPathError(Exception):
    """The WireGuard path cannot be used now. One line for ops, without secrets.

    ``status`` is the relay's HTTP status when the relay refused (404: no WireGuard there, 403: the
    certificate was not accepted), else None.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# --- the relay's answer (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What the relay assigned this site: see ``POST /enroll/v1/wireguard`` in docs/protocol.md."""

    site: str
    address_cidr: str  # our tunnel address, e.g. 10.99.0.2/24
    relay_public_key: str
    relay_address: str  # e.g. 10.99.0.1; the only address reachable through the interface
    endpoint: str  # host:port of the relay's UDP socket
    tunnel_url: str  # ws://<relay_address>:<port>/tunnel
    persistent_keepalive: int

    @property
    def address(self) -> str:
        """Our tunnel address without the prefix length."""
        return str(ipaddress.ip_interface(self.address_cidr).ip)

    @property
    def tunnel_port(self) -> int:
        return urlsplit(self.tunnel_url).port or 80


def parse_registration(answer: object) -> Registration:
    """Check the relay's JSON answer field by field; raise WireGuardPathError naming the bad field."""
    if not isinstance(answer, dict):
        raise WireGuardPathError("the relay's WireGuard registration answer is not a JSON object")

    def text(name: str) -> str:
        value = answer.get(name)
        if not isinstance(value, str) or not value or len(value) > 512:
            raise WireGuardPathError(f"the relay's WireGuard registration answer lacks a valid {name!r}")
        return value

    def check(name: str, ok: Callable[[str], object]) -> str:
        value = text(name)
        try:
            ok(value)
        except ValueError:
            raise WireGuardPathError(f"the relay's WireGuard registration answer has a malformed {name!r}") from None
        return value

    address = check("address_cidr", _interface_with_prefix)
    relay_address = check("relay_address", ipaddress.ip_address)
    network = ipaddress.ip_interface(address).network
    if ipaddress.ip_address(relay_address) not in network or ipaddress.ip_interface(address).ip == ipaddress.ip_address(
        relay_address
    ):
        raise WireGuardPathError("the relay's WireGuard registration answer puts the relay outside our tunnel network")
    tunnel_url = check("tunnel_url", lambda url: _check_tunnel_url(url, relay_address))
    keepalive = answer.get("persistent_keepalive", DEFAULT_KEEPALIVE)
    if isinstance(keepalive, bool) or not isinstance(keepalive, int) or not 0 <= keepalive <= 65535:
        raise WireGuardPathError("the relay's WireGuard registration answer has a malformed 'persistent_keepalive'")
    return Registration(
        site=text("site"),
        address_cidr=str(ipaddress.ip_interface(address)),
        relay_public_key=check("relay_public_key", validate_key),
        relay_address=str(ipaddress.ip_address(relay_address)),
        endpoint=check("endpoint", _check_endpoint),
        tunnel_url=tunnel_url,
        # Never off: behind the hospital's stateful firewall, only our own packets keep the path open.
        persistent_keepalive=keepalive or DEFAULT_KEEPALIVE,
    )


def _interface_with_prefix(value: str) -> None:
    if "/" not in value:
        raise ValueError("no prefix length")
    ipaddress.ip_interface(value)


def _check_tunnel_url(url: str, relay_address: str) -> None:
    """ws:// to the relay's tunnel address only: anything else would not go through the interface."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.username or parts.password or parts.hostname is None:
        raise ValueError("not ws://host:port/path")
    parts.port  # noqa: B018 - raises ValueError for a bad port
    if ipaddress.ip_address(parts.hostname) != ipaddress.ip_address(relay_address):
        raise ValueError("not the relay's tunnel address")


def _check_endpoint(value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or value.startswith("-") or any(ch.isspace() for ch in value):
        raise ValueError("not host:port")
    if not (port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError("bad port")


# --- the cache ----------------------------------------------------------------------------------------


def load_registration(path: Path, *, relay_url: str, public_key: str) -> Registration | None:
    """The cached registration if it was made for this relay and this key, else None."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s (%s); registering again", path, type(exc).__name__)
        return None
    if not isinstance(data, dict) or data.get("relay_url") != relay_url or data.get("public_key") != public_key:
        return None
    try:
        return parse_registration(data.get("registration"))
    except WireGuardPathError:
        return None


def save_registration(path: Path, registration: Registration, *, relay_url: str, public_key: str) -> None:
    """Write the cache atomically (temporary file, then rename), mode 0600."""
    record = {"relay_url": relay_url, "public_key": public_key, "registration": asdict(registration),
              "written_at": time.time()}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- talking to the relay -----------------------------------------------------------------------------


def ensure_key(path: Path) -> str:
    """Our public key; the private key file is made (0600) on first use."""
    try:
        return public_key_of(path)
    except InvalidKeyError:
        if path.exists() or path.is_symlink():
            raise  # a bad or too-open key file is the operator's to fix, never overwritten
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        public = generate_private_key(path)
    except FileExistsError:  # made meanwhile by someone else: use theirs
        return public_key_of(path)
    log.info("made a new WireGuard key in %s", path)
    return public


async def register(settings: AgentSettings, public_key: str, deadline: float,
                   environ: Mapping[str, str]) -> Registration:
    """POST our public key to the relay (mutual TLS with the site certificate, through [proxy])."""
    s = settings
    parts = urlsplit(s.relay_url)
    url = urlunsplit(("https", parts.netloc, REGISTER_PATH, "", ""))
    try:
        ctx = client_context(s.cert_file, s.key_file, s.ca_file)
    except TlsConfigError as exc:
        raise WireGuardPathError(f"cannot register with the relay's WireGuard: {exc}") from None
    proxy = choose_proxy(s.proxy, s.relay_url, environ)
    via = proxy.request_kwargs() if proxy is not None else {}
    connector = aiohttp.TCPConnector(ssl=ctx, use_dns_cache=False, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout)
    try:
        async with (
            asyncio.timeout_at(deadline),
            aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as http,
            http.post(url, json={"public_key": public_key}, **via) as response,
        ):
            status, body = response.status, await _read_bounded(response)
    except (aiohttp.ClientError, TimeoutError) as exc:
        failure = proxy_failure(proxy, target_of(s.relay_url), exc, s.connect_timeout) if proxy else None
        where = f"cannot register with the relay's WireGuard at {url}"
        raise WireGuardPathError(str(failure) if failure else f"{where}: {_describe(exc)}") from None
    if status != 200:
        raise WireGuardPathError(_refusal(status, body), status=status)
    try:
        answer = json.loads(body)
    except ValueError:
        raise WireGuardPathError("the relay's WireGuard registration answer is not JSON") from None
    return parse_registration(answer)


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    if response.content_length is not None and response.content_length > MAX_ANSWER:
        raise WireGuardPathError(f"the relay's WireGuard registration answer is larger than {MAX_ANSWER} bytes")
    body = bytearray()
    async for chunk in response.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER:
            raise WireGuardPathError(f"the relay's WireGuard registration answer is larger than {MAX_ANSWER} bytes")
    return bytes(body)


def _refusal(status: int, body: bytes) -> str:
    try:
        error = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        error = ""
    detail = "".join(ch for ch in str(error) if 0x20 <= ord(ch) < 0x7F)[:200]
    detail = f": {detail}" if detail else ""
    if status == 404:
        return f"the relay does not offer WireGuard (404{detail})"
    if status == 403:
        return f"the relay refused this site's certificate for WireGuard (403{detail})"
    return f"the relay refused the WireGuard registration ({status}{detail})"


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
