"""How many connections that have not yet proved who they are the relay holds, per source and in total.

Theory of operation: every connection to the tunnel port is *unauthenticated* from its TCP accept until
it either ends or proves its identity (a tunnel request with a site certificate the registry accepts).
Until then it costs memory and a file descriptor on an attacker's say-so, so the adapter asks
``admit(source)`` at accept and refuses the connection (closes it at once) when either the source's or
the total count is at its cap; it calls ``release(source)`` exactly once per admitted connection, when it
authenticates or ends. Time limits (TLS handshake, first request) are the adapter's; this only counts.
At most ``max_total`` sources have an entry, so the table is bounded by the cap it enforces.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_total: int = 1024
    max_per_source: int = 128

    def __post_init__(self) -> None:
        if self.max_total < 1 or not 1 <= self.max_per_source <= self.max_total:
            raise ValueError("max_total must be positive and max_per_source between 1 and max_total")


class Admission:
    """Counts unauthenticated connections; ``admit`` before accepting one, ``release`` when it is done."""

    def __init__(self, limits: AdmissionLimits = AdmissionLimits()) -> None:
        self.limits = limits
        self._by_source: dict[str, int] = {}
        self.total = 0
        self.refused = 0  # connections refused at a cap, since start

    def admit(self, source: str) -> bool:
        """Count a new connection from ``source`` and return True, or return False (and count a refusal)
        if the source or the total is at its cap."""
        held = self._by_source.get(source, 0)
        if held >= self.limits.max_per_source or self.total >= self.limits.max_total:
            self.refused += 1
            return False
        self._by_source[source] = held + 1
        self.total += 1
        return True

    def release(self, source: str) -> None:
        """One admitted connection from ``source`` authenticated or ended. Raises ValueError if none is held."""
        held = self._by_source.get(source, 0)
        if held <= 0:
            raise ValueError(f"no unauthenticated connection from {source!r} is held")
        if held == 1:
            del self._by_source[source]
        else:
            self._by_source[source] = held - 1
        self.total -= 1

    def held(self, source: str) -> int:
        return self._by_source.get(source, 0)

    @property
    def sources(self) -> int:
        return len(self._by_source)
