"""A model's rates as integers over one denominator, so a cost is a few integer operations.

A :class:`PriceTable` covers one kind of job of one model (tokens, speech, audio, one image
size): the fee multiplier times each rate it involves, written exactly as integers over a
common ``scale``. A job's cost is then ``ceil((request + input * n + output * m) / scale)``
for the total and ``floor`` of each part: the same numbers exact ``Fraction`` arithmetic
gives (see :mod:`nodeprov.core.pricing` for the rounding rules), without building a
``Fraction`` per request. Tables are built from the exact rates on first use and kept; one
with USD rates is rebuilt whenever the BTC/USD rate it was built with changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from nodeprov.config import Rate
from nodeprov.errors import ConfigError

Role = Literal["request", "input", "output"]


@dataclass(frozen=True, slots=True)
class Term:
    """One rate of a job and what it is priced per: ``rate / per`` msat per unit (or once)."""

    role: Role
    rate: Rate | None
    per: int = 1


@dataclass(frozen=True, slots=True)
class PriceTable:
    """``fee * rate`` of each role as ``numerator / scale`` msat (per unit for input, output).

    ``per_usd`` is the msat-per-USD rate the table was built with (None: msat rates only);
    ``output_rate`` is the exact output rate before the fee (to compare image prices).
    """

    scale: int
    request: int
    input: int
    output: int
    per_usd: Fraction | None
    output_rate: Fraction


def exact_msat(rate: Rate | None, per_usd: Callable[[], Fraction]) -> Fraction:
    """``rate`` in exact msat (None is free); ``per_usd`` is asked only for a USD rate."""
    if rate is None:
        return Fraction(0)
    if isinstance(rate.amount, float):
        raise TypeError("float never becomes money")
    if rate.currency == "msat":
        return Fraction(rate.amount)
    if rate.currency == "usd":
        return Fraction(rate.amount) * per_usd()
    raise ConfigError(f"unknown price currency {rate.currency!r}")


def build(terms: Sequence[Term], fee: Fraction, per_usd: Callable[[], Fraction]) -> PriceTable:
    """The table of ``terms`` (converted in their order, as the exact path does) at ``fee``."""
    used: list[Fraction] = []

    def rate_once() -> Fraction:
        if not used:
            used.append(per_usd())
        return used[0]

    values = {"request": Fraction(0), "input": Fraction(0), "output": Fraction(0)}
    for term in terms:
        values[term.role] = exact_msat(term.rate, rate_once) / term.per
    charged = {role: fee * value for role, value in values.items()}
    scale = math.lcm(*(value.denominator for value in charged.values()))
    return PriceTable(
        scale=scale,
        request=int(charged["request"] * scale),
        input=int(charged["input"] * scale),
        output=int(charged["output"] * scale),
        per_usd=used[0] if used else None,
        output_rate=values["output"],
    )
