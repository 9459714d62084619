"""Operator views of accounts: list with filters, find by id prefix, revoke.

An account can be named by a prefix of its full id (``key:3f2a…``) or of the part after
the kind (``3f2a…``). Revoking keeps the balance; the key just stops paying for jobs.
"""

from __future__ import annotations

from typing import Any

from nodeprov.core.ledger import OPERATOR, Account, Ledger, log, now
from nodeprov.errors import NodeprovError

MIN_PREFIX = 4


class AccountLookupError(NodeprovError):
    """No account, or more than one, matches a prefix."""

    status = 404
    type = "invalid_request_error"
    code = "account_not_found"


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def list_accounts(
    ledger: Ledger,
    *,
    kind: str | None = None,
    revoked: bool | None = None,
    min_balance_msat: int | None = None,
    limit: int = 100,
) -> list[Account]:
    """User accounts (the operator excluded), most recently used first."""
    where: list[str] = ["id != ?"]
    params: list[Any] = [OPERATOR]
    if kind is not None:
        where.append("kind = ?")
        params.append(kind)
    if revoked is not None:
        where.append("revoked = ?")
        params.append(int(revoked))
    if min_balance_msat is not None:
        where.append("balance_msat >= ?")
        params.append(min_balance_msat)
    rows = await ledger.db.fetchall(
        f"SELECT id FROM accounts WHERE {' AND '.join(where)} "
        "ORDER BY COALESCE(last_used_at, created_at) DESC, id LIMIT ?",
        (*params, limit),
    )
    found = [await ledger.account(row["id"]) for row in rows]
    return [a for a in found if a is not None]


async def find_account(ledger: Ledger, prefix: str) -> Account:
    """The one account whose id (or id after ``kind:``) starts with ``prefix``."""
    prefix = prefix.strip()
    if len(prefix) < MIN_PREFIX:
        raise AccountLookupError(f"give at least {MIN_PREFIX} characters of the account id")
    pattern = _like(prefix)
    rows = await ledger.db.fetchall(
        "SELECT id FROM accounts WHERE id LIKE ? ESCAPE '\\' "
        "OR substr(id, instr(id, ':') + 1) LIKE ? ESCAPE '\\' ORDER BY id LIMIT 6",
        (pattern, pattern),
    )
    if not rows:
        raise AccountLookupError(f"no account id starts with {prefix!r}")
    if len(rows) > 1:
        shown = ", ".join(row["id"][:20] for row in rows[:5])
        raise AccountLookupError(f"{prefix!r} matches several accounts ({shown}); give more")
    account = await ledger.account(rows[0]["id"])
    if account is None:  # pragma: no cover - deleted between the two reads
        raise AccountLookupError(f"no account id starts with {prefix!r}")
    return account


async def revoke(ledger: Ledger, prefix: str) -> tuple[Account, bool]:
    """Revoke the account named by ``prefix``; returns it and whether it was active before."""
    account = await find_account(ledger, prefix)
    if account.id == OPERATOR:
        raise AccountLookupError("the operator account cannot be revoked")
    async with ledger.db.write() as conn:
        cursor = await conn.execute(
            "UPDATE accounts SET revoked = 1 WHERE id = ? AND revoked = 0", (account.id,)
        )
        changed = cursor.rowcount == 1
        if changed:  # a zero-delta line keeps the revocation in the account's history
            await log(conn, account.id, "revoke", 0, "", f"revoked at {now()}")
    updated = await ledger.account(account.id)
    assert updated is not None
    return updated, changed


def account_view(account: Account) -> dict[str, Any]:
    """An account as plain JSON-able data (balances in msat)."""
    return {
        "id": account.id,
        "kind": account.kind,
        "balance_msat": account.balance_msat,
        "reserved_msat": account.reserved_msat,
        "available_msat": account.available_msat,
        "total_deposited_msat": account.total_deposited_msat,
        "total_spent_msat": account.total_spent_msat,
        "created_at": account.created_at,
        "last_used_at": account.last_used_at,
        "expires_at": account.expires_at,
        "refund_address": account.refund_address,
        "revoked": account.revoked,
    }
