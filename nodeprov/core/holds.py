"""The per-request hot path of the ledger: hold, renew, settle, release.

Each is plain synchronous sqlite3 code run as one transaction in the writer's thread
(:meth:`Database.transact`), so a paid request costs two short transactions and two
thread hops in all. The rules are documented on :mod:`nodeprov.core.ledger`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeprov.core import auth_events
from nodeprov.core.child_holds import (
    CHILD_RESERVE,
    CHILD_UNRESERVE,
    child_refusal,
    child_reserves_again,
)
from nodeprov.core.db import SyncConn
from nodeprov.errors import (
    AccountExpired,
    InsufficientBalance,
    LedgerError,
    NodeprovError,
    Unauthorized,
)
from nodeprov.protocol.child_keys import remaining_msat, spendable_msat

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
# A hold reserves on an account whose owner is live, unexpired and has the balance; a child
# key's hold reserves on its parent's account by the same statement, and on the child's own
# remaining limit by the next one, in the same transaction. Every path that touches both
# locks the parent's row before the child's (holds, then accounts, then child_keys).
RESERVE = (
    "UPDATE accounts SET reserved_msat = reserved_msat + ?, last_used_at = ? "
    "WHERE id = ? AND revoked = 0 AND (expires_at IS NULL OR expires_at > ?) "
    "AND balance_msat - reserved_msat >= ?"
)
UNRESERVE = "UPDATE accounts SET reserved_msat = reserved_msat - ? WHERE id = ?"


@dataclass(frozen=True)
class Hold:
    id: int
    account_id: str  # the account it reserves on (a child key's parent)
    amount_msat: int
    child_id: str | None = None  # the child key that took it, if one did


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

    ``account_id`` may name a child key (``key:…`` with no account of its own): the hold
    then reserves on its parent's account and on the child's remaining limit.
    ``last``: nothing follows in the transaction, so the hold's row commits with it (one
    round trip on PostgreSQL, :meth:`SyncConn.batch`).
    """
    if raw.execute(RESERVE, (amount, at, account_id, at, amount)).rowcount == 1:
        return _insert(raw, at, account_id, amount, purpose, lease, ref, None, last)
    child = raw.execute(
        "SELECT id, parent_id FROM child_keys WHERE key_account = ?", (account_id,)
    ).fetchone()
    if child is None:
        raise refusal(raw, at, account_id, amount)
    child_id, parent_id = str(child[0]), str(child[1])
    if raw.execute(RESERVE, (amount, at, parent_id, at, amount)).rowcount != 1:
        raise child_refusal(raw, at, child_id, parent_id, amount)
    if raw.execute(CHILD_RESERVE, (amount, at, child_id, at, amount)).rowcount != 1:
        raw.execute(UNRESERVE, (amount, parent_id))  # so the refusal reads the parent as it was
        raise child_refusal(raw, at, child_id, parent_id, amount)
    return _insert(raw, at, parent_id, amount, purpose, lease, ref, child_id, last)


