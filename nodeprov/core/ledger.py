"""The books: accounts, holds, the transaction log, processed ids and the audit.

Every amount is integer msat. An account's ``balance_msat`` includes what is
``reserved_msat`` by open holds; ``available = balance - reserved``. A hold reserves the
most a job can cost with one conditional ``UPDATE``, so concurrent jobs can never
overdraw an account. Every change of a balance writes a row to ``transactions`` with
the signed delta, so the log replays to the balances.

Overrun rule: every payer (API key, token as key, per-request token, npub) is charged at
most its hold, the price it was quoted before the job ran. If the actual cost exceeds
the hold (an upstream that reports more than the request allowed), the excess is written
off: logged as ``writeoff=<msat>`` on the charge's transaction, never taken from the
balance. Holds are true upper bounds (``Pricer.max_cost``), so this only happens when an
upstream misreports.

Holds are leases. A hold is taken with a lease of ``hold_timeout_seconds``; the running
job renews it (``renew``) every third of that, whichever process runs it. The sweeper and
start-up recovery release only holds whose lease lapsed (``release_stale_holds``): a
crashed process stops renewing, a live job never loses its hold. A job whose lease lapsed
(it could not renew in time) still settles what it owes: ``min(cost, hold, available)``.
If the balance was spent meanwhile (a withdrawal, change claimed), the shortfall is
written off like an overrun: the node loses it, the payer's balance never goes negative.

A settle may carry a reference (``dm:<event id>``): its outcome is recorded in
``job_outcomes`` in the same transaction, and a second settle with that reference charges
nothing (a resumed job finds the first outcome instead of paying twice). A hold carries
its job's reference too, so a resumed job releases what its interrupted run held
(``release_ref``) instead of waiting for that lease to lapse; a reference names one job,
which only one process runs (the DM listener).

Accounts are keyed ``key:<sha256 of an API key>``, ``token:<token fingerprint>`` (a
token used as a key), ``req:<token fingerprint>`` (a per-request token), ``npub:<hex>``
and the single ``operator`` account that collects earnings. A child key (``child_keys``,
:mod:`nodeprov.core.child_keys`) has no account: its holds reserve on its parent's account and
on its own limit, and its charges are the parent's (``child=<id>`` on the charge's row).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from nodeprov.core import holds
from nodeprov.core.audit import AuditLine as AuditLine
from nodeprov.core.audit import AuditReport as AuditReport
from nodeprov.core.audit import audit_books
from nodeprov.core.db import Conn, Database, Migration, fetchone, open_database
from nodeprov.core.holds import OPERATOR as OPERATOR
from nodeprov.core.holds import Hold as Hold
from nodeprov.core.holds import Outcome as Outcome
from nodeprov.core.holds import Settlement as Settlement
from nodeprov.core.money import Msat, msat
from nodeprov.core.schema import MIGRATIONS
from nodeprov.errors import InsufficientBalance, LedgerError


@dataclass(frozen=True)
class Account:
    id: str
    kind: str
    balance_msat: int
    reserved_msat: int
    total_deposited_msat: int
    total_spent_msat: int
    created_at: int
    last_used_at: int | None
    expires_at: int | None
    refund_address: str | None
    revoked: bool
    key_hint: str | None = None  # an API key's masked form (``sk-xNKv…9f2Q``), when known

    @property
    def available_msat(self) -> int:
        return self.balance_msat - self.reserved_msat


def now() -> int:
    return int(time.time())


# --- statements used inside a write transaction (the wallet journal uses these too) ---


async def ensure_account(
    conn: Conn,
    account_id: str,
    kind: str,
    *,
    expires_at: int | None = None,
    refund_address: str | None = None,
    key_hint: str | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO accounts (id, kind, created_at, expires_at, refund_address, key_hint) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (account_id, kind, now(), expires_at, refund_address, key_hint),
    )


async def credit(conn: Conn, account_id: str, amount: int, kind: str, ref: str = "") -> None:
    """Add ``amount`` msat to an existing account and log it."""
    msat(amount)
    deposited = amount if kind == "deposit" else 0
    if account_id == OPERATOR and not deposited:  # into a shard: see holds.EARNING_SHARDS
        shard = secrets.randbelow(holds.EARNING_SHARDS)
        await conn.execute(holds.CREDIT_EARNINGS, (amount, shard))
        await log(conn, account_id, kind, amount, ref)
        return
    cursor = await conn.execute(
        "UPDATE accounts SET balance_msat = balance_msat + ?, "
        "total_deposited_msat = total_deposited_msat + ? WHERE id = ?",
        (amount, deposited, account_id),
    )
    if cursor.rowcount != 1:
        raise LedgerError(f"no account {account_id}")
    await log(conn, account_id, kind, amount, ref)


async def debit(conn: Conn, account_id: str, amount: int, kind: str, ref: str = "") -> None:
    """Take ``amount`` msat from an account's available balance, or raise InsufficientBalance."""
    msat(amount)
    if account_id == OPERATOR:
        await fold_earnings(conn)
    cursor = await conn.execute(
        "UPDATE accounts SET balance_msat = balance_msat - ? "
        "WHERE id = ? AND balance_msat - reserved_msat >= ?",
        (amount, account_id, amount),
    )
    if cursor.rowcount != 1:
        raise InsufficientBalance(f"Insufficient balance for {amount} msat")
    await log(conn, account_id, kind, -amount, ref)


