"""Strict JSON for untrusted input: bounded nesting, 64-bit integers, finite numbers, text.

Python's ``json`` accepts what the rest of the node cannot handle: 3,000 nested arrays end
in ``RecursionError``, ``10**20`` in ``OverflowError`` when SQLite stores it, ``1e999`` is
``inf``, and ``"\\ud800"`` (a lone UTF-16 surrogate) is a string that cannot be encoded, so
SQLite or the upstream request fails on it. :func:`loads` refuses all four with
:class:`JsonRejected` (a ``ValueError``), so every channel answers them as bad input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from nodeprov.errors import InvalidRequest

MAX_DEPTH = 64
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_MAX_DIGITS = len(str(INT64_MAX))


class JsonRejected(ValueError):
    """Well-formed JSON the node refuses: nested too deeply or a number out of range."""


def _int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise JsonRejected(f"the integer {text[:24]}… is out of range (64-bit)")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise JsonRejected(f"the integer {text} is out of range (64-bit)")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRejected(f"the number {text[:24]} is out of range")
    return value


def _constant(name: str) -> Any:
    raise JsonRejected(f"{name} is not a JSON number")


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise :class:`JsonRejected` if arrays/objects in ``value`` nest deeper than ``limit``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:  # iterative: the check itself must not recurse
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            raise JsonRejected(f"the JSON is nested deeper than {limit} levels")
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonRejected("a JSON string holds a lone UTF-16 surrogate (not text)") from None


def check_strings(value: Any) -> None:
    """Raise :class:`JsonRejected` if a string or key in ``value`` is not encodable text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key)
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def loads(raw: str | bytes) -> Any:
    """Parse ``raw`` as JSON under the rules above; ``ValueError`` if it is not JSON at all."""
    try:
        value = json.loads(raw, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise JsonRejected(f"the JSON is nested deeper than {MAX_DEPTH} levels") from None
    if isinstance(value, dict | list):
        check_depth(value)  # first: check_strings walks the value, bounded only by its depth
    check_strings(value)
    return value


def int_param(
    params: Mapping[str, Any], name: str, *, minimum: int = 1, maximum: int = INT64_MAX
) -> int | None:
    """An optional whole-number parameter (JSON integer or decimal digits), range-checked."""
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if type(value) is not int or not minimum <= value <= maximum:
        raise InvalidRequest(f"'{name}' must be a whole number from {minimum} to {maximum}")
    return value
