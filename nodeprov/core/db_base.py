"""The ledger database's API, shared by both engines (:mod:`nodeprov.core.db` opens one).

:meth:`Database.open` takes a SQLite file (a path or ``sqlite:///…``) or a PostgreSQL URL
(``postgresql://…``) and returns the engine's :class:`Database`: the same money code, the
same SQL text, the same migrations run on both (:mod:`nodeprov.core.sql_dialect` rewrites
the few spellings PostgreSQL needs).

Units of work:

- :meth:`Database.write` — an async block that is one write transaction: it commits when the
  block ends and rolls back if it raises (or is cancelled).
- :meth:`Database.transact` — synchronous SQL run as one write transaction in the
  connection's thread: one thread hop for the whole transaction (the per-request hot path).
- :meth:`Database.snapshot`, :meth:`Database.fetchall`, :meth:`Database.fetchone` — reads of
  committed state.

Concurrency rules the money code keeps, so it is safe with one writer (SQLite) and with
many (PostgreSQL, several processes and machines): a balance moves only through a
conditional ``UPDATE`` (``… WHERE balance_msat - reserved_msat >= ?``) or an increment; a
row whose state decides what to do next is read ``FOR UPDATE`` (dropped for SQLite, whose
one writer makes it moot) or changed by a conditional ``UPDATE``/``DELETE … RETURNING``
that only one transaction can win. So that writers wait for each other rather than
deadlock, a pool's ``assets`` row is locked before any account's row (a move out of a pool
takes it first, :func:`~nodeprov.core.liabilities.lock_pool`; a receive adds to the pool
before it credits), and a wallet op's row before its proofs.
"""

from __future__ import annotations

import abc
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import psycopg

from nodeprov.core.sql_dialect import split_statements

T = TypeVar("T")

SQLITE_URL_PREFIX = "sqlite:///"
POSTGRES_URL_PREFIXES = ("postgresql://", "postgres://")
# What a failing database raises, whichever the engine (for one-line CLI errors).
DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)


@dataclass(frozen=True)
class Migration:
    """A named schema change; applied once, in order, and recorded in ``migrations``."""

    name: str
    sql: str


class Cursor(Protocol):
    """A synchronous cursor, as ``sqlite3`` and psycopg give them."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class SyncConn(Protocol):
    """The connection :meth:`Database.transact` hands its work: ``execute`` as in ``sqlite3``."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...

    def batch(self, *, commit: bool = False) -> AbstractContextManager[None]:
        """Statements whose results the block does not read: PostgreSQL sends them in one
        round trip (their rowcounts and rows can be read after the block; an error shows by
        the block's end at the latest); SQLite runs each at once. With ``commit`` the block
        is the work's last and its round trip commits too (SQLite commits after the work)."""
        ...


class Conn(Protocol):
    """The connection :meth:`Database.write` yields: ``await conn.execute(sql, params)``."""

    def execute(self, sql: str, parameters: Iterable[Any] | None = ..., /) -> Awaitable[Any]: ...

    def executemany(self, sql: str, parameters: Iterable[Iterable[Any]], /) -> Awaitable[Any]: ...


class Database(abc.ABC):
    """The books' database (:func:`nodeprov.core.db.open_database` opens one)."""

    backend: str  # "sqlite" or "postgresql"

    @abc.abstractmethod
    def write(self) -> AbstractAsyncContextManager[Conn]:
        """A write transaction: commits when the block ends, rolls back if it raises."""

    @abc.abstractmethod
    async def transact(self, work: Callable[[SyncConn], T]) -> T:
        """Run synchronous ``work`` as one write transaction in the connection's thread.

        ``work`` must touch nothing but the database: PostgreSQL runs it again when the
        server aborts the transaction to break a deadlock.
        """

    @abc.abstractmethod
    async def snapshot(self, work: Callable[[SyncConn], T]) -> T:
        """Run read-only ``work`` on one consistent snapshot."""

    @abc.abstractmethod
    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of a read-only query (of committed state), fetched in one hop."""

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a read-only query, or None."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection (waits for the transaction under way, if any)."""

    # --- migrations, shared by both engines ---

    def _schema(self, sql: str) -> str:
        """A migration's DDL in this engine's spelling."""
        return sql

    async def _lock_migrations(self, conn: Conn) -> None:  # noqa: B027 (one writer needs none)
        """Keep other processes from migrating at the same time."""

    async def _migrate(self, migrations: Iterable[Migration]) -> None:
        async with self.write() as conn:
            await self._lock_migrations(conn)
            await conn.execute(
                self._schema(
                    "CREATE TABLE IF NOT EXISTS migrations "
                    "(name TEXT PRIMARY KEY, applied_at INTEGER NOT NULL)"
                )
            )
            cursor = await conn.execute("SELECT name FROM migrations")
            done = {row[0] for row in await cursor.fetchall()}
            for migration in migrations:
                if migration.name in done:
                    continue
                for statement in split_statements(self._schema(migration.sql)):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO migrations (name, applied_at) VALUES (?, ?)",
                    (migration.name, int(time.time())),
                )


async def fetchone(conn: Conn, sql: str, params: Sequence[Any] = ()) -> Any:
    """One row from ``conn`` inside a write transaction (reads see the transaction's writes)."""
    cursor = await conn.execute(sql, params)
    row = await cursor.fetchone()
    await cursor.close()
    return row


def url_without_password(url: str, mask: str = "") -> str:
    """``url`` with any password (in the user part or a ``password=`` parameter) removed, or
    replaced by ``mask``: the one rule for printing a database URL."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        name, colon, _ = user.partition(":")
        netloc = f"{name}{':' + mask if colon and mask else ''}@{host}"
    query = [
        (k, mask if k == "password" else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k != "password" or mask
    ]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, quote_via=quote)))


def url_password(url: str) -> str:
    """The password ``url`` carries ("" if none), to keep it out of anything printed."""
    parts = urlsplit(url)
    if parts.password:
        return unquote(parts.password)
    return dict(parse_qsl(parts.query)).get("password", "")
