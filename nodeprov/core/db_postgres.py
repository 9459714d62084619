"""The ledger on PostgreSQL: many writers (workers, machines) on one set of books.

psycopg 3's synchronous connections, each used from one thread of its own, as SQLite's
are: the money code is the same synchronous SQL on both engines, and a whole transaction
is one thread hop (:meth:`Database.transact`). A pool of ``pool_size`` connections serves
writes; a smaller one serves reads, so a read awaited inside a write block never waits for
a write connection (which could all be held by blocks waiting the same way).

Transactions run at READ COMMITTED: balances move by conditional ``UPDATE`` and increments,
and rows whose state decides the next step are read ``FOR UPDATE`` (see
:mod:`nodeprov.core.db`). A transaction the server aborts to break a deadlock is run again.

Parameters are bound client side (psycopg's ``ClientCursor``), as SQLite binds them: the
server never has to guess the type of ``? IS NULL``. Booleans go in as 0/1, the integers
SQLite stores; ``SUM`` of 64-bit integers (``numeric`` here) comes back as ``int``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import partial
from typing import Any, ClassVar, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.adapt import Buffer, Dumper, Loader
from psycopg.pq import TransactionStatus

from nodeprov.core.db_base import Conn, Database, Migration, SyncConn
from nodeprov.core.sql_dialect import schema, statement

T = TypeVar("T")
log = logging.getLogger(__name__)

DEADLOCK_RETRIES = 5
# Keepalives: a connection to a server that vanished is noticed in seconds, not hours.
CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
    "application_name": "nodeprov",
}


def advisory_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name`` (PostgreSQL's bigint)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


MIGRATION_LOCK = advisory_key("nodeprov:migrations")


class Row(tuple[Any, ...]):
    """A result row read by position or by (case-insensitive) column name, as sqlite3.Row."""

    _index: ClassVar[dict[str, int]] = {}
    _names: ClassVar[tuple[str, ...]] = ()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key.lower()])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


_ROW_TYPES: dict[tuple[str, ...], type[Row]] = {}


def _row_type(cursor: Any) -> Callable[[Sequence[Any]], Any]:
    """psycopg's row factory: one :class:`Row` subclass per column list (cached)."""
    if cursor.description is None:
        return tuple
    names = tuple(column.name for column in cursor.description)
    row_type = _ROW_TYPES.get(names)
    if row_type is None:
        index = {name.lower(): i for i, name in reversed(list(enumerate(names)))}
        row_type = type("Row", (Row,), {"_index": index, "_names": names})
        _ROW_TYPES[names] = row_type
    return row_type


class _BoolAsInt(Dumper):
    oid = psycopg.adapters.types["int8"].oid

    def dump(self, obj: Any) -> Buffer | None:
        return b"1" if obj else b"0"

    def quote(self, obj: Any) -> Buffer:
        return b"1" if obj else b"0"


class _IntegralNumeric(Loader):
    def load(self, data: Buffer) -> Any:
        text = bytes(data).decode()
        return Decimal(text) if "." in text or not text.lstrip("-").isdigit() else int(text)


