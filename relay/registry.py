"""The relay's registry: sites, enrollment tokens, issued certificates, revocations and an audit trail.

Theory of operation: one SQLite file (``{state_dir}/registry.sqlite3``, mode 0600, WAL journal) is the
source of truth for *who may connect*. The TLS handshake proves a certificate chains to the relay CA; the
relay then asks the registry whether that certificate's serial was issued by us and is neither revoked nor
for a revoked site (:meth:`Registry.check_certificate`). The relay re-asks for every live session once a
second, so a revocation written by any process (the admin API, or the CLI on the same state directory)
ends the site's session within that sweep.

Routing lives here too. Listener routes (called AE on a relay listener -> a site's route) and site
destinations (cloud SCPs a site may send to) come from two sources: the config file, whose rows are
replaced at every start-up, and the admin API, whose rows persist and cannot shadow or remove a config
row. The relay builds its routing tables from these rows (and rebuilds them when another process writes).

Enrollment tokens are single-use and expiring; only the SHA-256 of the secret is stored, so a copy of
the database cannot be used to enroll. Redeeming is one ``UPDATE ... WHERE used_at IS NULL AND expires_at
> now``: two agents racing with the same token cannot both win.

Schema changes are numbered migrations applied in order inside one transaction each; ``PRAGMA
user_version`` records how far a file has come, so an old file is upgraded at start-up and a file from a
newer release is refused rather than misread.

Timestamps are UNIX seconds (float), passed in by the caller (``now``) so tests control the clock.
Every method opens its own short transaction; the class is safe to use from one thread (the event loop).

:class:`Registry` is made of one part per concern, each in its own module over the same open file
(``relay.store``): ``relay.identities`` (sites, tokens, certificates, WireGuard keys) and
``relay.routingrows`` (listener routes, site destinations). Import the registry's names from here.
"""

from __future__ import annotations

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
from relay.store import REGISTRY_FILE, SCHEMA_VERSION, RegistryError

__all__ = [
    "REGISTRY_FILE",
    "SCHEMA_VERSION",
    "CertificateRecord",
    "CertificateVerdict",
    "DestinationRecord",
    "Registry",
    "RegistryError",
    "RouteRecord",
    "SiteRecord",
    "TokenRefused",
    "hash_secret",
    "serial_hex",
]


class Registry(Identities, PeerKeys, RoutingRows):
    """Open with :meth:`open` (creates and migrates the file); ``close()`` when done."""
