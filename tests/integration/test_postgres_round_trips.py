"""What the PostgreSQL engine sends: a transaction begins in its first statement's round trip.

Counted on the wire (libpq's protocol trace of the pooled connection): every simple query the
client sends is one round trip.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import pytest

from nodeprov.core.db_base import SyncConn
from nodeprov.core.db_postgres import PostgresDatabase
from nodeprov.core.ledger import credit, ensure_account, open_ledger
from nodeprov.errors import LedgerError

SCHEMA = "CREATE TABLE t (id TEXT PRIMARY KEY, n BIGINT NOT NULL)"


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[PostgresDatabase]:
    database = await PostgresDatabase.connect(postgres_url, [], pool_size=1)
    async with database.write() as conn:
        await conn.execute(SCHEMA)
        await conn.execute("INSERT INTO t VALUES ('a', 0)")
    try:
        yield database
    finally:
        await database.close()


async def _traced(db: PostgresDatabase, path: Path) -> IO[str]:
    """Trace the one write connection's protocol into ``path`` (keep the file open)."""
    trace = path.open("w")
    await db._on(db._writers, lambda conn: conn.pgconn.trace(trace.fileno()))
    return trace


def _round_trips(path: Path) -> int:
    """Each simple query, and each pipeline (ended by one Sync), waits for one answer."""
    return len(re.findall(r"\tF\t\d+\t(?:Query|Sync)\b", path.read_text()))


def _queries(path: Path) -> list[str]:
    """The query strings the client sent, in order."""
    return re.findall(r'\tF\t\d+\tQuery\t\s*"(.*)"$', path.read_text(), re.MULTILINE)