async def fold_earnings(conn: Conn) -> int:
    """:func:`holds.fold_earnings` inside a write block."""
    shards = list(await (await conn.execute(holds.FOLD_TAKE)).fetchall())
    await conn.executemany(holds.FOLD_SHARD, [(amount, shard) for shard, amount in shards])
    total = sum(int(amount) for _, amount in shards)
    if total:
        await conn.execute(holds.FOLD_INTO, (total,))
    return total


async def log(
    conn: Conn,
    account_id: str,
    kind: str,
    delta: int,
    ref: str = "",
    detail: str = "",
) -> None:
    await conn.execute(
        "INSERT INTO transactions (at, account_id, kind, delta_msat, ref, detail) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (now(), account_id, kind, delta, ref, detail),
    )


async def add_asset(conn: Conn, mint_url: str, unit: str, delta: int) -> None:
    """Move the books' record of what the node holds at ``mint_url`` in ``unit``."""
    await conn.execute(
        "INSERT INTO assets (mint_url, unit, value_msat) VALUES (?, ?, ?) "
        "ON CONFLICT (mint_url, unit) DO UPDATE SET "
        "value_msat = assets.value_msat + excluded.value_msat",
        (mint_url, unit, delta),
    )


async def mark_processed(conn: Conn, kind: str, item_id: str) -> bool:
    """Record ``item_id`` as processed; False if it already was (exactly-once gate)."""
    cursor = await conn.execute(
        "INSERT INTO processed (kind, id, at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        (kind, item_id, now()),
    )
    return bool(cursor.rowcount == 1)


async def unmark_processed(conn: Conn, kind: str, item_id: str) -> None:
    await conn.execute("DELETE FROM processed WHERE kind = ? AND id = ?", (kind, item_id))


# An account row as Account reads it: the operator's balance includes its unfolded earnings.
ACCOUNT_ROW = (
    "SELECT id, kind, balance_msat + CASE WHEN id = 'operator' THEN "
    f"({holds.UNFOLDED_EARNINGS}) ELSE 0 END AS balance_msat, reserved_msat, "
    "total_deposited_msat, total_spent_msat, created_at, last_used_at, expires_at, "
    "refund_address, revoked, key_hint FROM accounts"
)


