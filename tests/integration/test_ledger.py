"""The ledger on a real SQLite file: migrations, holds, settlement, overruns, the audit.

Accounts are funded the way a receive does it, in one write transaction: the account is
credited, the books' asset moves by the same amount, and proof rows of that value are
stored. No mint is involved, but the audit sees consistent books.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nodeprov.core import journal
from nodeprov.core.db import Migration
from nodeprov.core.denominations import complete_split
from nodeprov.core.ledger import (
    OPERATOR,
    Hold,
    Ledger,
    add_asset,
    credit,
    debit,
    ensure_account,
    now,
    open_ledger,
)
from nodeprov.daemon import books
from nodeprov.errors import AccountExpired, InsufficientBalance, LedgerError, Unauthorized
from nodeprov.protocol.cashu_token import Proof
from tests.support.ledger_backends import ledger_target

MINT = "http://mint.invalid"
pytestmark = pytest.mark.usefixtures("ledger_backend")


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = await open_ledger(ledger_target(tmp_path / "ledger.sqlite3"))
    try:
        yield opened
        await assert_audit_ok(opened)
    finally:
        await opened.db.close()


async def assert_audit_ok(ledger: Ledger) -> None:
    report = await ledger.audit()
    assert report.ok, report


async def fund(
    ledger: Ledger,
    account_id: str,
    amount_msat: int,
    *,
    kind: str = "api_key",
    expires_at: int | None = None,
) -> None:
    """Deposit ``amount_msat`` the way a receive does: credit, asset and proofs together."""
    proofs = [
        Proof(amount, "00ffd48b8f5ecf80", secrets.token_hex(32), "02" + secrets.token_hex(32))
        for amount in complete_split(amount_msat)
    ]
    async with ledger.db.write() as conn:
        await ensure_account(conn, account_id, kind, expires_at=expires_at)
        await credit(conn, account_id, amount_msat, "deposit", "test")
        await add_asset(conn, MINT, "msat", amount_msat)
        op_id = await journal.insert_op(
            conn,
            kind="receive",
            state="done",
            mint_url=MINT,
            unit="msat",
            account_id=account_id,
            amount=amount_msat,
            inputs=(),
            outputs=(),
        )
        await journal.store_proofs(conn, MINT, "msat", proofs, "unspent", op_id)


async def balances(ledger: Ledger, account_id: str) -> tuple[int, int]:
    account = await ledger.account(account_id)
    assert account is not None
    return account.balance_msat, account.reserved_msat


# --- migrations -----------------------------------------------------------------------


async def test_migrations_are_recorded_and_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    extra = [
        Migration("0100_test_extra", "CREATE TABLE extra (a INTEGER); INSERT INTO extra VALUES (1)")
    ]
    first = await open_ledger(ledger_target(path), extra)
    try:
        rows = await first.db.fetchall("SELECT name, applied_at FROM migrations ORDER BY name")
        names = [r["name"] for r in rows]
        assert names == [
            "0001_accounts_holds_transactions",
            "0002_wallet_journal",
            "0003_hold_state",
            "0004_lightning_funding",
            "0005_key_refunds",
            "0006_payouts",
            "0007_hold_leases_job_outcomes",
            "0008_wallet_ops_ref",
            "0009_hold_ids_never_reused",
            "0100_nostr_dm_jobs",
            "0100_test_extra",
            "0101_request_channel_and_key_hint",
            "0102_operator_earnings_shards",
            "0110_nip98_replay",
            "0120_child_keys",
            "0130_nip90_jobs",
        ]
        applied = {r["name"]: r["applied_at"] for r in rows}
        await fund(first, "key:m", 5000)
    finally:
        await first.db.close()

    again = await open_ledger(ledger_target(path), extra)
    try:
        rows = await again.db.fetchall("SELECT name, applied_at FROM migrations ORDER BY name")
        assert {r["name"]: r["applied_at"] for r in rows} == applied
        # The extra migration's INSERT ran once; the data survived the re-open.
        assert [tuple(r) for r in await again.db.fetchall("SELECT a FROM extra")] == [(1,)]
        assert await balances(again, "key:m") == (5000, 0)
        operators = await again.db.fetchall("SELECT id FROM accounts WHERE kind = 'operator'")
        assert [r[0] for r in operators] == [OPERATOR]
        await assert_audit_ok(again)
    finally:
        await again.db.close()


async def test_new_migration_is_applied_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    first = await open_ledger(ledger_target(path))
    await first.db.close()
    later = await open_ledger(
        ledger_target(path), [Migration("0100_later", "CREATE TABLE later (a INTEGER)")]
    )
    try:
        rows = await later.db.fetchall("SELECT name FROM migrations WHERE name = '0100_later'")
        assert len(rows) == 1
        assert await later.db.fetchall("SELECT * FROM later") == []
    finally:
        await later.db.close()


async def test_failed_migration_applies_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    broken = Migration("0100_broken", "CREATE TABLE half (a INTEGER); NOT SQL AT ALL")
    with pytest.raises(Exception, match="syntax"):
        await open_ledger(ledger_target(path), [broken])
    fixed = await open_ledger(
        ledger_target(path), [Migration("0100_broken", "CREATE TABLE half (a INTEGER)")]
    )
    try:
        rows = await fixed.db.fetchall("SELECT name FROM migrations ORDER BY name")
        assert [r[0] for r in rows].count("0100_broken") == 1
        await assert_audit_ok(fixed)
    finally:
        await fixed.db.close()


# --- holds and settlement -------------------------------------------------------------


async def test_earnings_gather_in_shards_count_at_once_and_fold_into_the_operator_row(
    ledger: Ledger,
) -> None:
    """Charges credit shards, not the operator's one row (a hot row every writer would queue
    on); the operator's balance, the audit and a payout see them before and after a fold."""
    await fund(ledger, "key:a", 10_000)
    for amount in (100, 200, 300):
        await ledger.settle(await ledger.hold("key:a", amount), amount, ref="m")
    row = await ledger.db.fetchone("SELECT balance_msat FROM accounts WHERE id = 'operator'")
    assert row[0] == 0  # nothing touched the operator's row
    assert await balances(ledger, OPERATOR) == (600, 0)
    await assert_audit_ok(ledger)

    async with ledger.db.write() as conn:  # a debit (a payout's) folds what it pays from
        await debit(conn, OPERATOR, 550, "transfer", "p")
        await ensure_account(conn, "key:b", "api_key")
        await credit(conn, "key:b", 550, "transfer", "p")
    assert await balances(ledger, OPERATOR) == (50, 0)
    row = await ledger.db.fetchone("SELECT balance_msat FROM accounts WHERE id = 'operator'")
    assert row[0] == 50
    await ledger.settle(await ledger.hold("key:a", 7), 7, ref="m")
    await ledger.release_stale_holds()  # the sweeper's round folds too
    row = await ledger.db.fetchone("SELECT balance_msat FROM accounts WHERE id = 'operator'")
    assert row[0] == 57
    assert (await ledger.db.fetchone("SELECT SUM(unfolded_msat) FROM operator_earnings"))[0] == 0


