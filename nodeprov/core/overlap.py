"""When a per-request token's mint swap may run beside the upstream call, and what it costs.

A paid request normally swaps its token first and calls the upstream after; overlapping the
two makes a stream's first token come after ``max(swap, upstream)`` instead of their sum.
The price is that a bad token may start an upstream call that is then cancelled. This gate
bounds that:

- **Known bad tokens never overlap**: a token whose proofs the ledger recorded as received
  (``Wallet.seen_before``) or whose swap failed recently (a bounded memory of proof ids,
  :meth:`SwapOverlap.failed`) takes the sequential path and fails exactly as without overlap.
- **Per client**: at most ``per_client`` unconfirmed overlapped starts at once per client
  (an address, an npub); past that a request simply swaps first (no error).
- **Node-wide breaker**: forged proofs cost nothing and are new each time, so neither check
  above knows them. After :data:`TRIP_AFTER` failed swaps within :data:`TRIP_WINDOW` seconds
  the overlap is off for everyone for :data:`TRIP_COOLDOWN` seconds (every request swaps
  first, as with the switch off), and failures while it is off keep it off. A flood of bad
  tokens therefore starts at most ``TRIP_AFTER`` upstream calls per cool-down, whoever sends
  them; honest traffic, whose swaps rarely fail, only loses the overlap's speed meanwhile.
- **Switch**: ``enabled=False`` (``[payments] overlap_swap = false``) never overlaps.

The counters (``started``, ``waited``, ``known_spent``, ``cancelled``) say what it did.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from nodeprov.core.charges import Pending

if TYPE_CHECKING:
    from nodeprov.core.charges import Charge
    from nodeprov.core.pricing import Cost

# Proof ids of failed swaps kept in memory: a flood of bad tokens from one sender costs one
# cancelled upstream start per token it has not sent before, and the memory stays bounded.
REMEMBERED_FAILURES = 16_384
# The node-wide breaker: this many failed swaps within the window turn the overlap off for
# the cool-down (seconds).
TRIP_AFTER = 8
TRIP_WINDOW = 60.0
TRIP_COOLDOWN = 300.0


class SwapOverlap:
    """The overlap switch, the per-client limit and the memory of failed swaps."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        per_client: int = 2,
        remember: int = REMEMBERED_FAILURES,
        trip_after: int = TRIP_AFTER,
        window: float = TRIP_WINDOW,
        cooldown: float = TRIP_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self.per_client = per_client
        self._remember = remember
        self._trip_after = trip_after
        self._window = window
        self._cooldown = cooldown
        self._clock = clock
        self._recent_failures: deque[float] = deque()
        self._off_until = float("-inf")
        self.trips = 0  # times the breaker turned the overlap off
        self._failed: OrderedDict[str, None] = OrderedDict()
        self._open: dict[str, int] = {}  # client -> unconfirmed overlapped starts
        self.started = 0  # upstream calls started before their swap was confirmed
        self.waited = 0  # requests that swapped first because their client was at its limit
        self.known_spent = 0  # tokens known as spent or failed: swapped first, never overlapped
        self.cancelled = 0  # overlapped upstream calls cancelled because the swap failed

    def failed(self, proof_ids: Iterable[str]) -> None:
        """Remember the proofs of a swap the mint refused (oldest forgotten first); count the
        failure towards the node-wide breaker."""
        now = self._clock()
        self._recent_failures.append(now)
        while self._recent_failures and self._recent_failures[0] <= now - self._window:
            self._recent_failures.popleft()
        if len(self._recent_failures) >= self._trip_after:
            if not self.tripped:
                self.trips += 1
            self._off_until = now + self._cooldown
        for proof_id in proof_ids:
            self._failed[proof_id] = None
            self._failed.move_to_end(proof_id)
        while len(self._failed) > self._remember:
            self._failed.popitem(last=False)

    def failed_before(self, proof_ids: Iterable[str]) -> bool:
        """Whether any of these proofs was in a swap that failed recently."""
        return any(p in self._failed for p in proof_ids)

    @property
    def tripped(self) -> bool:
        """Whether the breaker has the overlap off now (too many failed swaps lately)."""
        return self._clock() < self._off_until

    def take(self, client: str) -> bool:
        """Take one of ``client``'s overlap slots; False (counted as waited) when it has none
        or the breaker is tripped."""
        if self.tripped:
            self.waited += 1
            return False
        count = self._open.get(client, 0)
        if count >= self.per_client:
            self.waited += 1
            return False
        self._open[client] = count + 1
        return True

    def give_back(self, client: str) -> None:
        """The overlapped swap of ``client`` is confirmed or failed: its slot is free."""
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:
            self._open.pop(client, None)

    def open_starts(self, client: str) -> int:
        """Unconfirmed overlapped starts of ``client`` now."""
        return self._open.get(client, 0)

    def pending(
        self, client: str, max_cost: Cost, take: Callable[[], Awaitable[Charge]]
    ) -> Pending:
        """A job whose swap (``take``) runs beside the upstream call, in a slot of ``client``."""
        self.started += 1
        released = False

        def give_back() -> None:
            nonlocal released
            if not released:
                released = True
                self.give_back(client)

        async def confirm() -> Charge:
            try:
                return await take()
            finally:
                give_back()

        def cancelled() -> None:
            self.cancelled += 1

        return Pending(max_cost, confirm, give_back, cancelled)
