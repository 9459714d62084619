"""Read-only figures for the admin dashboard (revoking is ``core.accounts_admin.revoke``).

Reads go through the ledger's reader connection (WAL: they never block the writer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeprov.core import journal
from nodeprov.core.ledger import OPERATOR, Ledger

USER_KINDS = ("api_key", "token", "npub")


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
    """(model, channel) of a charge logged before channels were recorded: inferred."""
    head, sep, rest = ref.partition(":")
    if sep and head in ("http", "nostr"):
        return rest, head
    return ref, "nostr" if account_id.startswith("npub:") else "http"


async def usage_by_model(ledger: Ledger) -> list[ModelUsage]:
    """Settled requests and what they were charged, by model and channel."""
    # Charges that record their model group by it; older ones by their ref (the model then).
    rows = await ledger.db.fetchall(
        "SELECT CASE WHEN model IS NULL THEN COALESCE(ref, '') END, account_id LIKE 'npub:%', "
        "model, channel, COUNT(*), -SUM(delta_msat) FROM transactions WHERE kind = 'charge' "
        "GROUP BY 1, 2, 3, 4"
    )
    merged: dict[tuple[str, str], tuple[int, int]] = {}
    for ref, npub, model, channel, count, charged in rows:
        if model is not None and channel is not None:
            key = (str(model), str(channel))
        else:
            key = channel_of("npub:" if npub else "", ref or "")
        n, msat = merged.get(key, (0, 0))
        merged[key] = (n + int(count), msat + int(charged))
    return sorted(
        (ModelUsage(m, c, n, msat) for (m, c), (n, msat) in merged.items()),
        key=lambda u: (-u.charged_msat, u.model, u.channel),
    )


@dataclass(frozen=True)
class Earnings:
    """The operator account's history in parts (msat).

    ``revenue``: what requests were charged; ``rounding``: the msat below one sat of the
    change of ``sat`` tokens paid per request (``ceil(cost / 1000)`` sat is kept);
    ``deposited``: tokens the operator put in; ``paid_out``: withdrawals and payouts, fees
    included, net of what came back.
    """

    revenue_msat: int
    rounding_msat: int
    deposited_msat: int
    paid_out_msat: int

    @property
    def earned_msat(self) -> int:
        return self.revenue_msat + self.rounding_msat

    @property
    def balance_msat(self) -> int:
        return self.earned_msat + self.deposited_msat - self.paid_out_msat


async def earnings(ledger: Ledger) -> Earnings:
    """The operator's balance from the log: revenue, rounding, deposits, payouts."""
    rows = await ledger.db.fetchall(
        "SELECT kind, COALESCE(SUM(delta_msat), 0) FROM transactions WHERE account_id = ? "
        "GROUP BY kind",
        (OPERATOR,),
    )
    by_kind = {str(kind): int(total) for kind, total in rows}
    revenue = by_kind.pop("earning", 0)
    rounding = by_kind.pop("rounding", 0)
    deposited = by_kind.pop("deposit", 0)
    return Earnings(revenue, rounding, deposited, -sum(by_kind.values()))


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


def request_key(row: Mapping[str, Any]) -> str | None:
    """The request a transaction belongs to, if any (see ``holds.request_of``).

    A charge and its earning carry it; a per-request token's deposit is on its ``req:``
    account, its change and rounding carry ``change:<fingerprint>``.
    """
    if row.get("request"):
        return str(row["request"])
    ref = str(row.get("ref") or "")
    if ref.startswith("change:"):
        return "req:" + ref.removeprefix("change:")
    account = str(row.get("account_id") or "")
    return account if account.startswith("req:") else None


@dataclass
class RequestGroup:
    """The rows of one request (or one row that belongs to none), newest first."""

    request: str | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def _charge(self) -> Mapping[str, Any] | None:
        return next((r for r in self.rows if r["kind"] == "charge"), None)

    @property
    def charged_msat(self) -> int | None:
        charge = self._charge()
        return -int(charge["delta_msat"]) if charge else None

    @property
    def held_msat(self) -> int | None:
        charge = self._charge()
        return int(charge["held_msat"]) if charge and charge.get("held_msat") is not None else None

    @property
    def model(self) -> str | None:
        charge = self._charge()
        return str(charge["model"]) if charge and charge.get("model") else None

    @property
    def channel(self) -> str | None:
        charge = self._charge()
        return str(charge["channel"]) if charge and charge.get("channel") else None


def group_requests(rows: Sequence[dict[str, Any]]) -> list[RequestGroup]:
    """Rows grouped by request, each group where its newest row is (rows are newest first)."""
    groups: list[RequestGroup] = []
    by_key: dict[str, RequestGroup] = {}
    for row in rows:
        key = request_key(row)
        if key is None:
            groups.append(RequestGroup(None, [row]))
        elif key in by_key:
            by_key[key].rows.append(row)
        else:
            by_key[key] = RequestGroup(key, [row])
            groups.append(by_key[key])
    return groups