async def test_hold_settle_release_arithmetic(ledger: Ledger) -> None:
    await fund(ledger, "key:a", 10_000)
    first = await ledger.hold("key:a", 3_000)
    second = await ledger.hold("key:a", 2_500)
    assert await balances(ledger, "key:a") == (10_000, 5_500)
    account = await ledger.account("key:a")
    assert account is not None and account.available_msat == 4_500

    settled = await ledger.settle(first, 1_234, ref="m")
    assert (settled.charged_msat, settled.written_off_msat) == (1_234, 0)
    assert await balances(ledger, "key:a") == (8_766, 2_500)

    await ledger.release(second)
    assert await balances(ledger, "key:a") == (8_766, 0)
    assert await balances(ledger, OPERATOR) == (1_234, 0)

    account = await ledger.account("key:a")
    assert account is not None
    assert account.total_deposited_msat == 10_000
    assert account.total_spent_msat == 1_234
    log = await ledger.transactions("key:a")
    assert [(t["kind"], t["delta_msat"]) for t in reversed(log)] == [
        ("deposit", 10_000),
        ("charge", -1_234),
    ]
    assert await ledger.db.fetchall("SELECT * FROM holds") == []


async def test_settle_exactly_the_hold_and_zero(ledger: Ledger) -> None:
    await fund(ledger, "key:z", 5_000)
    full = await ledger.hold("key:z", 5_000)
    with pytest.raises(InsufficientBalance):
        await ledger.hold("key:z", 1)
    assert (await ledger.settle(full, 5_000)).charged_msat == 5_000
    assert await balances(ledger, "key:z") == (0, 0)
    free = await ledger.hold("key:z", 0)
    assert (await ledger.settle(free, 0)).charged_msat == 0
    assert await balances(ledger, OPERATOR) == (5_000, 0)


