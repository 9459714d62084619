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
- **Switch**: ``enabled=False`` (``[payments] overlap_swap = false``) never overlaps.

The counters (``started``, ``waited``, ``known_spent``, ``cancelled``) say what it did.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from nodeprov.core.charges import Pending

if TYPE_CHECKING:
    from nodeprov.core.charges import Charge
    from nodeprov.core.pricing import Cost

# Proof ids of failed swaps kept in memory: a flood of bad tokens from one sender costs one
# cancelled upstream start per token it has not sent before, and the memory stays bounded.
REMEMBERED_FAILURES = 16_384


class SwapOverlap:
    """The overlap switch, the per-client limit and the memory of failed swaps."""

    def __init__(
        self, *, enabled: bool = True, per_client: int = 2, remember: int = REMEMBERED_FAILURES
    ) -> None:
        self.enabled = enabled
        self.per_client = per_client
        self._remember = remember
        self._failed: OrderedDict[str, None] = OrderedDict()
        self._open: dict[str, int] = {}  # client -> unconfirmed overlapped starts
        self.started = 0  # upstream calls started before their swap was confirmed
        self.waited = 0  # requests that swapped first because their client was at its limit
        self.known_spent = 0  # tokens known as spent or failed: swapped first, never overlapped
        self.cancelled = 0  # overlapped upstream calls cancelled because the swap failed

    def failed(self, proof_ids: Iterable[str]) -> None:
        """Remember the proofs of a swap the mint refused (oldest forgotten first)."""
        for proof_id in proof_ids:
            self._failed[proof_id] = None
            self._failed.move_to_end(proof_id)
        while len(self._failed) > self._remember:
            self._failed.popitem(last=False)

    def failed_before(self, proof_ids: Iterable[str]) -> bool:
        """Whether any of these proofs was in a swap that failed recently."""
        return any(p in self._failed for p in proof_ids)

    def take(self, client: str) -> bool:
        """Take one of ``client``'s overlap slots; False (counted as waited) when it has none."""
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
