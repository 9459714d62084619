"""Child keys, sans I/O: a creation request's options and what a child may spend.

The request takes Routstr's field names where it has them (``count``, ``balance_limit`` in
msat, ``validity_date`` in unix seconds, ``balance_limit_reset``) and adds ``label``;
``expires_at`` is accepted as this node's own name for ``validity_date``. A periodic limit
reset (``balance_limit_reset``) is not offered: asking for one is refused, not ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodeprov.errors import InvalidRequest
from nodeprov.protocol.json_input import int_param

MAX_COUNT = 50  # children made by one request (Routstr's bound)
MAX_LABEL = 100  # characters
MAX_UNIX_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z
MAX_MSAT = 2**63 - 1


@dataclass(frozen=True)
class ChildKeyRequest:
    """``count`` children, each with the same spend limit (msat), expiry and label."""

    count: int = 1
    limit_msat: int | None = None
    expires_at: int | None = None
    label: str | None = None


def _label(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest("'label' must be a string")
    text = value.strip()
    if len(text) > MAX_LABEL or not text.isprintable():
        raise InvalidRequest(f"'label' must be at most {MAX_LABEL} printable characters")
    return text or None


def parse_child_key_request(params: Mapping[str, Any], now: int) -> ChildKeyRequest:
    """The options of ``POST /v1/wallet/child-key`` (JSON body or query), checked; 400 if bad."""
    count = int_param(params, "count", maximum=MAX_COUNT)
    limit = int_param(params, "balance_limit", maximum=MAX_MSAT)
    expires = int_param(params, "validity_date", maximum=MAX_UNIX_TIME)
    ours = int_param(params, "expires_at", maximum=MAX_UNIX_TIME)
    if expires is not None and ours is not None and expires != ours:
        raise InvalidRequest("'validity_date' and 'expires_at' name one expiry: give one")
    expires = expires if expires is not None else ours
    if expires is not None and expires <= now:
        raise InvalidRequest("'validity_date' must be a future unix time in seconds")
    if params.get("balance_limit_reset") is not None:
        raise InvalidRequest(
            "'balance_limit_reset' is not offered here: a child's limit is for its lifetime"
        )
    return ChildKeyRequest(
        count if count is not None else 1, limit, expires, _label(params.get("label"))
    )


def remaining_msat(limit_msat: int | None, spent_msat: int, reserved_msat: int) -> int | None:
    """What is left of a child's limit (running jobs' holds count as spent); None: no limit."""
    if limit_msat is None:
        return None
    return max(0, limit_msat - spent_msat - reserved_msat)


def spendable_msat(
    parent_available_msat: int, limit_msat: int | None, spent_msat: int, reserved_msat: int
) -> int:
    """What a child can spend now: its remaining limit, at most its parent's available balance."""
    room = remaining_msat(limit_msat, spent_msat, reserved_msat)
    available = max(0, parent_available_msat)
    return available if room is None else min(room, available)