def _insert(
    raw: SyncConn,
    at: int,
    account_id: str,
    amount: int,
    purpose: str,
    lease: int,
    ref: str | None,
    child_id: str | None,
    last: bool,
) -> Hold:
    with raw.batch(commit=last):
        inserted = raw.execute(
            "INSERT INTO holds (account_id, amount_msat, purpose, created_at, lease_expires_at,"
            " ref, child_id) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (account_id, amount, purpose, at, at + lease, ref, child_id),
        )
    (hold_id,) = inserted.fetchone()
    return Hold(int(hold_id), account_id, amount, child_id)


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
    row = raw.execute(
        "SELECT state, child_id FROM holds WHERE id = ? FOR UPDATE", (held.id,)
    ).fetchone()
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
        if row[1] is not None and not child_reserves_again(raw, str(row[1]), held.amount_msat):
            raw.execute(UNRESERVE, (held.amount_msat, held.account_id))
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
            available = _available(raw, held.account_id, held.child_id)
            return Settlement(earlier.charged_msat, 0, available, True)
    row = raw.execute(
        "SELECT h.amount_msat, h.state, a.balance_msat, a.reserved_msat, h.purpose, h.child_id "
        "FROM holds h JOIN accounts a ON a.id = h.account_id WHERE h.id = ? FOR UPDATE",
        (held.id,),
    ).fetchone()
    if row is None:
        raise LedgerError(f"hold {held.id} is not open (settled or released already)")
    reserved_here = row[0] if row[1] == "open" else 0
    available = row[2] - (row[3] - reserved_here)
    charged = min(actual, held.amount_msat, available)
    child_id: str | None = row[5]
    if child_id is not None:
        # A child is charged within its limit too: a lapsed hold no longer reserved on it.
        limit = raw.execute(
            "SELECT limit_msat, spent_msat, reserved_msat FROM child_keys WHERE id = ? FOR UPDATE",
            (child_id,),
        ).fetchone()
        room = remaining_msat(limit[0], int(limit[1]), int(limit[2]) - reserved_here)
        if room is not None:
            charged = min(charged, room)
    written_off = actual - charged
    notes = [f"writeoff={written_off}"] if written_off else []
    notes += [f"child={child_id}"] if child_id is not None else []
    detail = " ".join(notes)
    request = request_of(held, record)
    with raw.batch(commit=last):  # nothing below is read before the block ends
        raw.execute("DELETE FROM holds WHERE id = ?", (held.id,))
        after = raw.execute(
            "UPDATE accounts SET reserved_msat = reserved_msat - ?, "
            "balance_msat = balance_msat - ?, total_spent_msat = total_spent_msat + ? "
            "WHERE id = ? RETURNING balance_msat - reserved_msat",
            (reserved_here, charged, charged, held.account_id),
        )
        if child_id is not None:
            child_after = raw.execute(
                "UPDATE child_keys SET reserved_msat = reserved_msat - ?, "
                "spent_msat = spent_msat + ? WHERE id = ? "
                "RETURNING limit_msat, spent_msat, reserved_msat",
                (reserved_here, charged, child_id),
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
    left = int(after.fetchone()[0])
    if child_id is not None:  # what the child may still spend, not its parent's balance
        limit_after, spent_after, reserved_after = child_after.fetchone()
        left = spendable_msat(left, limit_after, int(spent_after), int(reserved_after))
    return Settlement(charged, written_off, left)


def _available(raw: SyncConn, account_id: str, child_id: str | None = None) -> int:
    """The account's available balance; for a child key, what the child may still spend."""
    (after,) = raw.execute(
        "SELECT balance_msat - reserved_msat FROM accounts WHERE id = ?", (account_id,)
    ).fetchone()
    if child_id is None:
        return int(after)
    row = raw.execute(
        "SELECT limit_msat, spent_msat, reserved_msat FROM child_keys WHERE id = ?", (child_id,)
    ).fetchone()
    return spendable_msat(int(after), row[0], int(row[1]), int(row[2]))


def release(raw: SyncConn, hold_id: int) -> None:
    """Close a hold without charging; a hold already gone is a no-op."""
    row = raw.execute(
        "DELETE FROM holds WHERE id = ? RETURNING account_id, amount_msat, state, child_id",
        (hold_id,),
    ).fetchone()
    if row is None:  # gone already (settled, released): only one closer gets the row
        return
    if row[2] == "open":
        raw.execute(UNRESERVE, (row[1], row[0]))
        if row[3] is not None:
            raw.execute(CHILD_UNRESERVE, (row[1], row[3]))


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
        "RETURNING account_id, amount_msat, child_id",
        (at,),
    ).fetchall()
    for account_id, amount, child_id in lapsed:
        raw.execute(UNRESERVE, (amount, account_id))
        if child_id is not None:
            raw.execute(CHILD_UNRESERVE, (amount, child_id))
    raw.execute(
        "DELETE FROM holds WHERE state = 'expired' AND lease_expires_at <= ?", (at - LAPSED_KEEP,)
    )
    raw.execute("DELETE FROM job_outcomes WHERE at <= ?", (at - OUTCOME_KEEP,))
    auth_events.prune(raw, at)  # used NIP-98 events past their window
    fold_earnings(raw)  # the sweeper's round keeps the operator's account row current too
    return len(lapsed)
