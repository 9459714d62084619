"""The per-request hot path of the ledger: hold, renew, settle, release.

Each is plain synchronous sqlite3 code run as one transaction in the writer's thread
(:meth:`Database.transact`), so a paid request costs two short transactions and two
thread hops in all. The rules are documented on :mod:`nodeprov.core.ledger`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeprov.core import auth_events
from nodeprov.core.db import SyncConn
from nodeprov.errors import (
    AccountExpired,
    InsufficientBalance,
    LedgerError,
    NodeprovError,
    Unauthorized,
)

OPERATOR = "operator"
# The operator's balance is its account row plus these shards' unfolded earnings (see
# migration 0102): a charge credits shard ``hold id % EARNING_SHARDS``, not the one hot row.
EARNING_SHARDS = 32
CREDIT_EARNINGS = "UPDATE operator_earnings SET unfolded_msat = unfolded_msat + ? WHERE shard = ?"
UNFOLDED_EARNINGS = "SELECT COALESCE(SUM(unfolded_msat), 0) FROM operator_earnings"
# Folding (the same statements in a write block: ledger.fold_earnings).
FOLD_TAKE = (
    "SELECT shard, unfolded_msat FROM operator_earnings WHERE unfolded_msat > 0 "
    "ORDER BY shard FOR UPDATE"  # one lock order for every fold
)
FOLD_SHARD = "UPDATE operator_earnings SET unfolded_msat = unfolded_msat - ? WHERE shard = ?"
FOLD_INTO = "UPDATE accounts SET balance_msat = balance_msat + ? WHERE id = 'operator'"
LAPSED_KEEP = 86_400  # seconds a lapsed hold stays settleable by a job that still finishes
OUTCOME_KEEP = 7 * 86_400  # seconds a settled job's outcome answers a resumed request


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
    repeated: bool = False  # ``ref`` was settled before: nothing was charged this time


@dataclass(frozen=True)
class Outcome:
    """What a settled job cost, recorded under its reference (one row per ``ref``)."""

    ref: str
    account_id: str
    charged_msat: int
    cost_msat: int
    input_msat: int
    output_msat: int
    result: str | None  # JSON the caller kept with it (a DM job's answer), if any


def hold(
    raw: SyncConn,
    at: int,
    account_id: str,
    amount: int,
    purpose: str,
    lease: int,
    ref: str | None = None,
    last: bool = False,
) -> Hold:
    """Reserve ``amount`` with one conditional UPDATE: concurrent holds cannot overdraw.

    ``last``: nothing follows in the transaction, so the hold's row commits with it (one
    round trip on PostgreSQL, :meth:`SyncConn.batch`).
    """
    cursor = raw.execute(
        "UPDATE accounts SET reserved_msat = reserved_msat + ?, last_used_at = ? "
        "WHERE id = ? AND revoked = 0 AND (expires_at IS NULL OR expires_at > ?) "
        "AND balance_msat - reserved_msat >= ?",
        (amount, at, account_id, at, amount),
    )
    if cursor.rowcount != 1:
        raise refusal(raw, at, account_id, amount)
    with raw.batch(commit=last):
        inserted = raw.execute(
            "INSERT INTO holds (account_id, amount_msat, purpose, created_at, lease_expires_at,"
            " ref) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
            (account_id, amount, purpose, at, at + lease, ref),
        )
    (hold_id,) = inserted.fetchone()
    return Hold(int(hold_id), account_id, amount)


def renew(raw: SyncConn, at: int, held: Hold, lease: int) -> bool:
    """Extend a running job's lease to ``at + lease``; False if the hold no longer reserves.

    A hold whose lease lapsed (the sweeper released it) reserves its amount again if the
    balance still allows, so a job that was slow to renew is covered from then on.
    """
    cursor = raw.execute(
        "UPDATE holds SET lease_expires_at = ? WHERE id = ? AND state = 'open'",
        (at + lease, held.id),
    )
    if cursor.rowcount == 1:
        return True
    # Locked: the sweeper must not forget this lapsed hold while it reserves again.
    row = raw.execute("SELECT state FROM holds WHERE id = ? FOR UPDATE", (held.id,)).fetchone()
    if row is None:
        return False
    if row[0] != "open":
        cursor = raw.execute(
            "UPDATE accounts SET reserved_msat = reserved_msat + ? "
            "WHERE id = ? AND balance_msat - reserved_msat >= ?",
            (held.amount_msat, held.account_id, held.amount_msat),
        )
        if cursor.rowcount != 1:
            return False
    raw.execute(
        "UPDATE holds SET state = 'open', lease_expires_at = ? WHERE id = ?", (at + lease, held.id)
    )
    return True


def refusal(raw: SyncConn, at: int, account_id: str, amount: int) -> NodeprovError:
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
    return InsufficientBalance.of(available, amount)


def outcome(raw: SyncConn, ref: str) -> Outcome | None:
    """The recorded outcome of the job settled under ``ref``, if any."""
    row = raw.execute(
        "SELECT ref, account_id, charged_msat, cost_msat, input_msat, output_msat, result "
        "FROM job_outcomes WHERE ref = ?",
        (ref,),
    ).fetchone()
    return Outcome(*row) if row is not None else None


def request_of(held: Hold, record: Outcome | None) -> str:
    """The key the rows of one request share: a per-request token's account (its deposit,
    charge, rounding and change), a job's reference, else its hold."""
    if held.account_id.startswith("req:"):
        return held.account_id
    return record.ref if record is not None else f"hold:{held.id}"


