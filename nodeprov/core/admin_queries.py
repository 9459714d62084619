"""Read-only figures for the admin dashboard (revoking is ``core.accounts_admin.revoke``).

Reads go through the ledger's reader connection (WAL: they never block the writer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from nodeprov.core import journal
from nodeprov.core.ledger import OPERATOR, Ledger

USER_KINDS = ("api_key", "token", "npub")
DAY = 86_400


@dataclass(frozen=True)
class Totals:
    users_msat: int
    users: int
    reserved_msat: int
    holds: int
    held_msat: int
    pending_ops: int
    failed_ops: int = 0  # given up by recovery because the mint refused them


@dataclass(frozen=True)
class ProofPool:
    mint_url: str
    unit: str
    state: str
    count: int
    amount: int  # in the mint's unit

    @property
    def value_msat(self) -> int:
        return self.amount * (1000 if self.unit == "sat" else 1)


@dataclass(frozen=True)
class ModelUsage:
    model: str
    channel: str
    requests: int
    charged_msat: int


@dataclass(frozen=True)
class DayRevenue:
    day: int  # unix time of 00:00 UTC
    msat: int


async def totals(ledger: Ledger) -> Totals:
    """What users hold (holds included), open holds and pending wallet operations."""
    users = await ledger.db.fetchone(
        "SELECT COUNT(*), COALESCE(SUM(balance_msat), 0), COALESCE(SUM(reserved_msat), 0) "
        "FROM accounts WHERE id != ?",
        (OPERATOR,),
    )
    holds = await ledger.db.fetchone(
        "SELECT COUNT(*), COALESCE(SUM(amount_msat), 0) FROM holds WHERE state = 'open'"
    )
    pending = await ledger.db.fetchone("SELECT COUNT(*) FROM wallet_ops WHERE state = 'pending'")
    assert users is not None and holds is not None and pending is not None
    return Totals(
        users_msat=int(users[1]),
        users=int(users[0]),
        reserved_msat=int(users[2]),
        holds=int(holds[0]),
        held_msat=int(holds[1]),
        pending_ops=int(pending[0]),
        failed_ops=(await journal.recovery_failures(ledger.db, limit=0))[0],
    )


async def proof_pools(ledger: Ledger) -> list[ProofPool]:
    """Proofs per mint, unit and state (``unspent``, ``reserved``, …)."""
    rows = await ledger.db.fetchall(
        "SELECT mint_url, unit, state, COUNT(*), SUM(amount) FROM proofs "
        "WHERE state IN ('unspent', 'reserved') GROUP BY mint_url, unit, state "
        "ORDER BY mint_url, unit, state"
    )
    return [ProofPool(r[0], r[1], r[2], int(r[3]), int(r[4])) for r in rows]


def channel_of(account_id: str, ref: str) -> tuple[str, str]:
    """(model, channel) of a charge: the channel is not recorded yet, so infer it."""
    head, sep, rest = ref.partition(":")
    if sep and head in ("http", "nostr"):
        return rest, head
    return ref, "nostr" if account_id.startswith("npub:") else "http"


async def usage_by_model(ledger: Ledger) -> list[ModelUsage]:
    """Settled requests and what they were charged, by model and channel."""
    rows = await ledger.db.fetchall(
        "SELECT COALESCE(ref, ''), account_id LIKE 'npub:%', COUNT(*), -SUM(delta_msat) "
        "FROM transactions WHERE kind = 'charge' GROUP BY 1, 2"
    )
    merged: dict[tuple[str, str], tuple[int, int]] = {}
    for ref, npub, count, charged in rows:
        key = channel_of("npub:" if npub else "", ref)
        n, msat = merged.get(key, (0, 0))
        merged[key] = (n + int(count), msat + int(charged))
    return sorted(
        (ModelUsage(m, c, n, msat) for (m, c), (n, msat) in merged.items()),
        key=lambda u: (-u.charged_msat, u.model, u.channel),
    )


async def revenue_by_day(ledger: Ledger, days: int = 30, at: int | None = None) -> list[DayRevenue]:
    """The operator's earnings per UTC day for the last ``days`` days (today included)."""
    today = ((int(time.time()) if at is None else at) // DAY) * DAY
    start = today - (days - 1) * DAY
    rows = await ledger.db.fetchall(
        "SELECT (at / ?) * ?, SUM(delta_msat) FROM transactions "
        "WHERE account_id = ? AND kind = 'earning' AND at >= ? GROUP BY 1",
        (DAY, DAY, OPERATOR, start),
    )
    by_day = {int(r[0]): int(r[1]) for r in rows}
    return [DayRevenue(start + i * DAY, by_day.get(start + i * DAY, 0)) for i in range(days)]


async def transactions_page(
    ledger: Ledger, *, before: int | None, limit: int, account_id: str | None = None
) -> tuple[list[dict[str, Any]], int | None]:
    """Newest-first transactions with id < ``before``; returns (rows, next ``before`` or None)."""
    where = ["id < ?"]
    params: list[Any] = [before if before is not None else 2**62]
    if account_id:
        where.append("account_id = ?")
        params.append(account_id)
    rows = await ledger.db.fetchall(
        f"SELECT * FROM transactions WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
        (*params, limit + 1),
    )
    items = [dict(r) for r in rows[:limit]]
    more = len(rows) > limit
    return items, (items[-1]["id"] if more and items else None)


async def count_transactions(ledger: Ledger) -> int:
    row = await ledger.db.fetchone("SELECT COUNT(*) FROM transactions")
    return int(row[0]) if row else 0