def _connect(url: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(
        url,
        autocommit=True,  # transactions are begun and ended explicitly, as on SQLite
        cursor_factory=psycopg.ClientCursor,
        row_factory=_row_type,
        **CONNECT_OPTIONS,
    )
    conn.adapters.register_dumper(bool, _BoolAsInt)
    conn.adapters.register_loader("numeric", _IntegralNumeric)
    return conn


class _Slot:
    """One connection and the one thread that uses it."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.conn: psycopg.Connection[Any] | None = None

    def connection(self) -> psycopg.Connection[Any]:
        """The connection, (re)opened if the server dropped it (in the slot's thread)."""
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = _connect(self.url)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


class PostgresSync:
    """The connection :meth:`PostgresDatabase.transact` hands its work (SQLite's spelling in).

    With ``begin``, the transaction is begun in the first statement's round trip (one query
    string, ``BEGIN; …``; client-side binding allows several statements in one), not in a
    round trip of its own. :meth:`batch` sends statements in one round trip, and with
    ``commit`` the COMMIT too.
    """

    __slots__ = ("_begin", "_conn", "committed")

    def __init__(self, conn: psycopg.Connection[Any], begin: str | None = None) -> None:
        self._conn = conn
        self._begin = begin
        self.committed = False

    @property
    def begun(self) -> bool:
        """Whether the transaction was sent (false while no statement has run)."""
        return self._begin is None

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        self._check_open()
        cursor = self._conn.cursor()
        if self._begin is None:
            cursor.execute(statement(sql), tuple(parameters))
            return cursor
        cursor.execute(f"{self._begin}; {statement(sql)}", tuple(parameters))
        self._begin = None
        cursor.nextset()  # the statement's result, not BEGIN's
        return cursor

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any:
        self._check_open()
        self._send_begin()
        cursor = self._conn.cursor()
        cursor.executemany(statement(sql), [tuple(p) for p in parameters])
        return cursor

    @contextlib.contextmanager
    def batch(self, *, commit: bool = False) -> Iterator[None]:
        """The block's statements (and with ``commit`` the COMMIT) go out in one round trip,
        in psycopg's pipeline mode; a failed statement aborts the rest and raises at the end."""
        self._check_open()
        with self._conn.pipeline():
            self._send_begin()  # queued in the pipeline: one query string is one statement
            yield
            if commit and self.begun:
                self._conn.execute("COMMIT")
                self.committed = True

    def _check_open(self) -> None:
        if self.committed:
            raise RuntimeError("the transaction was committed by its last batch")

    def _send_begin(self) -> None:
        if self._begin is not None:
            self._conn.execute(self._begin)
            self._begin = None


class FetchedRows:
    """A statement's rows, fetched in the statement's thread hop (a write block's cursor)."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    async def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    async def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    async def close(self) -> None:
        self._rows = []


def _rows_of(cursor: Any) -> FetchedRows:
    return FetchedRows(cursor.fetchall() if cursor.description is not None else [], cursor.rowcount)


class _Async:
    """The connection :meth:`PostgresDatabase.write` yields: each statement one thread hop.

    The transaction begins with the first statement (:class:`PostgresSync`); hops are serial in the
    slot's thread, so the state of that carries from one hop to the next.
    """

    def __init__(self, db: PostgresDatabase, slot: _Slot) -> None:
        self._db, self._slot = db, slot
        self._begin: str | None = "BEGIN"

    @property
    def begun(self) -> bool:
        return self._begin is None

    def _hop(
        self, conn: psycopg.Connection[Any], run: Callable[[PostgresSync], Any]
    ) -> FetchedRows:
        sync = PostgresSync(conn, self._begin)
        try:
            return _rows_of(run(sync))
        finally:
            if sync.begun:
                self._begin = None

    async def execute(self, sql: str, parameters: Iterable[Any] | None = None, /) -> FetchedRows:
        params = tuple(parameters or ())
        return await self._db._in(
            self._slot, lambda conn: self._hop(conn, lambda sync: sync.execute(sql, params))
        )

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]], /) -> FetchedRows:
        rows = [tuple(p) for p in parameters]
        return await self._db._in(
            self._slot, lambda conn: self._hop(conn, lambda sync: sync.executemany(sql, rows))
        )


def _rollback(conn: psycopg.Connection[Any]) -> None:
    if conn.info.transaction_status == TransactionStatus.IDLE:
        return  # nothing was begun (the block failed before its first statement)
    with contextlib.suppress(psycopg.Error):  # the connection is gone
        conn.execute("ROLLBACK")


class PostgresDatabase(Database):
    """The books in one PostgreSQL database, shared by every process that opens it."""

    backend = "postgresql"

    def __init__(self, url: str, pool_size: int) -> None:
        self.url = url
        self._writers: asyncio.Queue[_Slot] = asyncio.Queue()
        self._readers: asyncio.Queue[_Slot] = asyncio.Queue()
        self._slots: list[_Slot] = []
        for queue, kind, size in (
            (self._writers, "write", pool_size),
            (self._readers, "read", max(2, pool_size // 4)),
        ):
            for i in range(size):
                slot = _Slot(url, f"pg-{kind}-{i}")
                self._slots.append(slot)
                queue.put_nowait(slot)

    @classmethod
    async def connect(
        cls, url: str, migrations: Iterable[Migration], *, pool_size: int = 8
    ) -> PostgresDatabase:
        """Connect (one connection first, so a wrong URL fails once) and migrate."""
        db = cls(url, pool_size)
        try:
            first = db._writers.get_nowait()
            await db._in(first, lambda conn: None)
            db._writers.put_nowait(first)
            await db._migrate(migrations)
        except BaseException:
            await db.close()
            raise
        return db

    async def _in(self, slot: _Slot, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``fn`` on the slot's connection, in the slot's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(slot.thread, lambda: fn(slot.connection()))

    async def _on(
        self, queue: asyncio.Queue[_Slot], fn: Callable[[psycopg.Connection[Any]], T]
    ) -> T:
        slot = await queue.get()
        try:
            return await self._in(slot, fn)
        finally:
            queue.put_nowait(slot)  # a cancelled wait leaves fn running: the thread is serial

    def _schema(self, sql: str) -> str:
        return schema(sql)

    async def _lock_migrations(self, conn: Conn) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Conn]:
        """A write transaction: commits when the block ends, rolls back if it raises."""
        slot = await self._writers.get()
        try:
            block = _Async(self, slot)
            try:
                yield block
                if block.begun:
                    await self._in(slot, lambda conn: conn.execute("COMMIT"))
            except BaseException:
                # Queued behind whatever the cancelled block left running in the thread.
                await asyncio.shield(self._in(slot, _rollback))
                raise
        finally:
            self._writers.put_nowait(slot)

    async def transact(self, work: Callable[[SyncConn], T]) -> T:
        """Run ``work`` as one transaction in a pooled connection's thread (one hop)."""
        return await self._on(self._writers, partial(_transaction, work, "BEGIN"))

    async def snapshot(self, work: Callable[[SyncConn], T]) -> T:
        """Run read-only ``work`` on one consistent snapshot (REPEATABLE READ, READ ONLY)."""
        begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        return await self._on(self._readers, partial(_transaction, work, begin))

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        rows = tuple(params)
        return await self._on(
            self._readers, lambda conn: list(PostgresSync(conn).execute(sql, rows).fetchall())
        )

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for slot in self._slots:
            await loop.run_in_executor(slot.thread, slot.close)
            slot.thread.shutdown(wait=False)


def _transaction(work: Callable[[SyncConn], T], begin: str, conn: psycopg.Connection[Any]) -> T:
    """``work`` between ``begin`` and COMMIT; run again if the server breaks a deadlock."""
    for attempt in range(DEADLOCK_RETRIES):
        sync = PostgresSync(conn, begin)
        try:
            result = work(sync)
            if sync.begun and not sync.committed:
                conn.execute("COMMIT")
            return result
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
            _rollback(conn)
            if attempt == DEADLOCK_RETRIES - 1:
                raise
            log.info("transaction aborted by the server to break a deadlock; running it again")
        except BaseException:
            _rollback(conn)
            raise
    raise AssertionError("unreachable")
