"""Fleet discovery: which relays an agent may hold tunnels to, as the relay says on the WebSocket upgrade.

Theory of operation (``docs/protocol.md`` §1.3). On every tunnel upgrade request the agent names itself in
``Tunnel-Agent: <agent name>`` (:data:`AGENT_HEADER`), so a relay tells a site's agents apart. The relay's
``101`` answer may carry ``Tunnel-Fleet: <JSON array>`` (:data:`FLEET_HEADER`): the relays of its fleet
that agents may dial directly, each ``{"name", "zone", "url", "state"}`` with ``url`` a ``wss://`` URL and
``state`` ``"serving"`` or ``"draining"``. **The relay that answers lists itself first**: that is how an
agent that came in through a load balancer learns which relay it reached.

- The relay builds the header with :func:`encode_fleet` (compact JSON, ASCII only), which refuses with
  :class:`DiscoveryError` (a ``ValueError``) a list over :data:`MAX_ENTRIES` entries or
  :data:`MAX_HEADER_BYTES` bytes, or an entry that is not well-formed.
- The agent reads it with :func:`parse_fleet`, which raises :class:`DiscoveryError` (and nothing else)
  for anything malformed: not JSON, wrong types, a missing key, a non-``wss`` URL, a name twice, an empty
  list, or more than the limits (checked before the JSON is parsed). The agent treats that as "no fleet
  known". Keys of an entry beyond the four are ignored, so the relay may add some later.
- :func:`choose_relays` picks, deterministically (no randomness, no clock), up to ``k`` serving relays:
  the one the agent is on first, then the ones it already holds, then relays in zones not yet used,
  then by name. A relay the agent avoids may be named with the run it avoids (its ``since``): an entry of
  that name with another non-empty ``since`` is the relay restarted, and may be chosen again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from tunnel_core.errors import CoreError

__all__ = [
    "AGENT_HEADER",
    "AGENT_NAME",
    "DRAINING",
    "FLEET_HEADER",
    "FLEET_LIST_PATH",
    "MAX_ENTRIES",
    "MAX_HEADER_BYTES",
    "SERVING",
    "DiscoveryError",
    "FleetEntry",
    "choose_relays",
    "encode_fleet",
    "parse_fleet",
]

FLEET_HEADER = "Tunnel-Fleet"  # relay -> agent, on the 101 of the tunnel upgrade
AGENT_HEADER = "Tunnel-Agent"  # agent -> relay, on every tunnel upgrade request
# GET on a relay's tunnel port, with the site's certificate: the same list as a JSON body, for an agent
# whose lists went stale (it holds fewer tunnels than it wants and no upgrade brought a new list)
FLEET_LIST_PATH = "/fleet/v1/relays"
MAX_ENTRIES = 32
MAX_HEADER_BYTES = 8 * 1024
MAX_URL = 512  # characters of one entry's URL
SERVING: Literal["serving"] = "serving"
DRAINING: Literal["draining"] = "draining"
_STATES = (SERVING, DRAINING)
_KEYS = ("name", "zone", "url", "state")

# A relay's fleet name and an agent's name share one form (relay/config.py [fleet] name).
AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_RELAY_NAME = AGENT_NAME
_ZONE = re.compile(r"[A-Za-z0-9._-]{0,63}")
_SINCE = re.compile(r"[A-Za-z0-9._-]{0,32}")
_URL_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no space
_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


class DiscoveryError(CoreError, ValueError):
    """A ``Tunnel-Fleet`` value (or a list to encode as one) is not well-formed. The message says why in a
    few words and never repeats more than a short prefix of the input."""


@dataclass(frozen=True, slots=True)
class FleetEntry:
    """One relay of the fleet: its fleet ``name``, ``zone`` ("" when unset), the direct tunnel ``url``
    agents may dial, ``state`` (:data:`SERVING` or :data:`DRAINING`), and ``since``: an opaque token of
    this run of the relay (it changes when the relay restarts; "" when the relay sent none), so an agent
    that avoids a relay it saw draining knows the relay listed later under the same name is a new one."""

    name: str
    zone: str
    url: str
    state: str
    since: str = ""

    @property
    def serving(self) -> bool:
        return self.state == SERVING

    @property
    def host(self) -> str:
        """The URL's host (without brackets for IPv6), for logs and status."""
        return urlsplit(self.url).hostname or ""


