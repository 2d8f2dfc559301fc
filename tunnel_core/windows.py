"""Flow-control windows: one type for a stream's credit and for the connection's (docs/protocol.md §6).

Theory of operation
-------------------
A :class:`Window` is the credit of one flow — a stream, or the connection as the sum of all streams —
in both directions. Sending, it is a counter the peer raises with WINDOW frames and our DATA lowers.
Receiving, it follows the bytes through three stages:

    peer's credit (``recv``) ──DATA arrives──► held by the application (``held``)
        ──application consumed them──► consumed, not yet returned (``unreturned``) ──WINDOW──► peer's credit

Credit goes back only when the application says the bytes were consumed (written onward or dropped),
never on arrival, and with hysteresis: :meth:`consume` returns the increment to send in a WINDOW frame,
or 0 while it is not yet worth a frame. The rules (the same object for both flows, told apart by two
constructor arguments, as h2's ``WindowManager`` serves streams and the connection alike):

- return once ``unreturned`` reaches half the configured ``size``;
- a window configured above the protocol's ``initial`` size *owes* the difference: it is added to the
  first WINDOW, sent once the peer has less than half of ``initial`` left (so a request/response
  exchange never costs a WINDOW frame); a flow that must announce it at once calls :meth:`grant_owed`;
- with ``return_when_exhausted`` (the connection), return as soon as ``unreturned`` reaches what the peer
  has left: a peer that ran out always gets credit back as soon as anything is consumed, even while
  stalled streams hold more than half of the connection window.

The object only counts: it never sees bytes, a clock or a frame. Misuse (more consumed than held) raises
``UsageError`` before anything changes.
"""

from __future__ import annotations

from tunnel_core.errors import UsageError
from tunnel_core.limits import INITIAL_WINDOW

MAX_WINDOW = 2**31 - 1  # the largest credit a window may hold (docs/protocol.md §6)

__all__ = ["MAX_WINDOW", "Window"]


class Window:
    """Credit of one flow. ``size`` is what we grant the peer in all (the configured receive window)."""

    __slots__ = ("size", "send", "recv", "held", "unreturned", "owed", "_initial", "_eager")

    def __init__(self, size: int, *, initial: int = INITIAL_WINDOW, return_when_exhausted: bool = False) -> None:
        if not initial <= size <= MAX_WINDOW:
            raise ValueError(f"a window of {size} bytes must be between {initial} and {MAX_WINDOW}")
        self.size = size
        self.send = initial  # credit the peer gave us, not yet used
        self.recv = initial  # credit we gave the peer, not yet used
        self.held = 0  # delivered to the application, not yet consumed
        self.unreturned = 0  # consumed, not yet returned in a WINDOW
        self.owed = size - initial  # configured credit above ``initial``, not yet granted
        self._initial = initial
        self._eager = return_when_exhausted

    # --- sending ----------------------------------------------------------------------------------------

    def spend(self, n: int) -> None:
        """Our DATA of ``n`` bytes left on this flow (the caller took at most ``send``)."""
        self.send -= n

    def raise_send(self, increment: int) -> bool:
        """The peer's WINDOW granted ``increment`` more; False (and nothing changed) if that would take the
        credit above ``MAX_WINDOW``, a flow-control error of the peer's."""
        if self.send + increment > MAX_WINDOW:
            return False
        self.send += increment
        return True

    # --- receiving --------------------------------------------------------------------------------------

    def fits(self, n: int) -> bool:
        """Whether ``n`` arriving bytes are within the credit the peer was given."""
        return n <= self.recv

    def arrived(self, n: int) -> None:
        """``n`` bytes arrived (checked with :meth:`fits`) and were handed to the application."""
        self.recv -= n
        self.held += n

    def check_consume(self, n: int) -> None:
        """Raise ``UsageError`` if ``consume(n)`` would consume more than is held."""
        if n < 0 or n > self.held:
            raise UsageError(f"consumed {n} bytes but only {self.held} are held")

    def consume(self, n: int, *, returning: bool = True) -> int:
        """``n`` held bytes were consumed. Returns the increment to send in a WINDOW now (0: none yet), and
        counts it as granted. ``returning=False``: the peer sends no more on this flow; nothing is owed it."""
        self.check_consume(n)
        self.held -= n
        if not returning:
            return 0
        self.unreturned += n
        credit = self.unreturned
        due = (credit >= self.size // 2
               or (self.owed and self.recv < self._initial // 2)
               or (self._eager and credit and credit >= self.recv))
        if not due:
            return 0
        increment = credit + self.owed
        self.recv += increment
        self.unreturned = self.owed = 0
        return increment

    def grant_owed(self) -> int:
        """Grant what is owed at once (the connection announces its window in its first frame)."""
        increment, self.owed = self.owed, 0
        self.recv += increment
        return increment
