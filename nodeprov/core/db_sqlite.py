"""The ledger on a SQLite file: one writer, WAL readers.

All writes go through one connection and an asyncio lock, each unit of work wrapped in
``BEGIN IMMEDIATE`` … ``COMMIT``: short transactions, never a lost update, never a
half-applied money movement. Reads use a second connection and see the last committed
state (WAL).

SQLite runs with ``synchronous=NORMAL`` in WAL mode: a committed transaction survives a
crash of the process (kill -9); only an OS crash or power loss can lose the newest
commits. ``durable=True`` selects ``synchronous=FULL`` for operators who want that too.

Checkpoints (copying the WAL back into the file, with an fsync) run on a third connection
every :data:`CHECKPOINT_SECONDS` after writes, not inside a commit: SQLite's automatic
checkpoint would make every few hundredth request wait for the fsync (the p99 at one client
was 5 ms over the p50 because of it). The automatic one stays as a backstop at
:data:`BACKSTOP_PAGES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from nodeprov.core.datadir import private_dir, private_file
from nodeprov.core.db_base import Conn, Database, Migration, SyncConn
from nodeprov.core.sql_dialect import sqlite_statement

T = TypeVar("T")
log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 1.0
BACKSTOP_PAGES = 10_000  # about 40 MiB of WAL before a commit checkpoints by itself


class SqliteSync:
    """A sqlite3 connection that drops row locks (``FOR UPDATE``) from the statements."""

    __slots__ = ("_raw",)

    def __init__(self, raw: sqlite3.Connection) -> None:
        self._raw = raw

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> sqlite3.Cursor:
        return self._raw.execute(sqlite_statement(sql), parameters)

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> sqlite3.Cursor:
        return self._raw.executemany(sqlite_statement(sql), parameters)

    def batch(self, *, commit: bool = False) -> contextlib.nullcontext[None]:
        """In process, a statement costs no round trip: nothing to gather (the transaction
        commits when the work returns, ``commit`` or not)."""
        return contextlib.nullcontext()


class _Async:
    """The writer as :meth:`Database.write` yields it (row locks dropped: :class:`SqliteSync`)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Iterable[Any] | None = None, /) -> Any:
        return self._conn.execute(sqlite_statement(sql), parameters)

    def executemany(self, sql: str, parameters: Iterable[Iterable[Any]], /) -> Any:
        return self._conn.executemany(sqlite_statement(sql), parameters)


class SqliteDatabase(Database):
    """One SQLite file shared by the ledger and the wallet journal."""

    backend = "sqlite"

    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        checkpointer: aiosqlite.Connection | None = None,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._checkpointer = checkpointer
        self._lock = asyncio.Lock()
        self._writes = 0  # commits so far; the checkpointer runs only after new ones
        self.checkpoints = 0  # background checkpoints run
        self._checkpoint_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls, path: Path, migrations: Iterable[Migration], *, durable: bool = False
    ) -> SqliteDatabase:
        """Open (creating if needed) the file at ``path`` and apply pending migrations."""
        # Private from creation: SQLite gives -wal and -shm the main file's mode, so the
        # main file is made 0600 before SQLite opens it (a chmod afterwards leaves a window).
        private_dir(path.parent)
        private_file(path)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):  # left by an earlier run
                path.with_name(path.name + suffix).chmod(0o600)
        writer = await _connect(path)
        reader = await _connect(path)
        checkpointer = await _connect(path)
        for conn in (writer, reader, checkpointer):
            conn.row_factory = aiosqlite.Row
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA busy_timeout=5000")
            await conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        db = cls(writer, reader, checkpointer)
        try:
            await db._migrate(migrations)
        except BaseException:
            await db.close()  # aiosqlite threads would otherwise keep the process alive
            raise
        db._checkpoint_task = asyncio.create_task(db._checkpoint_loop(), name="wal-checkpoint")
        return db

    async def _checkpoint_loop(self) -> None:
        """Checkpoint the WAL beside the writer (PASSIVE: it never blocks a reader or writer)."""
        assert self._checkpointer is not None
        done = self._writes
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            if self._writes == done:
                continue
            done = self._writes
            try:
                await self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
                self.checkpoints += 1
            except sqlite3.Error as exc:  # the backstop still checkpoints; try again later
                log.warning("WAL checkpoint failed: %s", exc)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Conn]:
        """A write transaction: commits when the block ends, rolls back if it raises.

        Also when the task is cancelled at any await inside: the writer runs statements in
        order, so a rollback queued after a cancelled ``BEGIN``/``COMMIT`` still lands after
        it, and the next writer never finds a transaction left open.
        """
        async with self._lock:
            try:
                await self._writer.execute("BEGIN IMMEDIATE")
                yield _Async(self._writer)
                await self._writer.execute("COMMIT")
                self._writes += 1
            except BaseException:
                await asyncio.shield(self._rollback())
                raise

    async def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.OperationalError):  # nothing was begun, or committed
            await self._writer.execute("ROLLBACK")

    async def transact(self, work: Callable[[SyncConn], T]) -> T:
        """Run ``work`` as one write transaction inside the writer's thread.

        One thread hop for the whole ``BEGIN IMMEDIATE`` … ``COMMIT`` instead of one per
        statement: this is what keeps the per-request ledger work well under a millisecond.
        """

        def run() -> T:
            raw = self._writer._conn  # aiosqlite's own sqlite3 connection, in its thread
            raw.execute("BEGIN IMMEDIATE")
            try:
                result = work(SqliteSync(raw))
            except BaseException:
                raw.execute("ROLLBACK")
                raise
            raw.execute("COMMIT")
            return result

        async with self._lock:
            # aiosqlite runs queued callables in its thread; pinned at 0.20 by the cashu package.
            result: T = await self._writer._execute(run)  # type: ignore[no-untyped-call]
            self._writes += 1
            return result

    async def snapshot(self, work: Callable[[SyncConn], T]) -> T:
        """Run read-only ``work`` on one consistent snapshot (a WAL read transaction)."""

        def run() -> T:
            raw = self._reader._conn
            raw.execute("BEGIN")
            try:
                return work(SqliteSync(raw))
            finally:
                raw.execute("COMMIT")

        return await self._reader._execute(run)  # type: ignore[no-untyped-call,no-any-return]

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of a read-only query on the reader connection, read in one thread hop.

        Executing, fetching and closing as separate hops would let another task's read run
        while this statement is open, inside its read transaction: that read would see the
        snapshot this one began with, not what was committed since (a refund would read a
        released hold as still reserved).
        """

        def run() -> list[Any]:
            cursor = self._reader._conn.execute(sqlite_statement(sql), params)
            try:
                return cursor.fetchall()
            finally:
                cursor.close()

        return await self._reader._execute(run)  # type: ignore[no-untyped-call,no-any-return]

    async def close(self) -> None:
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoint_task
            self._checkpoint_task = None
        async with self._lock:
            await self._writer.close()
        await self._reader.close()
        if self._checkpointer is not None:
            await self._checkpointer.close()


async def _connect(path: Path) -> aiosqlite.Connection:
    connection = aiosqlite.connect(path, isolation_level=None)
    # A connection someone forgot to close must not keep the process alive at exit;
    # every commit is already durable when it returns.
    connection.daemon = True
    return await connection
