"""One open transaction behind the ledger's :class:`Database` API (for ``ledger copy``).

:mod:`nodeprov.core.ledger_copy` copies the books in one PostgreSQL transaction and checks
the copy before it commits: the migrations the engines apply and :meth:`Ledger.audit` must
run, as they are, inside that transaction (and on the SQLite file's read snapshot).
:class:`Joined` makes every unit of work join the connection's open transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from nodeprov.core.db_base import Conn, Database, Migration, SyncConn
from nodeprov.core.db_postgres import MIGRATION_LOCK, FetchedRows
from nodeprov.core.sql_dialect import schema

T = TypeVar("T")


async def off_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread: the drivers block, the event loop must not."""
    return await asyncio.to_thread(fn, *args)


class Joined(Database):
    """One connection already inside a transaction, behind the :class:`Database` API.

    Every unit of work joins that transaction, so the migrations the engines apply and
    :meth:`Ledger.audit` run, as they are, on the uncommitted copy (and on the file's
    snapshot). Nothing here commits: the copy commits once, or not at all.
    """

    def __init__(self, conn: SyncConn, *, postgres: bool = False) -> None:
        self._conn = conn
        self._postgres = postgres
        self.backend = "postgresql" if postgres else "sqlite"

    async def migrate(self, migrations: Iterable[Migration]) -> None:
        """Apply ``migrations`` as the engine does (same DDL, same names), uncommitted."""
        await self._migrate(migrations)

    def _schema(self, sql: str) -> str:
        return schema(sql) if self._postgres else sql

    async def _lock_migrations(self, conn: Conn) -> None:
        if self._postgres:
            await conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))

    @asynccontextmanager
    async def write(self) -> AsyncIterator[Conn]:
        yield self

    async def execute(self, sql: str, parameters: Iterable[Any] | None = None, /) -> FetchedRows:
        """One statement of a :meth:`write` block."""
        params = tuple(parameters or ())

        def run() -> FetchedRows:
            cursor = self._conn.execute(sql, params)
            rows = cursor.fetchall() if getattr(cursor, "description", None) else []
            return FetchedRows(list(rows), cursor.rowcount)

        return await off_thread(run)

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]], /) -> FetchedRows:
        rows = [tuple(p) for p in parameters]
        cursor = await off_thread(self._conn.executemany, sql, rows)
        return FetchedRows([], cursor.rowcount)

    async def transact(self, work: Callable[[SyncConn], T]) -> T:
        return await off_thread(work, self._conn)

    async def snapshot(self, work: Callable[[SyncConn], T]) -> T:
        return await off_thread(work, self._conn)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await off_thread(lambda: list(self._conn.execute(sql, tuple(params)).fetchall()))

    async def close(self) -> None:
        """The connection belongs to the copy, which closes it."""
