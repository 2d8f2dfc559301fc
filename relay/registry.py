"""The relay's registry: sites, enrollment tokens, issued certificates, revocations and an audit trail.

Theory of operation: one database is the source of truth for *who may connect*: a SQLite file
(``{state_dir}/registry.sqlite3``, mode 0600, WAL journal), the embedded default, or a PostgreSQL database
that every relay of a fleet shares (``registry_url``; ``relay.engines``).

The TLS handshake proves a certificate chains to the relay CA; the
relay then asks the registry whether that certificate's serial was issued by us and is neither revoked nor
for a revoked site (:meth:`Registry.check_certificate`). The relay re-asks for every live session once a
second, so a revocation written by any process (the admin API, or the CLI on the same state directory)
ends the site's session within that sweep, on every relay that shares the database.

Routing lives here too. Listener routes (called AE on a relay listener -> a site's route) and site
destinations (cloud SCPs a site may send to) come from two sources: the config file, whose rows are
replaced at every start-up, and the admin API, whose rows persist and cannot shadow or remove a config
row. The relay builds its routing tables from these rows (and rebuilds them when another process writes).

Enrollment tokens are single-use and expiring; only the SHA-256 of the secret is stored, so a copy of
the database cannot be used to enroll. Redeeming is one ``UPDATE ... WHERE used_at IS NULL AND expires_at
> now``: two agents racing with the same token cannot both win.

Schema changes are numbered migrations applied in order inside one transaction each, the same on both
engines; the database records how far it has come, so an old one is upgraded at start-up and one from a
newer release is refused rather than misread.

Timestamps are UNIX seconds (float), passed in by the caller (``now``) so tests control the clock.
Every method opens its own short transaction; the class is safe to use from one thread at a time.

:class:`Registry` is made of one part per concern, each in its own module over the same open database
(``relay.store``): ``relay.identities`` (sites, tokens, certificates, WireGuard keys), ``relay.routingrows``
(listener routes, site destinations) and ``relay.fleetrows`` (relays, presence). Import the registry's
names from here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from relay.engines import PostgresTarget
from relay.fleetrows import FleetRows, RelayRecord
from relay.identities import (
    CertificateRecord,
    CertificateVerdict,
    Identities,
    PeerKeys,
    SiteRecord,
    TokenRefused,
    hash_secret,
    serial_hex,
)
from relay.routingrows import DestinationRecord, RouteRecord, RoutingRows
from relay.store import REGISTRY_FILE, SCHEMA_VERSION, RegistryError, RegistryUnavailable

__all__ = [
    "REGISTRY_FILE",
    "SCHEMA_VERSION",
    "CertificateRecord",
    "CertificateVerdict",
    "DestinationRecord",
    "Registry",
    "RegistryError",
    "RegistryUnavailable",
    "RelayRecord",
    "RouteRecord",
    "SiteRecord",
    "TokenRefused",
    "hash_secret",
    "open_registry",
    "serial_hex",
]

PASSWORD_ENV = "TUNNEL_RELAY_REGISTRY_PASSWORD"


class Registry(Identities, PeerKeys, RoutingRows, FleetRows):
    """Open with :meth:`open` (the SQLite file in a state directory) or :meth:`connect` (PostgreSQL); both
    create and migrate the schema. ``close()`` when done."""


def open_registry(state_dir: Path, url: str = "", password_file: Path | None = None,
                  environ: Mapping[str, str] = os.environ) -> Registry:
    """The registry the relay's settings name: the SQLite file in ``state_dir`` when ``url`` is empty, else
    the PostgreSQL database at ``url``, its password read from ``password_file`` (not world-readable) or the
    ``TUNNEL_RELAY_REGISTRY_PASSWORD`` environment variable (neither: libpq's own ``~/.pgpass``). Raises
    RegistryError (RegistryUnavailable when the database cannot be reached) naming what to fix."""
    if not url:
        return Registry.open(state_dir)
    password = _read_password(password_file) if password_file is not None else environ.get(PASSWORD_ENV)
    return Registry.connect(PostgresTarget.from_url(url, password))


def _read_password(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        raise RegistryError(f"cannot read registry_password_file {path}: {exc}") from None
    if mode & stat.S_IROTH:
        raise RegistryError(f"registry_password_file {path} is readable by everyone; chmod o-r it (0600 or 0640)")
    password = text.rstrip("\r\n")
    if not password:
        raise RegistryError(f"registry_password_file {path} is empty")
    return password
