"""The child-key part of the hold path (:mod:`nodeprov.core.holds`): plain sync statements.

A child key's hold reserves on its parent's account (the statement every hold runs) and, in
the same transaction, on the child's remaining limit (:data:`CHILD_RESERVE`); the parent's
row is always locked before the child's. :func:`child_refusal` says why a child could not hold.
"""

from __future__ import annotations

from nodeprov.core.db import SyncConn
from nodeprov.errors import AccountExpired, InsufficientBalance, NodeprovError, Unauthorized
from nodeprov.protocol.child_keys import remaining_msat, spendable_msat

CHILD_RESERVE = (
    "UPDATE child_keys SET reserved_msat = reserved_msat + ?, last_used_at = ? "
    "WHERE id = ? AND revoked = 0 AND (expires_at IS NULL OR expires_at > ?) "
    "AND (limit_msat IS NULL OR limit_msat - spent_msat - reserved_msat >= ?)"
)
CHILD_UNRESERVE = "UPDATE child_keys SET reserved_msat = reserved_msat - ? WHERE id = ?"


def child_reserves_again(raw: SyncConn, child_id: str, amount: int) -> bool:
    """A lapsed child hold reserves on the child's limit again, if the limit still has room."""
    cursor = raw.execute(
        "UPDATE child_keys SET reserved_msat = reserved_msat + ? WHERE id = ? "
        "AND (limit_msat IS NULL OR limit_msat - spent_msat - reserved_msat >= ?)",
        (amount, child_id, amount),
    )
    return bool(cursor.rowcount == 1)


def child_refusal(
    raw: SyncConn, at: int, child_id: str, parent_id: str, amount: int
) -> NodeprovError:
    """Why a child key's hold was refused: it or its parent is revoked or expired, or the
    child's limit or the parent's balance is short (the child is told what it may spend)."""
    child = raw.execute(
        "SELECT revoked, expires_at, limit_msat, spent_msat, reserved_msat FROM child_keys "
        "WHERE id = ?",
        (child_id,),
    ).fetchone()
    if child is None or child[0]:
        return Unauthorized("Unknown or revoked API key")
    if child[1] is not None and child[1] <= at:
        return AccountExpired("This child key has expired")
    parent = raw.execute(
        "SELECT balance_msat, reserved_msat, expires_at, revoked FROM accounts WHERE id = ?",
        (parent_id,),
    ).fetchone()
    if parent is None or parent[3]:
        return Unauthorized("Unknown or revoked API key: its parent key is revoked")
    if parent[2] is not None and parent[2] <= at:
        return AccountExpired("This child key's parent key has expired")
    parent_available = int(parent[0]) - int(parent[1])
    room = remaining_msat(child[2], int(child[3]), int(child[4]))
    spendable = spendable_msat(parent_available, child[2], int(child[3]), int(child[4]))
    hint = ""
    if room is not None and room < amount and room <= parent_available:
        hint = f"; this child key's spending limit of {child[2]} msat leaves {room} msat"
    return InsufficientBalance.of(spendable, amount, hint)
