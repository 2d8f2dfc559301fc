"""The hospital's firewall in a lab namespace: inbound only for connections the hospital opened.

Calling contract: ``HospitalFirewall(lab, ns).install()`` loads an nftables table into namespace ``ns`` of
a :class:`~devkit.netns.NetnsLab` (it goes with the namespace). Inbound packets on the veth are accepted
only when they belong to a connection the hospital opened (ct state established,related); everything else
inbound is dropped and counted in named counters, read back from ``nft -j`` by the pure
:func:`parse_nft_counters`. ``block_udp()`` drops outbound UDP, to force a fallback from WireGuard to the
WebSocket transport; ``unblock_udp()`` lifts it.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field

from devkit.netns import HOSPITAL_VETH, NetnsLab

__all__ = ["FIREWALL_TABLE", "HospitalFirewall", "NftCounter", "parse_nft_counters"]

FIREWALL_TABLE = "dt_guard"


@dataclass(frozen=True)
class NftCounter:
    packets: int
    bytes: int


def parse_nft_counters(text: str, table: str = FIREWALL_TABLE) -> dict[str, NftCounter]:
    """Named counters of ``table`` from ``nft -j list ruleset`` (or ``list counters``) output."""
    document = json.loads(text)
    counters: dict[str, NftCounter] = {}
    for item in document.get("nftables", []):
        counter = item.get("counter") if isinstance(item, dict) else None
        if counter and counter.get("table") == table:
            counters[counter["name"]] = NftCounter(int(counter["packets"]), int(counter["bytes"]))
    return counters


@dataclass
class HospitalFirewall:
    """The hospital's nftables table: inbound only for connections it opened; counters; optional UDP block.

    Counters: ``inbound_established`` (accepted replies), ``inbound_new_drops`` (new connections
    dropped), ``inbound_other_drops`` (invalid/untracked dropped), ``udp_out_drops`` (while UDP is blocked).
    """

    lab: NetnsLab
    ns: str
    veth: str = HOSPITAL_VETH
    table: str = FIREWALL_TABLE
    udp_blocked: bool = field(default=False, init=False)

    def install(self) -> HospitalFirewall:
        veth = json.dumps(self.veth)
        script = textwrap.dedent(
            f"""
            table inet {self.table} {{
              counter inbound_established {{ }}
              counter inbound_new_drops {{ }}
              counter inbound_other_drops {{ }}
              counter udp_out_drops {{ }}
              chain input {{
                type filter hook input priority filter; policy accept;
                iifname {veth} ct state established,related counter name "inbound_established" accept
                iifname {veth} ct state new counter name "inbound_new_drops" drop
                iifname {veth} counter name "inbound_other_drops" drop
              }}
              chain output {{
                type filter hook output priority filter; policy accept;
              }}
            }}
            """
        )
        self.lab.run(self.ns, ["nft", "-f", "-"], input=script.encode())
        return self

    def block_udp(self) -> None:
        """Drop every UDP packet leaving through the veth (WireGuard cannot get out)."""
        self.lab.run(self.ns, ["nft", "add", "rule", "inet", self.table, "output", "oifname", self.veth,
                               "meta", "l4proto", "udp", "counter", "name", "udp_out_drops", "drop"])
        self.udp_blocked = True

    def unblock_udp(self) -> None:
        self.lab.run(self.ns, ["nft", "flush", "chain", "inet", self.table, "output"])
        self.udp_blocked = False

    def counters(self) -> dict[str, NftCounter]:
        return parse_nft_counters(self.lab.run(self.ns, ["nft", "-j", "list", "ruleset"]), self.table)

    def counter(self, name: str) -> NftCounter:
        counters = self.counters()
        if name not in counters:
            raise KeyError(f"no counter {name!r} in table {self.table} (have {sorted(counters)})")
        return counters[name]
