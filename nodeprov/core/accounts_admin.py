"""Operator views of accounts: list with filters, find, revoke.

An account can be named by a prefix of its full id (``key:3f2a…``) or of the part after
the kind (``3f2a…``), by the user's full API key (``sk-…``), by the masked form
``/v1/wallet/balance`` shows (``sk-xNKv…9f2Q``; ``...`` for ``…`` is fine), by a token
used as a key (``cashuA…``/``cashuB…``) or by an ``npub1…``. Revoking keeps the balance;
the key just stops paying for jobs.
"""

from __future__ import annotations

from typing import Any

from nodeprov.core.account_moves import api_key_account
from nodeprov.core.ledger import OPERATOR, Account, Ledger, log, now
from nodeprov.errors import NodeprovError
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint
from nodeprov.protocol.nip19 import npub_decode

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


async def _ids(ledger: Ledger, sql: str, params: tuple[Any, ...]) -> list[Account]:
    rows = await ledger.db.fetchall(sql, params)
    found = [await ledger.account(row["id"]) for row in rows]
    return [a for a in found if a is not None]


def _exact_ids(text: str) -> list[str] | None:
    """The account ids a full credential names (a key, a token, an npub); None if not one."""
    if text.startswith("sk-") and "…" not in text:
        return [api_key_account(text)]
    if text.startswith(("cashuA", "cashuB")):
        try:
            fingerprint = token_fingerprint(parse_token(text))
        except NodeprovError:
            raise AccountLookupError("that token cannot be read") from None
        return ["token:" + fingerprint, "req:" + fingerprint]
    if text.startswith("npub1"):
        try:
            return ["npub:" + npub_decode(text)]
        except ValueError:
            raise AccountLookupError("that npub cannot be read") from None
    return None


async def search_accounts(ledger: Ledger, text: str, limit: int = 6) -> list[Account]:
    """The accounts ``text`` names (see the module docstring), at most ``limit``."""
    text = text.strip().replace("...", "…")
    exact = _exact_ids(text)
    if exact is not None:
        marks = ", ".join("?" * len(exact))
        return await _ids(
            ledger, f"SELECT id FROM accounts WHERE id IN ({marks}) ORDER BY id", tuple(exact)
        )
    if "…" in text:
        return await _ids(
            ledger, "SELECT id FROM accounts WHERE key_hint = ? ORDER BY id LIMIT ?", (text, limit)
        )
    if len(text) < MIN_PREFIX:
        raise AccountLookupError(f"give at least {MIN_PREFIX} characters of the account id")
    pattern = _like(text)
    return await _ids(
        ledger,
        "SELECT id FROM accounts WHERE id LIKE ? ESCAPE '\\' "
        "OR id LIKE '%:' || ? ESCAPE '\\' ORDER BY id LIMIT ?",
        (pattern, pattern, limit),
    )


async def find_account(ledger: Ledger, text: str) -> Account:
    """The one account ``text`` names: an id prefix, a key (full or masked), a token, an npub."""
    found = await search_accounts(ledger, text)
    shown = text.strip()
    if not found:
        credential = shown.startswith(("sk-", "cashuA", "cashuB", "npub1")) or "…" in shown
        what = "matches" if credential or "..." in shown else "id starts with"
        raise AccountLookupError(f"no account {what} {shown!r}")
    if len(found) > 1:
        ids = ", ".join(a.id[:20] for a in found[:5])
        raise AccountLookupError(f"{shown!r} matches several accounts ({ids}); give more")
    return found[0]


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
        "key_hint": account.key_hint,
    }