def settle(
    raw: SyncConn,
    at: int,
    held: Hold,
    actual: int,
    ref: str,
    record: Outcome | None = None,
    channel: str | None = None,
    last: bool = False,
) -> Settlement:
    """Close ``held`` charging ``actual``, at most the hold (the overrun rule), to the operator.

    A hold whose lease lapsed (released by the sweeper) still charges what the job owes, from
    the available balance as far as it goes; the rest is written off. With ``record`` the
    outcome is stored under its ``ref`` in the same transaction, and a ``ref`` settled before
    charges nothing again (the hold is released and the first outcome returned).
    A hold settled or released before cannot be settled again. ``last``: nothing follows in
    the transaction, so its writes commit in their round trip (:meth:`SyncConn.batch`).
    """
    if record is not None:
        earlier = outcome(raw, record.ref)
        if earlier is not None:
            release(raw, held.id)
            return Settlement(earlier.charged_msat, 0, _available(raw, held.account_id), True)
    row = raw.execute(
        "SELECT h.amount_msat, h.state, a.balance_msat, a.reserved_msat, h.purpose "
        "FROM holds h JOIN accounts a ON a.id = h.account_id WHERE h.id = ? FOR UPDATE",
        (held.id,),
    ).fetchone()
    if row is None:
        raise LedgerError(f"hold {held.id} is not open (settled or released already)")
    reserved_here = row[0] if row[1] == "open" else 0
    available = row[2] - (row[3] - reserved_here)
    charged = min(actual, held.amount_msat, available)
    written_off = actual - charged
    detail = f"writeoff={written_off}" if written_off else ""
    request = request_of(held, record)
    with raw.batch(commit=last):  # nothing below is read before the block ends
        raw.execute("DELETE FROM holds WHERE id = ?", (held.id,))
        after = raw.execute(
            "UPDATE accounts SET reserved_msat = reserved_msat - ?, "
            "balance_msat = balance_msat - ?, total_spent_msat = total_spent_msat + ? "
            "WHERE id = ? RETURNING balance_msat - reserved_msat",
            (reserved_here, charged, charged, held.account_id),
        )
        if charged:
            raw.execute(CREDIT_EARNINGS, (charged, held.id % EARNING_SHARDS))
        raw.executemany(
            "INSERT INTO transactions (at, account_id, kind, delta_msat, ref, detail, request, "
            "channel, model, held_msat) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (at, held.account_id, "charge", -charged, ref, detail, request, channel, row[4],
                 held.amount_msat),
                (at, OPERATOR, "earning", charged, ref, "", request, channel, row[4], None),
            ],
        )  # fmt: skip
        if record is not None:
            raw.execute(
                "INSERT INTO job_outcomes (ref, account_id, charged_msat, cost_msat, "
                "input_msat, output_msat, result, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.ref,
                    held.account_id,
                    charged,
                    record.cost_msat,
                    record.input_msat,
                    record.output_msat,
                    record.result,
                    at,
                ),
            )
    return Settlement(charged, written_off, int(after.fetchone()[0]))


def _available(raw: SyncConn, account_id: str) -> int:
    (after,) = raw.execute(
        "SELECT balance_msat - reserved_msat FROM accounts WHERE id = ?", (account_id,)
    ).fetchone()
    return int(after)


def release(raw: SyncConn, hold_id: int) -> None:
    """Close a hold without charging; a hold already gone is a no-op."""
    row = raw.execute(
        "DELETE FROM holds WHERE id = ? RETURNING account_id, amount_msat, state", (hold_id,)
    ).fetchone()
    if row is None:  # gone already (settled, released): only one closer gets the row
        return
    if row[2] == "open":
        raw.execute(
            "UPDATE accounts SET reserved_msat = reserved_msat - ? WHERE id = ?", (row[1], row[0])
        )


def release_ref(raw: SyncConn, ref: str) -> int:
    """Release every hold taken under ``ref`` (left by an interrupted run of that job)."""
    ids = [row[0] for row in raw.execute("SELECT id FROM holds WHERE ref = ?", (ref,))]
    for hold_id in ids:
        release(raw, hold_id)
    return len(ids)


def fold_earnings(raw: SyncConn) -> int:
    """Move the shards' unfolded earnings into the operator's account row; how much moved."""
    shards = raw.execute(FOLD_TAKE).fetchall()
    raw.executemany(FOLD_SHARD, [(amount, shard) for shard, amount in shards])
    total = sum(int(amount) for _, amount in shards)
    if total:
        raw.execute(FOLD_INTO, (total,))
    return total


def release_lapsed(raw: SyncConn, at: int) -> int:
    """Stop reserving for every open hold whose lease lapsed at ``at``; how many there were.

    Only a lapsed lease is released: a running job renews its own, whichever process runs it,
    so a live hold is never taken from under its job. A lapsed hold is kept for a day so a job
    that still finishes settles what it owes (:func:`settle`); old outcomes are forgotten.
    """
    # One conditional UPDATE: a hold settled or renewed meanwhile (by another process) is
    # not lapsed any more when this reaches its row, and is left alone.
    lapsed = raw.execute(
        "UPDATE holds SET state = 'expired' WHERE state = 'open' AND lease_expires_at <= ? "
        "RETURNING account_id, amount_msat",
        (at,),
    ).fetchall()
    for account_id, amount in lapsed:
        raw.execute(
            "UPDATE accounts SET reserved_msat = reserved_msat - ? WHERE id = ?",
            (amount, account_id),
        )
    raw.execute(
        "DELETE FROM holds WHERE state = 'expired' AND lease_expires_at <= ?", (at - LAPSED_KEEP,)
    )
    raw.execute("DELETE FROM job_outcomes WHERE at <= ?", (at - OUTCOME_KEEP,))
    auth_events.prune(raw, at)  # used NIP-98 events past their window
    fold_earnings(raw)  # the sweeper's round keeps the operator's account row current too
    return len(lapsed)