def encode_fleet(entries: Iterable[FleetEntry]) -> str:
    """The ``Tunnel-Fleet`` value for ``entries`` (the answering relay first): compact ASCII JSON.

    Raises :class:`DiscoveryError` (a ``ValueError``) for more than :data:`MAX_ENTRIES` entries, a value
    over :data:`MAX_HEADER_BYTES` bytes, an empty list, a name twice or an entry :func:`parse_fleet`
    would refuse."""
    listed = list(entries)
    _check_count(len(listed))
    for entry in listed:
        if not isinstance(entry, FleetEntry):
            raise DiscoveryError("not a FleetEntry")
        _check_entry(entry)
    _check_unique(listed)
    text = json.dumps([{**{key: getattr(e, key) for key in _KEYS}, **({"since": e.since} if e.since else {})}
                       for e in listed], separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    if len(text) > MAX_HEADER_BYTES:
        raise DiscoveryError(f"the fleet list takes {len(text)} bytes, over {MAX_HEADER_BYTES}")
    return text


def parse_fleet(text: str) -> list[FleetEntry]:
    """The entries of a ``Tunnel-Fleet`` value, in the relay's order (the answering relay first).

    Raises :class:`DiscoveryError`, and no other exception, for any input that is not exactly what
    :func:`encode_fleet` would produce up to JSON whitespace, key order and extra keys (see the module doc).
    The size is checked before anything is parsed."""
    if not isinstance(text, str):
        raise DiscoveryError("not text")
    if len(text) > MAX_HEADER_BYTES or not text.isascii():
        raise DiscoveryError(f"not ASCII, or over {MAX_HEADER_BYTES} bytes")
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are huge integers
        raise DiscoveryError("not JSON") from exc
    if not isinstance(data, list):
        raise DiscoveryError("not a JSON array")
    _check_count(len(data))
    entries = [_entry_of(item) for item in data]
    _check_unique(entries)
    return entries


def choose_relays(entries: Sequence[FleetEntry], k: int, *, current: str | None,
                  avoid: Collection[str] | Mapping[str, str], keep: Collection[str] = ()) -> list[FleetEntry]:
    """Up to ``k`` serving relays of ``entries`` for the agent to hold tunnels to, none that ``avoid`` names.

    ``avoid`` holds relay names, or maps each name to the ``since`` of the run avoided: an entry of that name
    whose ``since`` is another non-empty token is a new run of the relay and is not avoided (with "" on
    either side, the name alone decides).

    In order: ``current`` (the relay the agent is connected to) if it is serving and not avoided; then the
    relays named in ``keep`` (ones the agent already holds tunnels to), by name, under the same condition;
    then, one at a time, a relay in a zone none of the chosen ones is in, if any is left, by name. A name
    listed twice counts once (its first entry). Deterministic: the same inputs give the same list."""
    if k <= 0:
        return []
    candidates: dict[str, FleetEntry] = {}
    for entry in entries:
        if entry.serving and not _avoided(entry, avoid):
            candidates.setdefault(entry.name, entry)
    chosen: list[FleetEntry] = []
    first = [current] if current is not None else []
    for name in [*first, *sorted(set(keep) - set(first))]:
        if len(chosen) < k and name in candidates:
            chosen.append(candidates.pop(name))
    zones = {entry.zone for entry in chosen}
    rest = sorted(candidates.values(), key=lambda e: e.name)
    while len(chosen) < k and rest:
        pick = next((e for e in rest if e.zone not in zones), rest[0])
        rest.remove(pick)
        chosen.append(pick)
        zones.add(pick.zone)
    return chosen


def _avoided(entry: FleetEntry, avoid: Collection[str] | Mapping[str, str]) -> bool:
    if entry.name not in avoid:
        return False
    run = avoid[entry.name] if isinstance(avoid, Mapping) else ""
    return not (run and entry.since and run != entry.since)


# --- checks ------------------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_count(n: int) -> None:
    if n == 0:
        raise DiscoveryError("an empty fleet list (the answering relay lists itself)")
    if n > MAX_ENTRIES:
        raise DiscoveryError(f"{n} entries, over {MAX_ENTRIES}")


def _check_unique(entries: list[FleetEntry]) -> None:
    if len({e.name for e in entries}) != len(entries):
        raise DiscoveryError("a relay name is listed twice")


def _entry_of(item: object) -> FleetEntry:
    if not isinstance(item, dict):
        raise DiscoveryError("an entry is not a JSON object")
    values = [item.get(key) for key in _KEYS]
    if not all(isinstance(value, str) for value in values):
        raise DiscoveryError("an entry lacks one of name, zone, url, state as a string")
    since = item.get("since", "")
    if not isinstance(since, str):
        raise DiscoveryError("an entry's since is not a string")
    entry = FleetEntry(*values, since=since)
    _check_entry(entry)
    return entry


def _check_entry(entry: FleetEntry) -> None:
    if not all(isinstance(getattr(entry, key), str) for key in _KEYS):
        raise DiscoveryError("an entry's fields must be strings")
    if not _RELAY_NAME.fullmatch(entry.name):
        raise DiscoveryError("an entry's name is not a relay name")
    if not _ZONE.fullmatch(entry.zone):
        raise DiscoveryError("an entry's zone is not a zone name")
    if entry.state not in _STATES:
        raise DiscoveryError("an entry's state is neither serving nor draining")
    if not isinstance(entry.since, str) or not _SINCE.fullmatch(entry.since):
        raise DiscoveryError("an entry's since is not a short token")
    _check_url(entry.url)


def _check_url(url: str) -> None:
    """A ``wss://host[:port]/path`` URL: no credentials, query or fragment, a valid port."""
    if len(url) > MAX_URL or not _URL_CHARS.fullmatch(url):
        raise DiscoveryError("an entry's url is not a short printable ASCII URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DiscoveryError("an entry's url cannot be parsed") from exc
    if parts.scheme != "wss":
        raise DiscoveryError("an entry's url is not wss://")
    netloc = parts.netloc
    host_part = netloc.rsplit(":", 1)[0] if port is not None or netloc.endswith(":") else netloc
    if "@" in netloc or not _HOST.fullmatch(host_part) or not parts.hostname:
        raise DiscoveryError("an entry's url has no plain host name")
    if port == 0 or netloc.endswith(":"):
        raise DiscoveryError("an entry's url has an invalid port")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise DiscoveryError("an entry's url carries a query or fragment")