async def test_overrun_is_capped_at_the_hold_and_written_off(ledger: Ledger) -> None:
    """The overrun rule: nobody pays more than the hold it was quoted, whatever its balance."""
    await fund(ledger, "key:o", 10_000)
    hold = await ledger.hold("key:o", 3_000)
    settled = await ledger.settle(hold, 5_000, ref="over")
    assert (settled.charged_msat, settled.written_off_msat) == (3_000, 2_000)
    assert await balances(ledger, "key:o") == (7_000, 0)
    charge = [t for t in await ledger.transactions("key:o") if t["ref"] == "over"]
    assert [(t["delta_msat"], t["detail"]) for t in charge] == [(-3_000, "writeoff=2000")]


async def test_overrun_beyond_balance_is_written_off(ledger: Ledger) -> None:
    await fund(ledger, "key:w", 4_000)
    hold = await ledger.hold("key:w", 3_000)
    other = await ledger.hold("key:w", 1_000)
    settled = await ledger.settle(hold, 5_000, ref="big")
    assert (settled.charged_msat, settled.written_off_msat) == (3_000, 2_000)
    assert await balances(ledger, "key:w") == (1_000, 1_000)
    # The other job's hold is untouched and still settles in full.
    assert (await ledger.settle(other, 1_000)).charged_msat == 1_000
    assert await balances(ledger, "key:w") == (0, 0)
    assert await balances(ledger, OPERATOR) == (4_000, 0)
    charge = [t for t in await ledger.transactions("key:w") if t["ref"] == "big"]
    assert [(t["delta_msat"], t["detail"]) for t in charge] == [(-3_000, "writeoff=2000")]


async def test_overrun_on_an_empty_available_balance(ledger: Ledger) -> None:
    await fund(ledger, "key:e", 2_000)
    hold = await ledger.hold("key:e", 2_000)
    settled = await ledger.settle(hold, 1_000_000)
    assert (settled.charged_msat, settled.written_off_msat) == (2_000, 998_000)
    assert await balances(ledger, "key:e") == (0, 0)


async def test_settle_unknown_or_closed_hold_raises(ledger: Ledger) -> None:
    await fund(ledger, "key:u", 1_000)
    with pytest.raises(LedgerError):
        await ledger.settle(Hold(987_654, "key:u", 100), 10)
    hold = await ledger.hold("key:u", 500)
    await ledger.settle(hold, 100)
    with pytest.raises(LedgerError):
        await ledger.settle(hold, 100)
    released = await ledger.hold("key:u", 500)
    await ledger.release(released)
    await ledger.release(released)  # releasing twice is harmless
    with pytest.raises(LedgerError):
        await ledger.settle(released, 100)
    assert await balances(ledger, "key:u") == (900, 0)


async def test_settle_rejects_bad_amounts(ledger: Ledger) -> None:
    await fund(ledger, "key:b", 1_000)
    hold = await ledger.hold("key:b", 500)
    with pytest.raises(LedgerError):
        await ledger.settle(hold, -1)
    with pytest.raises(TypeError):
        await ledger.settle(hold, 1.5)  # type: ignore[arg-type]
    assert await balances(ledger, "key:b") == (1_000, 500)
    await ledger.release(hold)


async def test_hold_rejects_bad_amounts(ledger: Ledger) -> None:
    await fund(ledger, "key:n", 1_000)
    kept = await ledger.hold("key:n", 600)
    with pytest.raises(LedgerError):
        await ledger.hold("key:n", -500)
    with pytest.raises(TypeError):
        await ledger.hold("key:n", 1.0)  # type: ignore[arg-type]
    assert await balances(ledger, "key:n") == (1_000, 600)
    await ledger.release(kept)


