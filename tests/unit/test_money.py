"""Integer msat arithmetic: no float, no bool, every lossy conversion names its rounding."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeprov.core.money import (
    MSAT_PER_SAT,
    ceil_div,
    ceil_msat,
    check_unit,
    format_msat,
    from_msat_ceil,
    from_msat_floor,
    msat,
    to_msat,
)


@pytest.mark.parametrize("value", [0, 1, -1, 10**18])
def test_msat_accepts_int(value: int) -> None:
    assert msat(value) == value
    assert type(msat(value)) is int


@pytest.mark.parametrize("value", [1.0, 0.5, True, False, "1", None, Fraction(1), 1 + 0j])
def test_msat_rejects_non_int(value: Any) -> None:
    with pytest.raises(TypeError):
        msat(value)


def test_int_subclass_is_rejected() -> None:
    class Sneaky(int):
        pass

    with pytest.raises(TypeError):
        msat(Sneaky(5))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Fraction(0), 0),
        (Fraction(1, 3), 1),
        (Fraction(2, 3), 1),
        (Fraction(3, 3), 1),
        (Fraction(1001, 1000), 2),
        (Fraction(-1, 3), 0),
        (Fraction(-4, 3), -1),
        (7, 7),
        (Fraction(10**30 + 1, 10**12), 10**18 + 1),
    ],
)
def test_ceil_msat(value: Fraction | int, expected: int) -> None:
    assert ceil_msat(value) == expected
    assert type(ceil_msat(value)) is int


def test_ceil_msat_rejects_float() -> None:
    with pytest.raises(TypeError):
        ceil_msat(0.5)  # type: ignore[arg-type]


@given(st.integers(-(10**15), 10**15), st.integers(1, 10**9))
def test_ceil_msat_is_the_least_integer_not_below(numerator: int, denominator: int) -> None:
    value = Fraction(numerator, denominator)
    result = ceil_msat(value)
    assert result >= value > result - 1


@given(st.integers(-(10**15), 10**15), st.integers(1, 10**9))
def test_ceil_div(numerator: int, denominator: int) -> None:
    result = ceil_div(numerator, denominator)
    assert result == ceil_msat(Fraction(numerator, denominator))


@pytest.mark.parametrize("denominator", [0, -1])
def test_ceil_div_needs_positive_denominator(denominator: int) -> None:
    with pytest.raises(ValueError):
        ceil_div(1, denominator)


def test_to_msat() -> None:
    assert to_msat(5, "sat") == 5000
    assert to_msat(5, "msat") == 5
    assert to_msat(0, "sat") == 0


@pytest.mark.parametrize("amount", [1.5, True, "5"])
def test_to_msat_rejects_non_int(amount: Any) -> None:
    with pytest.raises(TypeError):
        to_msat(amount, "sat")


@pytest.mark.parametrize(
    ("value", "sat_ceil", "sat_floor"),
    [(0, 0, 0), (1, 1, 0), (999, 1, 0), (1000, 1, 1), (1001, 2, 1), (1999, 2, 1), (2000, 2, 2)],
)
def test_from_msat_rounding(value: int, sat_ceil: int, sat_floor: int) -> None:
    assert from_msat_ceil(value, "sat") == sat_ceil
    assert from_msat_floor(value, "sat") == sat_floor
    assert from_msat_ceil(value, "msat") == value
    assert from_msat_floor(value, "msat") == value


@given(st.integers(0, 10**15))
def test_from_msat_brackets_the_value(value: int) -> None:
    floor = from_msat_floor(value, "sat")
    ceil = from_msat_ceil(value, "sat")
    assert to_msat(floor, "sat") <= value <= to_msat(ceil, "sat")
    assert ceil - floor == (0 if value % MSAT_PER_SAT == 0 else 1)


@given(st.integers(0, 10**15))
def test_sat_round_trip(sats: int) -> None:
    value = to_msat(sats, "sat")
    assert from_msat_floor(value, "sat") == sats == from_msat_ceil(value, "sat")


def test_check_unit() -> None:
    assert check_unit("sat") == "sat"
    assert check_unit("msat") == "msat"
    for bad in ("SAT", "usd", "", "btc"):
        with pytest.raises(ValueError):
            check_unit(bad)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 sat"),
        (1, "0.001 sat"),
        (10, "0.01 sat"),
        (100, "0.1 sat"),
        (1000, "1 sat"),
        (1500, "1.5 sat"),
        (1234, "1.234 sat"),
        (2_100_000_000, "2100000 sat"),
    ],
)
def test_format_msat(value: int, text: str) -> None:
    assert format_msat(value) == text


@pytest.mark.parametrize(("value", "text"), [(-1500, "-1.5 sat"), (-1, "-0.001 sat")])
def test_format_negative_msat(value: int, text: str) -> None:
    assert format_msat(value) == text


@given(st.integers(0, 10**15))
def test_format_msat_is_exact(value: int) -> None:
    text = format_msat(value)
    assert text.endswith(" sat")
    number = text.removesuffix(" sat")
    assert Fraction(number) * 1000 == value