async def test_a_transaction_sends_begin_with_its_first_statement(
    db: PostgresDatabase, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.txt"
    traced = await _traced(db, trace)

    def work(conn: SyncConn) -> int:
        conn.execute("UPDATE t SET n = n + ? WHERE id = ?", (5, "a"))
        return int(conn.execute("SELECT n FROM t WHERE id = ?", ("a",)).fetchone()[0])

    assert await db.transact(work) == 5
    traced.flush()
    sent = _queries(trace)
    assert len(sent) == 3, sent  # BEGIN; UPDATE / SELECT / COMMIT
    assert sent[0].startswith("BEGIN; UPDATE t") and sent[-1] == "COMMIT"


async def test_a_write_block_sends_begin_with_its_first_statement(
    db: PostgresDatabase, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.txt"
    traced = await _traced(db, trace)
    async with db.write() as conn:
        cursor = await conn.execute("UPDATE t SET n = n + 1 WHERE id = ? RETURNING n", ("a",))
        assert (await cursor.fetchone())[0] == 1 and cursor.rowcount == 1
        missed = await conn.execute("UPDATE t SET n = n + 1 WHERE id = ?", ("nobody",))
        assert missed.rowcount == 0
    traced.flush()
    sent = _queries(trace)
    assert len(sent) == 3, sent
    assert sent[0].startswith("BEGIN; UPDATE t") and sent[-1] == "COMMIT"


async def test_work_that_runs_no_statement_sends_nothing(
    db: PostgresDatabase, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.txt"
    traced = await _traced(db, trace)
    assert await db.transact(lambda conn: "nothing") == "nothing"
    async with db.write():
        pass
    traced.flush()
    assert _queries(trace) == []


async def test_a_failing_first_statement_rolls_back_and_the_connection_serves_on(
    db: PostgresDatabase,
) -> None:
    def bad(conn: SyncConn) -> None:
        conn.execute("INSERT INTO t VALUES ('a', 1)")  # duplicate key

    with pytest.raises(Exception, match="duplicate key"):
        await db.transact(bad)
    with pytest.raises(Exception, match="duplicate key"):
        async with db.write() as conn:
            await conn.execute("INSERT INTO t VALUES ('a', 1)")
    rows = await db.fetchall("SELECT n FROM t WHERE id = ?", ("a",))
    assert [r[0] for r in rows] == [0]

    def good(conn: SyncConn) -> int:
        conn.execute("UPDATE t SET n = n + 2 WHERE id = ?", ("a",))
        return int(conn.execute("SELECT n FROM t WHERE id = ?", ("a",)).fetchone()[0])

    assert await db.transact(good) == 2


async def test_a_block_that_raises_after_its_first_statement_keeps_nothing(
    db: PostgresDatabase,
) -> None:
    with pytest.raises(RuntimeError):
        async with db.write() as conn:
            await conn.execute("UPDATE t SET n = 100 WHERE id = ?", ("a",))
            raise RuntimeError("the job failed")
    rows = await db.fetchall("SELECT n FROM t WHERE id = ?", ("a",))
    assert [r[0] for r in rows] == [0]


async def test_a_hold_and_a_settle_are_two_round_trips_each_and_keep_their_books(
    postgres_url: str, tmp_path: Path
) -> None:
    """A hold: its conditional UPDATE, then its row with the COMMIT. A settle: lock the hold
    and its account, then its five writes, the balance read and the COMMIT at once."""
    ledger = await open_ledger(postgres_url, pool_size=1)
    try:
        async with ledger.db.write() as conn:
            await ensure_account(conn, "alice", "api_key")
            await credit(conn, "alice", 10_000, "deposit", "test")
        traced = await _traced(ledger.db, tmp_path / "hold.txt")  # type: ignore[arg-type]
        held = await ledger.hold("alice", 4_000)
        traced.flush()
        assert _round_trips(tmp_path / "hold.txt") == 2, _queries(tmp_path / "hold.txt")
        traced = await _traced(ledger.db, tmp_path / "settle.txt")  # type: ignore[arg-type]
        settled = await ledger.settle(held, 1_500, "job-1")
        traced.flush()
        sent = _queries(tmp_path / "settle.txt")
        assert (settled.charged_msat, settled.available_msat) == (1_500, 8_500)
        assert _round_trips(tmp_path / "settle.txt") == 2, sent
        assert sent[0].startswith("BEGIN; SELECT")
        account = await ledger.account("alice")
        assert account is not None
        assert (account.balance_msat, account.reserved_msat) == (8_500, 0)
        with pytest.raises(LedgerError, match="not open"):
            await ledger.settle(held, 1_500, "job-1")
        assert (await ledger.audit()).log_mismatches == ()
    finally:
        await ledger.db.close()


async def test_a_failure_in_a_committing_batch_keeps_nothing_and_the_connection_serves_on(
    db: PostgresDatabase,
) -> None:
    def work(conn: SyncConn) -> None:
        conn.execute("UPDATE t SET n = n + 7 WHERE id = ?", ("a",))
        with conn.batch(commit=True):
            conn.execute("UPDATE t SET n = n + 1 WHERE id = ?", ("a",))
            conn.execute("INSERT INTO t VALUES ('a', 1)")  # duplicate key: aborts the rest

    with pytest.raises(Exception, match="duplicate key"):
        await db.transact(work)
    assert [r[0] for r in await db.fetchall("SELECT n FROM t")] == [0]

    def commits(conn: SyncConn) -> int:
        with conn.batch(commit=True):
            cursor = conn.execute("UPDATE t SET n = n + 1 WHERE id = ? RETURNING n", ("a",))
        return int(cursor.fetchone()[0])

    assert await db.transact(commits) == 1
    assert [r[0] for r in await db.fetchall("SELECT n FROM t")] == [1]


async def test_nothing_runs_after_the_batch_that_committed(db: PostgresDatabase) -> None:
    def work(conn: SyncConn) -> None:
        with conn.batch(commit=True):
            conn.execute("UPDATE t SET n = 5 WHERE id = ?", ("a",))
        conn.execute("UPDATE t SET n = 6 WHERE id = ?", ("a",))  # outside any transaction

    with pytest.raises(RuntimeError, match="committed"):
        await db.transact(work)
    assert [r[0] for r in await db.fetchall("SELECT n FROM t")] == [5]