# --- refusals -------------------------------------------------------------------------


async def test_hold_on_unknown_account_is_unauthorized(ledger: Ledger) -> None:
    with pytest.raises(Unauthorized) as info:
        await ledger.hold("key:nobody", 1)
    assert info.value.status == 401


async def test_hold_on_revoked_account_is_unauthorized(ledger: Ledger) -> None:
    await fund(ledger, "key:r", 5_000)
    async with ledger.db.write() as conn:
        await conn.execute("UPDATE accounts SET revoked = 1 WHERE id = 'key:r'")
    with pytest.raises(Unauthorized):
        await ledger.hold("key:r", 1)


async def test_hold_on_expired_account(ledger: Ledger) -> None:
    await fund(ledger, "key:x", 5_000, expires_at=now() - 1)
    with pytest.raises(AccountExpired) as info:
        await ledger.hold("key:x", 1)
    assert info.value.status == 401
    await fund(ledger, "key:later", 5_000, expires_at=now() + 3600)
    await ledger.release(await ledger.hold("key:later", 1))


@pytest.mark.parametrize(
    ("funded", "held", "asked", "current", "required"),
    [
        (2_500, 0, 3_001, 2, 4),
        (10_000, 9_000, 1_500, 1, 2),
        (0, 0, 1, 0, 1),
        (999, 0, 1_000, 0, 1),
    ],
)
async def test_insufficient_balance_message(
    ledger: Ledger, funded: int, held: int, asked: int, current: int, required: int
) -> None:
    if funded:
        await fund(ledger, "key:i", funded)
    else:
        await ledger.open_account("key:i", "api_key")
    blocking = await ledger.hold("key:i", held)
    with pytest.raises(InsufficientBalance) as info:
        await ledger.hold("key:i", asked)
    error = info.value
    assert error.status == 402
    assert (
        error.message == f"Insufficient balance. Current: {current} sats, Required: {required} "
        f"sats ({funded - held} msat available, {asked} msat required)"
    )
    assert error.details == {"available_msat": funded - held, "required_msat": asked}
    assert error.to_openai()["error"]["code"] == "insufficient_balance"
    assert await balances(ledger, "key:i") == (funded, held)
    await ledger.release(blocking)


# --- stale holds ----------------------------------------------------------------------


async def test_release_stale_holds_keeps_live_leases(ledger: Ledger) -> None:
    """Start-up and the sweeper release only lapsed leases, never a live job's hold."""
    await fund(ledger, "key:s", 10_000)
    for amount in (1_000, 2_000, 3_000):
        await ledger.hold("key:s", amount)
    assert await balances(ledger, "key:s") == (10_000, 6_000)
    assert await ledger.release_stale_holds() == 0
    assert await balances(ledger, "key:s") == (10_000, 6_000)
    assert await ledger.release_stale_holds(at=now() + ledger.hold_timeout_seconds + 1) == 3
    assert await balances(ledger, "key:s") == (10_000, 0)


async def test_books_count_only_the_holds_of_running_jobs(ledger: Ledger) -> None:
    """A lapsed hold stays settleable for a while but reserves nothing: the books leave it out."""
    await fund(ledger, "key:b", 10_000)
    await ledger.hold("key:b", 1_000)
    await ledger.hold("key:b", 2_000)
    assert await ledger.open_holds() == (2, 3_000)
    await ledger.release_stale_holds(at=now() + ledger.hold_timeout_seconds + 1)
    totals = await books(ledger)
    assert (totals.holds, totals.held_msat) == (0, 0)


async def test_release_stale_holds_at_time_releases_only_expired(ledger: Ledger) -> None:
    await fund(ledger, "key:t", 10_000)
    short = Ledger(ledger.db, hold_timeout_seconds=10)
    long = Ledger(ledger.db, hold_timeout_seconds=1_000)
    expiring = await short.hold("key:t", 1_000)
    lasting = await long.hold("key:t", 2_000)
    assert await ledger.release_stale_holds(at=now()) == 0
    assert await ledger.release_stale_holds(at=now() + 100) == 1
    assert await balances(ledger, "key:t") == (10_000, 2_000)
    # A job whose lease lapsed still settles what it owes from the balance, and only once.
    assert (await ledger.settle(expiring, 500)).charged_msat == 500
    with pytest.raises(LedgerError):
        await ledger.settle(expiring, 500)
    assert (await ledger.settle(lasting, 500)).charged_msat == 500
    assert await balances(ledger, "key:t") == (9_000, 0)


