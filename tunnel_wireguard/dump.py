"""The pure parser of ``wg show <if> dump``.

``parse_dump`` reads the tab-separated output and drops the private and preshared keys on the spot (only
"is one set" survives), so a dump can be logged or shown. Errors name the line and field, never the
line's text (it would carry a key).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from tunnel_wireguard.errors import DumpParseError
from tunnel_wireguard.keys import validate_key

NONE = "(none)"


@dataclass(frozen=True)
class WgEndpoint:
    """A peer's UDP endpoint as wg prints it: ``1.2.3.4:51820`` or ``[fd00::1]:51820``."""

    host: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class WgPeer:
    """One peer line of a dump, without its preshared key.

    latest_handshake: Unix seconds of the last completed handshake, None if there never was one.
    persistent_keepalive: seconds, None when off.
    """

    public_key: str
    has_preshared_key: bool
    endpoint: WgEndpoint | None
    allowed_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    latest_handshake: int | None
    transfer_rx: int
    transfer_tx: int
    persistent_keepalive: int | None

    def handshake_age(self, now: float) -> float | None:
        """Seconds since the latest handshake at wall-clock time ``now``; None if never."""
        if self.latest_handshake is None:
            return None
        return now - self.latest_handshake


@dataclass(frozen=True)
class WgDump:
    """An interface and its peers as ``wg show <if> dump`` reports them, without private key material."""

    public_key: str | None
    has_private_key: bool
    listen_port: int
    fwmark: int | None
    peers: tuple[WgPeer, ...]

    def peer(self, public_key: str) -> WgPeer | None:
        """The peer with this public key, or None."""
        for peer in self.peers:
            if peer.public_key == public_key:
                return peer
        return None


def parse_endpoint(text: str) -> WgEndpoint:
    """Parse ``host:port`` with a numeric IPv4 host or a bracketed IPv6 host (optionally ``%scope``)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("an IPv6 endpoint is written [address]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("an endpoint is address:port (IPv6 in brackets)")
    address = ipaddress.ip_address(host)  # ValueError if not numeric
    return WgEndpoint(address, parse_port(port))


def parse_port(text: str) -> int:
    """A port of 1-65535 written in decimal; ValueError otherwise."""
    if not _is_decimal(text) or not 0 < int(text) <= 65535:
        raise ValueError("a port is a number from 1 to 65535")
    return int(text)


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _uint(text: str) -> int:
    if not _is_decimal(text):
        raise ValueError("expected an unsigned decimal number")
    return int(text)


def _has_key(text: str) -> bool:
    """True when a key field holds a key, False for "(none)"; the key itself is not kept."""
    if text == NONE:
        return False
    validate_key(text)
    return True


def _listen_port(text: str) -> int:
    port = _uint(text)
    if port > 65535:
        raise ValueError("listen port out of range")
    return port


def _fwmark(text: str) -> int | None:
    if text == "off":
        return None
    mark = int(text, 0)  # wg prints 0x%x
    if not 0 < mark < 2**32:
        raise ValueError("fwmark out of range")
    return mark


def _allowed_ips(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if text == NONE:
        return ()
    return tuple(ipaddress.ip_network(item, strict=False) for item in text.split(","))


# Each field of the two line kinds, in order, with the function that reads it (ValueError if bad).
_INTERFACE_FIELDS: tuple[tuple[str, Callable[[str], object]], ...] = (
    ("private-key", _has_key),
    ("public-key", lambda v: None if v == NONE else validate_key(v)),
    ("listen-port", _listen_port),
    ("fwmark", _fwmark),
)
_PEER_FIELDS: tuple[tuple[str, Callable[[str], object]], ...] = (
    ("public-key", validate_key),
    ("preshared-key", _has_key),
    ("endpoint", lambda v: None if v == NONE else parse_endpoint(v)),
    ("allowed-ips", _allowed_ips),
    ("latest-handshake", _uint),
    ("transfer-rx", _uint),
    ("transfer-tx", _uint),
    ("persistent-keepalive", lambda v: None if v == "off" else _uint(v)),
)


def parse_dump(text: str) -> WgDump:
    """Parse the output of ``wg show <if> dump`` (one interface; not ``wg show all dump``).

    Line 1: private-key, public-key, listen-port, fwmark; then one line per peer: public-key,
    preshared-key, endpoint, allowed-ips, latest-handshake, transfer-rx, transfer-tx,
    persistent-keepalive; tab-separated. Raises DumpParseError naming the line and field, never
    quoting the text (it may hold a key).
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DumpParseError("empty dump: expected an interface line")
    has_private, public_key, listen_port, fwmark = _read_line(lines[0], 1, _INTERFACE_FIELDS)
    peers = []
    for number, line in enumerate(lines[1:], start=2):
        values = _read_line(line, number, _PEER_FIELDS)
        handshake = values[4]
        peers.append(WgPeer(*values[:4], handshake or None, *values[5:]))  # 0 means "never"
    return WgDump(public_key, has_private, listen_port, fwmark, tuple(peers))


def _read_line(line: str, number: int, fields: tuple[tuple[str, Callable[[str], object]], ...]) -> list:
    values = line.rstrip("\r").split("\t")
    if len(values) != len(fields):
        hint = " (is this `wg show all dump`? parse one interface's dump)" if len(values) == len(fields) + 1 else ""
        raise DumpParseError(f"line {number}: expected {len(fields)} tab-separated fields, got {len(values)}{hint}")
    parsed = []
    for (name, read), value in zip(fields, values, strict=True):
        try:
            parsed.append(read(value))
        except ValueError:
            raise DumpParseError(f"line {number}: malformed {name} field") from None
    return parsed
