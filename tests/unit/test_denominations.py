"""Proof denominations: complete splits, exact and covering subsets of a pool."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeprov.core.denominations import (
    binary_split,
    complete_split,
    covering_subset,
    exact_subset,
)

POWERS = [2**i for i in range(12)]


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def subset_sums(parts: list[int]) -> set[int]:
    sums = {0}
    for part in parts:
        sums |= {s + part for s in sums}
    return sums


def is_complete(parts: list[int]) -> bool:
    """Every value 0..sum(parts) is a subset sum (each part at most 1 + the smaller ones)."""
    reach = 0
    for part in sorted(parts):
        if part > reach + 1:
            return False
        reach += part
    return True


def reachable(counts: dict[int, int], target: int) -> bool:
    """Bounded subset sum by brute force (small pools only)."""
    sums = {0}
    for amount, count in counts.items():
        sums = {s + k * amount for s in sums for k in range(count + 1) if s + k * amount <= target}
    return target in sums


pools = st.dictionaries(st.sampled_from(POWERS), st.integers(0, 4), max_size=8)


# --- binary_split ---------------------------------------------------------------------


@given(st.integers(0, 2**62))
def test_binary_split(amount: int) -> None:
    parts = binary_split(amount)
    assert sum(parts) == amount
    assert len(parts) == len(set(parts)) == bin(amount).count("1")
    assert all(is_power_of_two(p) for p in parts)
    assert parts == sorted(parts, reverse=True)


def test_binary_split_rejects_negative() -> None:
    with pytest.raises(ValueError):
        binary_split(-1)


# --- complete_split -------------------------------------------------------------------


@pytest.mark.parametrize("amount", range(0, 301))
def test_complete_split_small_amounts_exhaustively(amount: int) -> None:
    parts = complete_split(amount)
    assert sum(parts) == amount
    assert all(is_power_of_two(p) for p in parts)
    assert subset_sums(parts) >= set(range(amount + 1))


@given(st.integers(0, 2**32 - 2))
def test_complete_split_is_complete(amount: int) -> None:
    parts = complete_split(amount)
    assert sum(parts) == amount
    assert all(is_power_of_two(p) for p in parts)
    assert parts == sorted(parts, reverse=True)
    assert len(parts) <= 64
    assert is_complete(parts)


@given(st.integers(0, 2**62))
def test_complete_split_never_exceeds_max_outputs(amount: int) -> None:
    parts = complete_split(amount)
    assert sum(parts) == amount
    assert len(parts) <= 64
    assert all(is_power_of_two(p) for p in parts)


@given(st.integers(1, 10**6), st.integers(1, 40))
def test_complete_split_falls_back_to_binary(amount: int, max_outputs: int) -> None:
    parts = complete_split(amount, max_outputs=max_outputs)
    assert sum(parts) == amount
    fallback = binary_split(amount)
    if len(fallback) <= max_outputs:
        assert len(parts) <= max_outputs
    assert parts == fallback or is_complete(parts)


# --- exact_subset ---------------------------------------------------------------------


@settings(max_examples=400)
@given(pools, st.data())
def test_exact_subset_finds_a_subset_whenever_one_exists(
    counts: dict[int, int], data: st.DataObject
) -> None:
    total = sum(a * c for a, c in counts.items())
    target = data.draw(st.integers(0, total + 3))
    chosen = exact_subset(counts, target)
    if reachable(counts, target):
        assert chosen is not None
        assert sum(a * c for a, c in chosen.items()) == target
        assert all(0 < c <= counts[a] for a, c in chosen.items())
    else:
        assert chosen is None


@given(st.lists(st.sampled_from(POWERS), max_size=20), st.data())
def test_exact_subset_of_a_complete_pool_always_exists(
    parts: list[int], data: st.DataObject
) -> None:
    amount = data.draw(st.integers(0, 5000))
    pool = Counter(complete_split(amount)) + Counter(parts)
    target = data.draw(st.integers(0, amount))
    chosen = exact_subset(dict(pool), target)
    assert chosen is not None
    assert sum(a * c for a, c in chosen.items()) == target


def test_exact_subset_examples() -> None:
    assert exact_subset({}, 0) == {}
    assert exact_subset({}, 1) is None
    assert exact_subset({4: 1, 2: 1}, 1) is None
    assert exact_subset({4: 2, 1: 3}, 11) == {4: 2, 1: 3}
    assert exact_subset({4: 2, 1: 3}, 12) is None
    assert exact_subset({8: 0, 2: 1}, 8) is None


# --- covering_subset ------------------------------------------------------------------


@settings(max_examples=400)
@given(pools, st.data())
def test_covering_subset_covers(counts: dict[int, int], data: st.DataObject) -> None:
    total = sum(a * c for a, c in counts.items())
    target = data.draw(st.integers(0, total + 3))
    chosen = covering_subset(counts, target)
    if total < target:
        assert chosen is None
        return
    assert chosen is not None
    assert all(0 < c <= counts[a] for a, c in chosen.items())
    assert sum(a * c for a, c in chosen.items()) >= target


def test_covering_subset_prefers_one_proof() -> None:
    assert covering_subset({1: 5, 8: 1, 16: 1}, 5) == {8: 1}
    assert covering_subset({1: 5, 8: 0, 16: 1}, 5) == {16: 1}
    assert covering_subset({4: 3}, 10) == {4: 3}
    assert covering_subset({4: 2}, 10) is None