# --- concurrency ----------------------------------------------------------------------


async def test_concurrent_holds_never_overdraw(ledger: Ledger) -> None:
    amount = 1_337
    await fund(ledger, "key:c", 50 * amount)
    violations: list[tuple[int, int]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            balance, reserved = await balances(ledger, "key:c")
            if not 0 <= reserved <= balance:
                violations.append((balance, reserved))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(
        *(ledger.hold("key:c", amount) for _ in range(200)), return_exceptions=True
    )
    holds = [r for r in results if isinstance(r, Hold)]
    refused = [r for r in results if not isinstance(r, Hold)]
    assert len(holds) == 50
    assert len(refused) == 150 and all(isinstance(r, InsufficientBalance) for r in refused)
    assert await balances(ledger, "key:c") == (50 * amount, 50 * amount)

    # Settle them concurrently; half overrun their hold by far (paid or written off).
    costs = [amount * 3 if i % 2 else amount // 2 for i in range(50)]
    settled = await asyncio.gather(
        *(ledger.settle(h, c) for h, c in zip(holds, costs, strict=True))
    )
    stop.set()
    await watcher
    assert violations == []
    charged = sum(s.charged_msat for s in settled)
    assert all(
        s.charged_msat + s.written_off_msat == c for s, c in zip(settled, costs, strict=True)
    )
    balance, reserved = await balances(ledger, "key:c")
    assert reserved == 0 and balance == 50 * amount - charged >= 0
    assert await balances(ledger, OPERATOR) == (charged, 0)


async def test_two_ledgers_on_one_file_never_overdraw(tmp_path: Path) -> None:
    """Two connections (as two processes would have) race through SQLite's own locking."""
    path = tmp_path / "shared.sqlite3"
    one = await open_ledger(ledger_target(path))
    two = await open_ledger(ledger_target(path))
    try:
        await fund(one, "key:p", 30 * 1_000)
        results = await asyncio.gather(
            *(ledger.hold("key:p", 1_000) for _ in range(40) for ledger in (one, two)),
            return_exceptions=True,
        )
        holds = [r for r in results if isinstance(r, Hold)]
        assert len(holds) == 30
        assert all(isinstance(r, InsufficientBalance) for r in results if not isinstance(r, Hold))
        assert await balances(two, "key:p") == (30_000, 30_000)
        await asyncio.gather(*(one.settle(h, 1_000) for h in holds[:15]))
        await asyncio.gather(*(two.release(h) for h in holds[15:]))
        assert await balances(one, "key:p") == (15_000, 0)
        await assert_audit_ok(two)
    finally:
        await one.db.close()
        await two.db.close()


# --- the audit ------------------------------------------------------------------------


async def test_audit_of_a_fresh_ledger(ledger: Ledger) -> None:
    report = await ledger.audit()
    assert report.ok
    assert report.lines == ()
    assert report.assets_msat == report.liabilities_msat == 0


async def test_audit_after_activity(ledger: Ledger) -> None:
    await fund(ledger, "key:1", 7_000)
    await fund(ledger, "key:2", 3_000)
    await ledger.settle(await ledger.hold("key:1", 2_000), 2_500)
    open_hold = await ledger.hold("key:2", 1_000)
    report = await ledger.audit()
    assert report.ok, report
    assert report.assets_msat == report.liabilities_msat == 10_000
    assert [(line.unit, line.books_msat, line.proofs_msat) for line in report.lines] == [
        ("msat", 10_000, 10_000)
    ]
    await ledger.release(open_hold)


async def test_audit_detects_tampered_balance(ledger: Ledger) -> None:
    await fund(ledger, "key:t", 5_000)
    async with ledger.db.write() as conn:
        await conn.execute("UPDATE accounts SET balance_msat = balance_msat + 1 WHERE id = 'key:t'")
    report = await ledger.audit()
    assert not report.ok
    assert report.log_mismatches == ("balance != log for key:t",)
    assert report.liabilities_msat == report.assets_msat + 1
    async with ledger.db.write() as conn:  # undo, so the teardown audit passes
        await conn.execute("UPDATE accounts SET balance_msat = balance_msat - 1 WHERE id = 'key:t'")


async def test_audit_detects_tampered_proof(ledger: Ledger) -> None:
    await fund(ledger, "key:p", 5_000)
    row = await ledger.db.fetchone("SELECT secret, amount FROM proofs ORDER BY amount LIMIT 1")
    assert row is not None
    secret, amount = row[0], row[1]

    async def set_proof(sql: str) -> None:
        async with ledger.db.write() as conn:
            await conn.execute(sql, (secret,))

    await set_proof("UPDATE proofs SET amount = amount * 2 WHERE secret = ?")
    report = await ledger.audit()
    assert not report.ok
    assert [(line.books_msat, line.proofs_msat) for line in report.lines] == [
        (5_000, 5_000 + amount)
    ]
    await set_proof("UPDATE proofs SET amount = amount / 2 WHERE secret = ?")
    await assert_audit_ok(ledger)

    # A proof marked spent behind the books' back is caught as well.
    await set_proof("UPDATE proofs SET state = 'spent' WHERE secret = ?")
    report = await ledger.audit()
    assert not report.ok
    assert [(line.books_msat, line.proofs_msat) for line in report.lines] == [
        (5_000, 5_000 - amount)
    ]
    await set_proof("UPDATE proofs SET state = 'unspent' WHERE secret = ?")


async def test_audit_detects_tampered_hold(ledger: Ledger) -> None:
    await fund(ledger, "key:h", 5_000)
    hold = await ledger.hold("key:h", 2_000)
    async with ledger.db.write() as conn:
        await conn.execute("DELETE FROM holds WHERE id = ?", (hold.id,))
    report = await ledger.audit()
    assert not report.ok
    assert report.log_mismatches == ("open holds 0 != reserved 2000",)
    async with ledger.db.write() as conn:
        await conn.execute("UPDATE accounts SET reserved_msat = 0 WHERE id = 'key:h'")


async def test_a_cancelled_write_leaves_no_transaction_open(tmp_path: Path) -> None:
    ledger = await open_ledger(ledger_target(tmp_path / "c.sqlite3"))
    try:
        for delay in (0, 0.0001, 0.001):

            async def slow_write() -> None:
                async with ledger.db.write() as conn:
                    await conn.execute("UPDATE accounts SET kind = kind WHERE id = 'operator'")
                    await asyncio.sleep(1)

            task = asyncio.create_task(slow_write())
            await asyncio.sleep(delay)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            async with ledger.db.write() as conn:  # would fail inside a leftover transaction
                await conn.execute("SELECT 1")
    finally:
        await ledger.db.close()


async def test_a_new_hold_never_takes_the_id_of_one_that_is_gone(ledger: Ledger) -> None:
    """A late settle of a closed hold must fail, not settle a newer job's hold that took its
    id (SQLite reuses the highest rowid freed unless the table says AUTOINCREMENT)."""
    await fund(ledger, "key:r", 10_000)
    first = await ledger.hold("key:r", 1_000)
    await ledger.settle(first, 500)
    second = await ledger.hold("key:r", 1_000)
    assert second.id != first.id
    with pytest.raises(LedgerError):
        await ledger.settle(first, 500)
    assert await balances(ledger, "key:r") == (9_500, 1_000)


async def test_a_read_after_a_commit_sees_it_while_other_reads_run(ledger: Ledger) -> None:
    """Found by the soak: a refund read the balance from a snapshot another read held open,
    saw the job's released hold still reserved, and paid back too little."""
    await fund(ledger, "key:a", 100_000)
    for i in range(40):
        busy = [
            asyncio.create_task(ledger.db.fetchall("SELECT * FROM transactions")) for _ in range(8)
        ]
        hold = await ledger.hold("key:a", 1_000 + i, "m")
        await ledger.release(hold)
        assert await balances(ledger, "key:a") == (100_000, 0), f"round {i}"
        await asyncio.gather(*busy)