def _account(row: Any) -> Account:
    return Account(
        id=row["id"],
        kind=row["kind"],
        balance_msat=row["balance_msat"],
        reserved_msat=row["reserved_msat"],
        total_deposited_msat=row["total_deposited_msat"],
        total_spent_msat=row["total_spent_msat"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        expires_at=row["expires_at"],
        refund_address=row["refund_address"],
        revoked=bool(row["revoked"]),
        key_hint=row["key_hint"],
    )


class Ledger:
    """Balances and holds over one :class:`Database`.

    ``hold_timeout_seconds`` is a hold's lease; ``clock`` (Unix seconds) dates holds,
    leases and charges (tests pass a clock they move).
    """

    def __init__(
        self, db: Database, *, hold_timeout_seconds: int = 900, clock: Callable[[], int] = now
    ) -> None:
        self.db = db
        self.hold_timeout_seconds = hold_timeout_seconds
        self.clock = clock

    async def account(self, account_id: str) -> Account | None:
        row = await self.db.fetchone(f"{ACCOUNT_ROW} WHERE id = ?", (account_id,))
        return _account(row) if row else None

    async def accounts(self, kind: str | None = None, limit: int = 1000) -> list[Account]:
        if kind is None:
            rows = await self.db.fetchall(f"{ACCOUNT_ROW} ORDER BY id LIMIT ?", (limit,))
        else:
            rows = await self.db.fetchall(
                f"{ACCOUNT_ROW} WHERE kind = ? ORDER BY id LIMIT ?", (kind, limit)
            )
        return [_account(r) for r in rows]

    async def open_account(
        self,
        account_id: str,
        kind: str,
        *,
        expires_at: int | None = None,
        refund_address: str | None = None,
        key_hint: str | None = None,
    ) -> Account:
        async with self.db.write() as conn:
            await ensure_account(
                conn, account_id, kind, expires_at=expires_at, refund_address=refund_address,
                key_hint=key_hint,
            )  # fmt: skip
            row = await fetchone(conn, f"{ACCOUNT_ROW} WHERE id = ?", (account_id,))
        if row is None:  # pragma: no cover - the insert above guarantees it
            raise LedgerError(f"account {account_id} vanished")
        return _account(row)

    async def drop_empty_account(self, account_id: str) -> None:
        """Remove an account that never held money (a key whose funding token failed)."""
        async with self.db.write() as conn:
            await conn.execute(
                "DELETE FROM accounts WHERE id = ? AND balance_msat = 0 AND NOT EXISTS "
                "(SELECT 1 FROM transactions WHERE account_id = ?)",
                (account_id, account_id),
            )

    async def hold(
        self, account_id: str, amount: Msat | int, purpose: str = "job", ref: str | None = None
    ) -> Hold:
        """Reserve ``amount`` msat of an account's available balance for one job (``ref``)."""
        msat(amount)
        if amount < 0:
            raise LedgerError("a hold cannot be negative")
        return await self.db.transact(
            partial(
                holds.hold,
                at=self.clock(),
                account_id=account_id,
                amount=int(amount),
                purpose=purpose,
                lease=self.hold_timeout_seconds,
                ref=ref,
                last=True,
            )
        )

    async def release_ref(self, ref: str) -> int:
        """Release the holds an interrupted run of job ``ref`` left (it is being run again)."""
        return await self.db.transact(partial(holds.release_ref, ref=ref))

    async def renew(self, hold: Hold) -> bool:
        """Extend ``hold``'s lease (a running job calls this); False if it no longer reserves."""
        return await self.db.transact(
            partial(holds.renew, at=self.clock(), held=hold, lease=self.hold_timeout_seconds)
        )

    async def settle(
        self,
        hold: Hold,
        actual: Msat | int,
        ref: str = "",
        *,
        record: Outcome | None = None,
        channel: str | None = None,
    ) -> Settlement:
        """Close ``hold`` charging ``actual`` msat, at most the hold (the overrun rule).

        With ``record``, the outcome is kept under ``record.ref`` in the same transaction and
        a reference settled before charges nothing again. ``channel`` (http, nostr) is kept
        on the charge's rows.
        """
        msat(actual)
        if actual < 0:
            raise LedgerError("a cost cannot be negative")
        return await self.db.transact(
            partial(
                holds.settle,
                at=self.clock(),
                held=hold,
                actual=int(actual),
                ref=ref,
                record=record,
                channel=channel,
                last=True,
            )
        )

    async def outcome(self, ref: str) -> Outcome | None:
        """The recorded outcome of the job settled under ``ref``."""
        return await self.db.snapshot(partial(holds.outcome, ref=ref))

    async def release(self, hold: Hold) -> None:
        """Close ``hold`` without charging anything."""
        await self.db.transact(partial(holds.release, hold_id=hold.id))

    async def open_holds(self) -> tuple[int, int]:
        """How many holds running jobs have open, and the msat they reserve (lapsed ones aside)."""
        row = await self.db.fetchone(
            "SELECT COUNT(*), COALESCE(SUM(amount_msat), 0) FROM holds WHERE state = 'open'"
        )
        return (int(row[0]), int(row[1])) if row is not None else (0, 0)

    async def release_stale_holds(self, at: int | None = None) -> int:
        """Release the holds whose lease lapsed by ``at`` (default: now); live ones stay."""
        when = self.clock() if at is None else at
        return await self.db.transact(partial(holds.release_lapsed, at=when))

    async def transactions(
        self, account_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        if account_id is None:
            rows = await self.db.fetchall(
                "SELECT * FROM transactions ORDER BY id DESC LIMIT ?", (limit,)
            )
        else:
            rows = await self.db.fetchall(
                "SELECT * FROM transactions WHERE account_id = ? ORDER BY id DESC LIMIT ?",
                (account_id, limit),
            )
        return [dict(r) for r in rows]

    async def audit(self) -> AuditReport:
        """Compare the books with the proofs held, per mint and unit, and replay the log."""
        return await self.db.snapshot(audit_books)


async def open_ledger(
    target: Path | str, extra: Sequence[Migration] = (), *, pool_size: int = 8, **kwargs: Any
) -> Ledger:
    """Open the books (a SQLite path or URL, a PostgreSQL URL) with every migration applied."""
    db = await open_database(target, [*MIGRATIONS, *extra], pool_size=pool_size)
    return Ledger(db, **kwargs)
