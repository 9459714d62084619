"""The per-request hot path of the ledger: hold, settle, release.

Each is plain synchronous sqlite3 code run as one transaction in the writer's thread
(:meth:`Database.transact`), so a paid request costs two short transactions and two
thread hops in all. The rules are documented on :mod:`nodeprov.core.ledger`.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from nodeprov.errors import (
    AccountExpired,
    InsufficientBalance,
    LedgerError,
    NodeprovError,
    Unauthorized,
)

OPERATOR = "operator"
EXPIRED_KEEP = 86_400  # seconds an expired hold stays settleable


@dataclass(frozen=True)
class Hold:
    id: int
    account_id: str
    amount_msat: int


@dataclass(frozen=True)
class Settlement:
    charged_msat: int
    written_off_msat: int
    available_msat: int = 0  # the account's available balance right after


def _log(
    raw: sqlite3.Connection, at: int, account_id: str, kind: str, delta: int, ref: str, detail: str
) -> None:
    raw.execute(
        "INSERT INTO transactions (at, account_id, kind, delta_msat, ref, detail) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (at, account_id, kind, delta, ref, detail),
    )


def hold(
    raw: sqlite3.Connection, at: int, account_id: str, amount: int, purpose: str, timeout: int
) -> Hold:
    """Reserve ``amount`` with one conditional UPDATE: concurrent holds cannot overdraw."""
    cursor = raw.execute(
        "UPDATE accounts SET reserved_msat = reserved_msat + ?, last_used_at = ? "
        "WHERE id = ? AND revoked = 0 AND (expires_at IS NULL OR expires_at > ?) "
        "AND balance_msat - reserved_msat >= ?",
        (amount, at, account_id, at, amount),
    )
    if cursor.rowcount != 1:
        raise refusal(raw, at, account_id, amount)
    cursor = raw.execute(
        "INSERT INTO holds (account_id, amount_msat, purpose, created_at, expires_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (account_id, amount, purpose, at, at + timeout),
    )
    assert cursor.lastrowid is not None
    return Hold(cursor.lastrowid, account_id, amount)


def refusal(raw: sqlite3.Connection, at: int, account_id: str, amount: int) -> NodeprovError:
    """Why a hold was refused, as the error the client should see."""
    row = raw.execute(
        "SELECT balance_msat, reserved_msat, expires_at, revoked FROM accounts WHERE id = ?",
        (account_id,),
    ).fetchone()
    if row is None or row[3]:
        return Unauthorized("Unknown or revoked API key")
    if row[2] is not None and row[2] <= at:
        return AccountExpired("This key has expired; its balance is being refunded")
    available = row[0] - row[1]
    return InsufficientBalance(
        f"Insufficient balance. Current: {available // 1000} sats, "
        f"Required: {-(-amount // 1000)} sats",
        available_msat=available,
        required_msat=amount,
    )


def settle(
    raw: sqlite3.Connection, at: int, held: Hold, actual: int, ref: str, cap_at_hold: bool
) -> Settlement:
    """Close ``held`` charging ``actual`` (overrun rule), crediting the operator.

    A hold the sweeper expired (its job outlived the hold timeout) settles like a hold of
    zero: the charge comes from the available balance as far as it goes. A hold settled or
    released before cannot be settled again.
    """
    row = raw.execute(
        "SELECT h.amount_msat, h.state, a.balance_msat, a.reserved_msat FROM holds h "
        "JOIN accounts a ON a.id = h.account_id WHERE h.id = ?",
        (held.id,),
    ).fetchone()
    if row is None:
        raise LedgerError(f"hold {held.id} is not open (settled or released already)")
    reserved_here = row[0] if row[1] == "open" else 0
    available = row[2] - (row[3] - reserved_here)
    limit = min(available, held.amount_msat) if cap_at_hold else available
    charged = min(actual, limit)
    written_off = actual - charged
    raw.execute("DELETE FROM holds WHERE id = ?", (held.id,))
    raw.execute(
        "UPDATE accounts SET reserved_msat = reserved_msat - ?, balance_msat = balance_msat - ?, "
        "total_spent_msat = total_spent_msat + ? WHERE id = ?",
        (reserved_here, charged, charged, held.account_id),
    )
    detail = f"writeoff={written_off}" if written_off else ""
    _log(raw, at, held.account_id, "charge", -charged, ref, detail)
    raw.execute(
        "UPDATE accounts SET balance_msat = balance_msat + ? WHERE id = ?", (charged, OPERATOR)
    )
    _log(raw, at, OPERATOR, "earning", charged, ref, "")
    (after,) = raw.execute(
        "SELECT balance_msat - reserved_msat FROM accounts WHERE id = ?", (held.account_id,)
    ).fetchone()
    return Settlement(charged, written_off, after)


def release(raw: sqlite3.Connection, hold_id: int) -> None:
    """Close a hold without charging; a hold already gone is a no-op."""
    row = raw.execute(
        "SELECT account_id, amount_msat, state FROM holds WHERE id = ?", (hold_id,)
    ).fetchone()
    if row is None:
        return
    raw.execute("DELETE FROM holds WHERE id = ?", (hold_id,))
    if row[2] == "open":
        raw.execute(
            "UPDATE accounts SET reserved_msat = reserved_msat - ? WHERE id = ?", (row[1], row[0])
        )


def release_stale(raw: sqlite3.Connection, at: int | None) -> int:
    """Expire every open hold (``at`` None: start-up) or those past their expiry at ``at``.

    An expired hold no longer reserves anything but is kept for a day, so a job that
    finishes late still settles (as a hold of zero) instead of failing.
    """
    if at is None:
        rows = raw.execute("SELECT id, account_id, amount_msat FROM holds WHERE state = 'open'")
    else:
        rows = raw.execute(
            "SELECT id, account_id, amount_msat FROM holds WHERE state = 'open' "
            "AND expires_at <= ?",
            (at,),
        )
    stale = rows.fetchall()
    for hold_id, account_id, amount in stale:
        raw.execute("UPDATE holds SET state = 'expired' WHERE id = ?", (hold_id,))
        raw.execute(
            "UPDATE accounts SET reserved_msat = reserved_msat - ? WHERE id = ?",
            (amount, account_id),
        )
    if at is not None:
        raw.execute(
            "DELETE FROM holds WHERE state = 'expired' AND expires_at <= ?", (at - EXPIRED_KEEP,)
        )
    return len(stale)
