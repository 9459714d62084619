"""The WAL is checkpointed beside the writer, not inside a commit (real SQLite files)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from nodeprov.core.db import Migration
from nodeprov.core.db_sqlite import BACKSTOP_PAGES, SqliteDatabase
from tests.support.waiting import until

TABLE = Migration("t", "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")


async def test_commits_do_not_checkpoint_the_background_does(tmp_path: Path) -> None:
    db = await SqliteDatabase.connect(tmp_path / "db.sqlite3", [TABLE])
    try:
        # A commit checkpoints by itself only past the backstop, far above SQLite's 1,000.
        row = await db.fetchone("PRAGMA wal_autocheckpoint")
        assert row is not None and row[0] == BACKSTOP_PAGES
        for i in range(300):  # more than 1,000 pages of WAL: SQLite would have checkpointed
            await db.transact(
                lambda raw, i=i: raw.execute("INSERT INTO t VALUES (?, ?)", (i, b"x" * 8000))
            )
        await until(lambda: db.checkpoints >= 1, within=10, what="a background checkpoint")
        row = await db.fetchone("SELECT COUNT(*) FROM t")
        assert row is not None and row[0] == 300
    finally:
        await db.close()
    raw = sqlite3.connect(tmp_path / "db.sqlite3")
    try:
        assert raw.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 300
    finally:
        raw.close()


async def test_no_writes_no_checkpoints_and_close_stops_the_loop(tmp_path: Path) -> None:
    db = await SqliteDatabase.connect(tmp_path / "db.sqlite3", [TABLE])
    await asyncio.sleep(0)
    task = db._checkpoint_task
    assert task is not None and not task.done()
    await db.close()
    assert task.done() and db._checkpoint_task is None
