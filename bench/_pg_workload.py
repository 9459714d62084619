"""The ledger-shaped workload of bench/pg_drivers.py and one class per driver that runs it.

Each driver opens ``size`` connections and runs ``pair(account)``: one hold transaction, then
one settle transaction, the statements the ledger runs (nodeprov/core/holds.py), in the style
each driver is meant to be used.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

ACCOUNTS = 1_000  # a multiple of every concurrency: worker w only touches accounts = w (mod c)
HOLD_MSAT = 5_000
CHARGE_MSAT = 1_234
OPERATOR = "operator"

PG_SCHEMA = [
    "CREATE TABLE accounts (id text PRIMARY KEY, balance_msat bigint NOT NULL, "
    "reserved_msat bigint NOT NULL DEFAULT 0)",
    "CREATE TABLE holds (id bigserial PRIMARY KEY, account_id text NOT NULL, "
    "amount_msat bigint NOT NULL)",
    "CREATE TABLE transactions (id bigserial PRIMARY KEY, account_id text NOT NULL, "
    "kind text NOT NULL, delta_msat bigint NOT NULL)",
]
SQLITE_SCHEMA = [
    "CREATE TABLE accounts (id TEXT PRIMARY KEY, balance_msat INTEGER NOT NULL, "
    "reserved_msat INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE holds (id INTEGER PRIMARY KEY, account_id TEXT NOT NULL, "
    "amount_msat INTEGER NOT NULL)",
    "CREATE TABLE transactions (id INTEGER PRIMARY KEY, account_id TEXT NOT NULL, "
    "kind TEXT NOT NULL, delta_msat INTEGER NOT NULL)",
]

# The statements in psycopg's placeholder style; asyncpg's ($n) and SQLite's (?) derive from them.
HOLD_RESERVE = (
    "UPDATE accounts SET reserved_msat = reserved_msat + %(amount)s "
    "WHERE id = %(account)s AND balance_msat - reserved_msat >= %(amount)s"
)
HOLD_INSERT = (
    "INSERT INTO holds (account_id, amount_msat) VALUES (%(account)s, %(amount)s) RETURNING id"
)
SETTLE_LOCK = (
    "SELECT h.account_id, h.amount_msat, a.balance_msat FROM holds h "
    "JOIN accounts a ON a.id = h.account_id WHERE h.id = %(hold)s FOR UPDATE"
)
SETTLE_DELETE = "DELETE FROM holds WHERE id = %(hold)s"
SETTLE_CHARGE = (
    "UPDATE accounts SET reserved_msat = reserved_msat - %(held)s, "
    "balance_msat = balance_msat - %(charged)s WHERE id = %(account)s"
)
SETTLE_EARN = "UPDATE accounts SET balance_msat = balance_msat + %(charged)s WHERE id = %(op)s"
SETTLE_ROWS = (
    "INSERT INTO transactions (account_id, kind, delta_msat) "
    "VALUES (%(account)s, %(kind)s, %(delta)s)"
)


def numbered(statement: str, names: Sequence[str]) -> str:
    """``%(name)s`` placeholders as asyncpg's ``$n`` (n = position of name in ``names``)."""
    for index, name in enumerate(names, start=1):
        statement = statement.replace(f"%({name})s", f"${index}")
    return statement


def qmarked(statement: str) -> str:
    """``%(name)s`` placeholders as SQLite's ``:name``; SQLite has no FOR UPDATE."""
    for name in ("amount", "account", "hold", "held", "charged", "op", "kind", "delta"):
        statement = statement.replace(f"%({name})s", f":{name}")
    return statement.replace(" FOR UPDATE", "")


def settle_rows(account: str) -> list[dict[str, Any]]:
    return [
        {"account": account, "kind": "charge", "delta": -CHARGE_MSAT},
        {"account": OPERATOR, "kind": "earning", "delta": CHARGE_MSAT},
    ]


def charged_of(held: int, balance: int) -> int:
    return min(CHARGE_MSAT, held, balance)


def named(name: str, operator: bool) -> str:
    """A driver's row label; without the operator row the workload differs, so it says so."""
    return name if operator else f"{name}, no operator row"


# ----------------------------------------------------------------------------- the drivers
# Each driver has open(), close() and pair(account): one hold, then one settle.
# operator=False leaves out the settle's UPDATE of the one operator row (every settle's shared
# hot row), to show how much that row's lock, held until the commit is flushed, costs.


async def _no_reset(conn: Any) -> None:
    """The ledger leaves no session state behind, so the pool's reset query can be skipped."""


