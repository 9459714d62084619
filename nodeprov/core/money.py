"""Integer millisatoshi arithmetic. No float ever becomes money.

Amounts are ``Msat`` (an ``int``); a mint's own unit is converted explicitly, and every
conversion that can lose precision names its rounding direction.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Literal, NewType

Msat = NewType("Msat", int)
Unit = Literal["sat", "msat"]
UNITS: tuple[Unit, ...] = ("sat", "msat")
MSAT_PER_SAT = 1000
MSAT_PER_BTC = 100_000_000_000


def msat(value: int) -> Msat:
    """Check that ``value`` is a real integer (not bool, not float) and tag it as msat."""
    if type(value) is not int:
        raise TypeError(f"msat amounts are integers, got {type(value).__name__}: {value!r}")
    return Msat(value)


def ceil_msat(value: Fraction | int) -> Msat:
    """Round an exact rational amount of msat up to a whole msat."""
    if isinstance(value, float):
        raise TypeError("float never becomes money")
    return Msat(-((-Fraction(value).numerator) // Fraction(value).denominator))


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer division rounding up, for non-negative denominators."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    return -((-numerator) // denominator)


def check_unit(unit: str) -> Unit:
    if unit == "sat":
        return "sat"
    if unit == "msat":
        return "msat"
    raise ValueError(f"unknown unit {unit!r}; nodeprov knows 'sat' and 'msat'")


def to_msat(amount: int, unit: Unit) -> Msat:
    """An amount in a mint unit, exactly in msat."""
    msat(amount)
    return Msat(amount * MSAT_PER_SAT) if unit == "sat" else Msat(amount)


def from_msat_ceil(value: Msat | int, unit: Unit) -> int:
    """The smallest amount in ``unit`` worth at least ``value`` msat (what a client must pay)."""
    return ceil_div(value, MSAT_PER_SAT) if unit == "sat" else int(value)


def from_msat_floor(value: Msat | int, unit: Unit) -> int:
    """The largest amount in ``unit`` worth at most ``value`` msat (what the node can give back)."""
    return value // MSAT_PER_SAT if unit == "sat" else int(value)


def format_msat(value: Msat | int) -> str:
    """``1500`` -> ``'1.5 sat'``; exact, for messages to people."""
    sign = "-" if value < 0 else ""
    sats, rest = divmod(abs(int(value)), MSAT_PER_SAT)
    if rest == 0:
        return f"{sign}{sats} sat"
    return f"{sign}{sats}.{rest:03d}".rstrip("0") + " sat"
