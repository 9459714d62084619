"""Choosing proof denominations (pure functions; Cashu amounts are powers of two).

The node keeps a *complete* pool: when it receives a token it asks the mint for
outputs such that every amount up to the total is a sum of a subset. Change for a
per-request payment can then be handed out from the pool without a second mint round
trip.
"""

from __future__ import annotations

from collections.abc import Mapping


def binary_split(amount: int, max_power: int = 2**62) -> list[int]:
    """``amount`` as distinct powers of two, largest first (the fewest proofs)."""
    if amount < 0:
        raise ValueError("amount must not be negative")
    parts: list[int] = []
    power = max_power
    while amount and power:
        while amount >= power:
            parts.append(power)
            amount -= power
        power //= 2
    return parts


def complete_split(amount: int, max_outputs: int = 64) -> list[int]:
    """Powers of two summing to ``amount`` such that every value 0..amount is a subset sum.

    Take 1, 2, 4, … while they fit, then the binary split of what is left; the first run
    alone makes every value up to ``2^k - 1``, the rest extends it to ``amount``. Falls
    back to :func:`binary_split` when that would need more than ``max_outputs`` proofs.
    """
    parts: list[int] = []
    power = 1
    total = 0
    while total + power <= amount:
        parts.append(power)
        total += power
        power *= 2
    parts.extend(binary_split(amount - total))
    if len(parts) > max_outputs:
        return binary_split(amount)
    return sorted(parts, reverse=True)


def exact_subset(counts: Mapping[int, int], target: int) -> dict[int, int] | None:
    """How many proofs of each denomination make exactly ``target``, or None.

    Largest first is exact for powers of two: each denomination divides the next, so a
    greedy choice never blocks a solution.
    """
    chosen: dict[int, int] = {}
    remaining = target
    for amount in sorted(counts, reverse=True):
        take = min(counts[amount], remaining // amount)
        if take:
            chosen[amount] = take
            remaining -= take * amount
    return chosen if remaining == 0 else None


def covering_subset(counts: Mapping[int, int], target: int) -> dict[int, int] | None:
    """Proofs worth at least ``target``: one proof if a single one covers it, else largest first."""
    singles = sorted(a for a, c in counts.items() if c and a >= target)
    if singles:
        return {singles[0]: 1}
    chosen: dict[int, int] = {}
    total = 0
    for amount in sorted(counts, reverse=True):
        for _ in range(counts[amount]):
            if total >= target:
                break
            chosen[amount] = chosen.get(amount, 0) + 1
            total += amount
    return chosen if total >= target else None
