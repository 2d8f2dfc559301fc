"""The network-namespace lab for tests: the dev kit's, re-exported.

The one implementation is ``devkit.netns`` (NetnsLab, SitePair), ``devkit.firewall`` (HospitalFirewall,
its counters) and ``devkit.fixtures`` (``open_lab`` for a fixture, ``require_lab``). This module only keeps
the import path the tests have always used.
"""

from __future__ import annotations

from devkit.firewall import HospitalFirewall, NftCounter, parse_nft_counters
from devkit.fixtures import open_lab, require_lab
from devkit.netns import ExchangeResult, NetnsLab, SitePair

__all__ = [
    "ExchangeResult",
    "HospitalFirewall",
    "NetnsLab",
    "NftCounter",
    "SitePair",
    "open_lab",
    "parse_nft_counters",
    "require_lab",
]
