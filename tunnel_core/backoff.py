"""Full-jitter exponential backoff (randomness passed in, so tests are exact)."""

from __future__ import annotations

from collections.abc import Callable


class Backoff:
    """``next_delay()`` is uniform in [0, min(cap, initial * 2**attempt)); ``reset()`` after a success."""

    def __init__(self, initial: float, cap: float, rand: Callable[[], float]) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError("need 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self._rand = rand
        self.attempt = 0

    def ceiling(self) -> float:
        return min(self.cap, self.initial * 2 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        delay = self._rand() * self.ceiling()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
