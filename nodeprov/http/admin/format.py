"""Exact money text for people (sat with three msat decimals) and parsing of amount inputs."""

from __future__ import annotations

import re
import time

_AMOUNT = re.compile(r"^\s*(\d{1,15})(?:\.(\d{1,3}))?\s*$")


def sat_text(value: int) -> str:
    """``1234567`` msat -> ``'1,234.567 sat'``; always exact, never rounded."""
    sign = "-" if value < 0 else ""
    sats, rest = divmod(abs(int(value)), 1000)
    return f"{sign}{sats:,}.{rest:03d} sat"


def parse_sat(text: str) -> int | None:
    """An amount typed in sat (up to 3 decimals) as msat; None if blank; ValueError if bad."""
    if not text.strip():
        return None
    match = _AMOUNT.match(text)
    if match is None:
        raise ValueError("amounts are sat with at most three decimals, e.g. 12 or 12.345")
    whole, frac = match.group(1), (match.group(2) or "").ljust(3, "0")
    value = int(whole) * 1000 + int(frac)
    if value <= 0:
        raise ValueError("the amount must be more than zero")
    return value


def when(ts: int | None) -> str:
    """A unix time as ``YYYY-MM-DD HH:MM UTC`` (``—`` for never)."""
    if ts is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def when_short(ts: int | None) -> str:
    """A unix time as ``MM-DD HH:MM`` (UTC) for narrow table cells (``—`` for never)."""
    if ts is None:
        return "—"
    return time.strftime("%m-%d %H:%M", time.gmtime(ts))
