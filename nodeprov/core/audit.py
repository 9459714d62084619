"""The audit: what the node holds at each mint against what it owes, and the log replayed.

Read on one snapshot (:meth:`nodeprov.core.ledger.Ledger.audit`), so concurrent writes cannot
fake a mismatch. Owed: every balance (users, holds included, and the operator with its
unfolded earnings) plus payouts under way. Child keys hold no money; what their running jobs
reserve must match their open holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeprov.core import holds
from nodeprov.core.db import SyncConn


@dataclass(frozen=True)
class AuditLine:
    mint_url: str
    unit: str
    books_msat: int
    proofs_msat: int

    @property
    def ok(self) -> bool:
        return self.books_msat == self.proofs_msat


@dataclass(frozen=True)
class AuditReport:
    """What the node holds at each mint against what it owes.

    Owed: every balance (users, holds included, and the operator) plus payouts under way.
    """

    lines: tuple[AuditLine, ...]
    assets_msat: int
    liabilities_msat: int
    log_mismatches: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return (
            all(line.ok for line in self.lines)
            and self.assets_msat == self.liabilities_msat
            and not self.log_mismatches
        )


def audit_books(raw: SyncConn) -> AuditReport:
    """The audit's queries, all on one snapshot so concurrent writes cannot fake a mismatch."""
    books = {(m, u): v for m, u, v in raw.execute("SELECT mint_url, unit, value_msat FROM assets")}
    proofs = {
        (m, u): total * (1000 if u == "sat" else 1)
        for m, u, total in raw.execute(
            "SELECT mint_url, unit, SUM(amount) FROM proofs "
            "WHERE state IN ('unspent', 'reserved') GROUP BY mint_url, unit"
        )
    }
    lines = tuple(
        AuditLine(mint, unit, books.get((mint, unit), 0), proofs.get((mint, unit), 0))
        for mint, unit in sorted(set(books) | set(proofs))
    )
    (balances,) = raw.execute(
        f"SELECT COALESCE(SUM(balance_msat), 0) + ({holds.UNFOLDED_EARNINGS}) FROM accounts"
    ).fetchone()
    # A payout under way has left the account but not yet the node's proofs.
    (in_flight,) = raw.execute(
        "SELECT COALESCE(SUM(debit_msat), 0) FROM wallet_ops "
        "WHERE state = 'pending' AND kind IN ('send', 'melt')"
    ).fetchone()
    problems = [
        f"balance != log for {account_id}"
        for (account_id,) in raw.execute(
            "SELECT a.id FROM accounts a LEFT JOIN "
            "(SELECT account_id, SUM(delta_msat) AS s FROM transactions GROUP BY account_id) t "
            "ON t.account_id = a.id WHERE a.balance_msat + CASE WHEN a.id = 'operator' THEN "
            f"({holds.UNFOLDED_EARNINGS}) ELSE 0 END != COALESCE(t.s, 0)"
        )
    ]
    (held,) = raw.execute(
        "SELECT COALESCE(SUM(amount_msat), 0) FROM holds WHERE state = 'open'"
    ).fetchone()
    (reserved,) = raw.execute("SELECT COALESCE(SUM(reserved_msat), 0) FROM accounts").fetchone()
    if held != reserved:
        problems.append(f"open holds {held} != reserved {reserved}")
    # A child key's open holds reserve on its parent's account and on the child's limit alike.
    for child_id, child_reserved, child_held in raw.execute(
        "SELECT c.id, c.reserved_msat, COALESCE(SUM(h.amount_msat), 0) FROM child_keys c "
        "LEFT JOIN holds h ON h.child_id = c.id AND h.state = 'open' "
        "GROUP BY c.id, c.reserved_msat HAVING c.reserved_msat != COALESCE(SUM(h.amount_msat), 0)"
    ):
        problems.append(
            f"child key {child_id}: open holds {child_held} != reserved {child_reserved}"
        )
    return AuditReport(
        lines=lines,
        assets_msat=sum(line.books_msat for line in lines),
        liabilities_msat=int(balances) + int(in_flight),
        log_mismatches=tuple(problems),
    )