class AsyncpgDriver:
    """asyncpg with its own pool; statements prepared and cached by asyncpg.

    By default the pool runs a reset query (advisory unlocks, CLOSE ALL, UNLISTEN, RESET ALL) on
    every release: one more round trip per transaction. ``reset=False`` skips it.
    """

    def __init__(self, url: str, size: int, *, reset: bool = True, operator: bool = True) -> None:
        self.url, self.size, self.reset, self.operator = url, size, reset, operator
        self.name = named("asyncpg (pool)" if reset else "asyncpg (pool, no reset query)", operator)
        self.pool: Any = None

    async def open(self) -> None:
        self.pool = await asyncpg.create_pool(
            self.url, min_size=self.size, max_size=self.size,
            reset=None if self.reset else _no_reset,
        )  # fmt: skip

    async def close(self) -> None:
        await self.pool.close()

    async def pair(self, account: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.execute(numbered(HOLD_RESERVE, ["amount", "account"]),
                                      HOLD_MSAT, account)  # fmt: skip
            if done != "UPDATE 1":
                raise RuntimeError(f"hold refused on {account}")
            hold = await conn.fetchval(numbered(HOLD_INSERT, ["account", "amount"]),
                                       account, HOLD_MSAT)  # fmt: skip
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(numbered(SETTLE_LOCK, ["hold"]), hold)
            charged = charged_of(row[1], row[2])
            await conn.execute(numbered(SETTLE_DELETE, ["hold"]), hold)
            await conn.execute(numbered(SETTLE_CHARGE, ["held", "charged", "account"]),
                               row[1], charged, account)  # fmt: skip
            if self.operator:
                await conn.execute(numbered(SETTLE_EARN, ["charged", "op"]), charged, OPERATOR)
            await conn.executemany(
                numbered(SETTLE_ROWS, ["account", "kind", "delta"]),
                [(r["account"], r["kind"], r["delta"]) for r in settle_rows(account)],
            )


class PsycopgAsyncDriver:
    """psycopg 3 AsyncConnection, from an asyncio.Queue of connections (no psycopg_pool here)."""

    def __init__(self, url: str, size: int, *, operator: bool = True) -> None:
        self.url, self.size, self.operator = url, size, operator
        self.name = named("psycopg 3 async (queue)", operator)
        self.idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
        self.all: list[psycopg.AsyncConnection[Any]] = []

    async def open(self) -> None:
        for _ in range(self.size):
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
            self.all.append(conn)
            self.idle.put_nowait(conn)

    async def close(self) -> None:
        for conn in self.all:
            await conn.close()

    async def pair(self, account: str) -> None:
        conn = await self.idle.get()
        try:
            async with conn.transaction():
                cur = await conn.execute(HOLD_RESERVE, {"amount": HOLD_MSAT, "account": account})
                if cur.rowcount != 1:
                    raise RuntimeError(f"hold refused on {account}")
                cur = await conn.execute(HOLD_INSERT, {"account": account, "amount": HOLD_MSAT})
                hold = (await cur.fetchone() or (0,))[0]
        finally:
            self.idle.put_nowait(conn)
        conn = await self.idle.get()
        try:
            async with conn.transaction():
                cur = await conn.execute(SETTLE_LOCK, {"hold": hold})
                row = await cur.fetchone()
                assert row is not None
                charged = charged_of(row[1], row[2])
                await conn.execute(SETTLE_DELETE, {"hold": hold})
                await conn.execute(
                    SETTLE_CHARGE, {"held": row[1], "charged": charged, "account": account}
                )
                if self.operator:
                    await conn.execute(SETTLE_EARN, {"charged": charged, "op": OPERATOR})
                async with conn.cursor() as many:
                    await many.executemany(SETTLE_ROWS, settle_rows(account))
        finally:
            self.idle.put_nowait(conn)


def sync_hold(conn: psycopg.Connection[Any], account: str) -> int:
    """One hold transaction on a sync connection (runs in that connection's own thread)."""
    with conn.transaction():
        cur = conn.execute(HOLD_RESERVE, {"amount": HOLD_MSAT, "account": account})
        if cur.rowcount != 1:
            raise RuntimeError(f"hold refused on {account}")
        row = conn.execute(HOLD_INSERT, {"account": account, "amount": HOLD_MSAT}).fetchone()
        assert row is not None
        return int(row[0])


def sync_settle(
    conn: psycopg.Connection[Any], account: str, hold: int, operator: bool = True
) -> None:
    """One settle transaction on a sync connection (runs in that connection's own thread)."""
    with conn.transaction():
        row = conn.execute(SETTLE_LOCK, {"hold": hold}).fetchone()
        assert row is not None
        charged = charged_of(row[1], row[2])
        conn.execute(SETTLE_DELETE, {"hold": hold})
        conn.execute(SETTLE_CHARGE, {"held": row[1], "charged": charged, "account": account})
        if operator:
            conn.execute(SETTLE_EARN, {"charged": charged, "op": OPERATOR})
        with conn.cursor() as many:
            many.executemany(SETTLE_ROWS, settle_rows(account))


class PsycopgThreadDriver:
    """psycopg 3 sync connections, each used only from its own thread: one hop per transaction."""

    def __init__(self, url: str, size: int, *, operator: bool = True) -> None:
        self.url, self.size, self.operator = url, size, operator
        self.name = named("psycopg 3 sync, thread per conn", operator)
        self.idle: asyncio.Queue[tuple[psycopg.Connection[Any], ThreadPoolExecutor]] = (
            asyncio.Queue()
        )
        self.all: list[tuple[psycopg.Connection[Any], ThreadPoolExecutor]] = []

    async def open(self) -> None:
        for index in range(self.size):
            executor = ThreadPoolExecutor(1, thread_name_prefix=f"pg{index}")
            loop = asyncio.get_running_loop()
            conn = await loop.run_in_executor(
                executor, lambda: psycopg.connect(self.url, autocommit=True)
            )
            self.all.append((conn, executor))
            self.idle.put_nowait((conn, executor))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for conn, executor in self.all:
            await loop.run_in_executor(executor, conn.close)
            executor.shutdown()

    async def pair(self, account: str) -> None:
        loop = asyncio.get_running_loop()
        conn, executor = await self.idle.get()
        try:
            hold = await loop.run_in_executor(executor, sync_hold, conn, account)
        finally:
            self.idle.put_nowait((conn, executor))
        conn, executor = await self.idle.get()
        try:
            await loop.run_in_executor(executor, sync_settle, conn, account, hold, self.operator)
        finally:
            self.idle.put_nowait((conn, executor))


class SqliteDriver:
    """sqlite3 on one connection in one thread: BEGIN IMMEDIATE, WAL, synchronous=NORMAL."""

    def __init__(self, path: Path, *, operator: bool = True) -> None:
        self.path, self.operator = path, operator
        self.name = named("SQLite (reference)", operator)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self.conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.conn = await loop.run_in_executor(self.executor, self._connect)

    async def close(self) -> None:
        if self.conn is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.conn.close)
        self.executor.shutdown()

    def _hold(self, account: str) -> int:
        assert self.conn is not None
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(qmarked(HOLD_RESERVE), {"amount": HOLD_MSAT, "account": account})
            if cur.rowcount != 1:
                raise RuntimeError(f"hold refused on {account}")
            cur = conn.execute(qmarked(HOLD_INSERT), {"account": account, "amount": HOLD_MSAT})
            hold = int(cur.fetchone()[0])
            conn.execute("COMMIT")
            return hold
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _settle(self, account: str, hold: int) -> None:
        assert self.conn is not None
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(qmarked(SETTLE_LOCK), {"hold": hold}).fetchone()
            charged = charged_of(row[1], row[2])
            conn.execute(qmarked(SETTLE_DELETE), {"hold": hold})
            conn.execute(
                qmarked(SETTLE_CHARGE), {"held": row[1], "charged": charged, "account": account}
            )
            if self.operator:
                conn.execute(qmarked(SETTLE_EARN), {"charged": charged, "op": OPERATOR})
            conn.executemany(qmarked(SETTLE_ROWS), settle_rows(account))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def pair(self, account: str) -> None:
        loop = asyncio.get_running_loop()
        hold = await loop.run_in_executor(self.executor, self._hold, account)
        await loop.run_in_executor(self.executor, self._settle, account, hold)


Driver = AsyncpgDriver | PsycopgAsyncDriver | PsycopgThreadDriver | SqliteDriver


def seed_postgres(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in PG_SCHEMA:
            conn.execute(statement)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO accounts (id, balance_msat) VALUES (%s, %s)",
                [(OPERATOR, 0)] + [(f"a{i}", 10**15) for i in range(ACCOUNTS)],
            )


def seed_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in SQLITE_SCHEMA:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO accounts (id, balance_msat) VALUES (?, ?)",
            [(OPERATOR, 0)] + [(f"a{i}", 10**15) for i in range(ACCOUNTS)],
        )
    conn.close()
