"""What the node owes at each pool of proofs, and the rule that keeps payouts off it.

The ledger knows what it owes per account; the wallet knows what it holds per pool (one
mint, one unit). A balance is not tied to a pool, so "owed at a pool" is defined
conservatively:

- **tied**: change owed to per-request tokens (``req:`` accounts) whose token came from
  this mint and unit. That change can only be paid in the token's own mint and unit.
- **in flight**: sends and melts from this pool that are pending at the mint (their
  accounts were debited, their proofs are reserved until the mint answers).
- **every other user balance** (API keys, tokens used as keys, npubs; holds included),
  for moves of the operator's earnings only: a user may withdraw from any mint, so each
  pool keeps enough to pay every user on its own before the operator takes from it.

A move out of a pool (a withdrawal as a token, a payout or refund over Lightning) must
leave the pool holding at least what is owed there after the move: for the operator,
tied + in flight + every user balance; for a user, tied + in flight (the user's own
balance is theirs to take). Change paid to a per-request token from its own account is
not checked: it is what the tied amount is kept for. With one mint and unit this never
refuses a move the account's balance allows; it matters when the node holds several pools.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nodeprov.core.db import Conn, Database
from nodeprov.core.ledger import OPERATOR
from nodeprov.errors import InsufficientBalance

Fetch = Callable[[str, Sequence[Any]], Awaitable[Any]]

# ``req:`` ids as an index range of the accounts' primary key (LIKE would scan the table).
_REQ = "a.id >= 'req:' AND a.id < 'req;'"

_POOL = "SELECT COALESCE(SUM(value_msat), 0) FROM assets WHERE mint_url = ? AND unit = ?"
_IN_FLIGHT = (
    "SELECT COALESCE(SUM(debit_msat), 0) FROM wallet_ops WHERE state = 'pending' "
    "AND kind IN ('send', 'melt') AND mint_url = ? AND unit = ?"
)
_TIED = (
    f"SELECT COALESCE(SUM(a.balance_msat), 0) FROM accounts a WHERE {_REQ} "
    "AND a.balance_msat > 0 AND EXISTS (SELECT 1 FROM wallet_ops w WHERE w.kind = 'receive' "
    "AND w.fingerprint = substr(a.id, 5) AND w.mint_url = ? AND w.unit = ?)"
)
_USERS = f"SELECT COALESCE(SUM(a.balance_msat), 0) FROM accounts a WHERE a.id != ? AND NOT ({_REQ})"


async def _scalar(fetch: Fetch, sql: str, params: Sequence[Any]) -> int:
    row = await fetch(sql, params)
    return int(row[0]) if row else 0


async def headroom(fetch: Fetch, mint_url: str, unit: str, account_id: str) -> int:
    """msat that ``account_id`` may still take out of the pool (may be negative)."""
    pool = await _scalar(fetch, _POOL, (mint_url, unit))
    owed = await _scalar(fetch, _IN_FLIGHT, (mint_url, unit))
    owed += await _scalar(fetch, _TIED, (mint_url, unit))
    if account_id == OPERATOR:
        owed += await _scalar(fetch, _USERS, (OPERATOR,))
    return pool - owed


def in_transaction(conn: Conn) -> Fetch:
    """A ``fetch`` reading inside the open write transaction (it sees its own writes)."""

    async def fetch(sql: str, params: Sequence[Any]) -> Any:
        cursor = await conn.execute(sql, params)
        row = await cursor.fetchone()
        await cursor.close()
        return row

    return fetch


def committed(db: Database) -> Fetch:
    """A ``fetch`` reading the last committed state (for sizing a payout beforehand)."""
    return db.fetchone


async def lock_pool(conn: Conn, mint_url: str, unit: str) -> None:
    """Hold the pool's ``assets`` row until the transaction ends: moves out of it go one by one.

    Taken first in a transaction that moves money out of the pool (before its debit, the
    order a receive's ``add_asset`` then ``credit`` keeps too), so two processes' checks
    cannot both pass on what only one of them may take.
    """
    await conn.execute(
        "SELECT value_msat FROM assets WHERE mint_url = ? AND unit = ? FOR UPDATE",
        (mint_url, unit),
    )


async def check_move(conn: Conn, mint_url: str, unit: str, account_id: str) -> None:
    """Raise unless the pool still covers what is owed at it, after this transaction's move.

    Called inside the write transaction that debits the account and takes the proofs, so
    the check and the move are one atomic step; raising rolls both back. With several
    writers the pool is locked first (:func:`lock_pool`) and the sums read after it: each
    statement then sees what every move that held the lock before committed.
    """
    await lock_pool(conn, mint_url, unit)
    left = await headroom(in_transaction(conn), mint_url, unit, account_id)
    if left >= 0:
        return
    whose = "users' balances and unclaimed change" if account_id == OPERATOR else "unclaimed change"
    raise InsufficientBalance(
        f"the node's {unit} proofs at {mint_url} are owed to {whose}; this would take"
        f" {-left} msat of them: take it from another mint or unit",
        shortfall_msat=-left,
    )


async def payout_pools(db: Database, mints: Sequence[str]) -> list[tuple[str, str, int]]:
    """(mint, unit, msat the operator may take) of each trusted pool, most first."""
    rows = await db.fetchall("SELECT mint_url, unit FROM assets")
    pools = [
        (row[0], row[1], await headroom(committed(db), row[0], row[1], OPERATOR))
        for row in rows
        if row[0] in mints
    ]
    return sorted(pools, key=lambda p: p[2], reverse=True)
