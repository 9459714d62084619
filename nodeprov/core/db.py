"""The ledger's database: one API over two engines, named migrations applied once.

:func:`open_database` takes a SQLite file (a path or ``sqlite:///…``) or a PostgreSQL URL
(``postgresql://…``) and returns that engine's :class:`Database`
(:mod:`nodeprov.core.db_sqlite`, :mod:`nodeprov.core.db_postgres`); the API, the rules the
money code keeps on it and the migrations are in :mod:`nodeprov.core.db_base`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from nodeprov.core.db_base import (
    DATABASE_ERRORS,
    POSTGRES_URL_PREFIXES,
    SQLITE_URL_PREFIX,
    Conn,
    Cursor,
    Database,
    Migration,
    SyncConn,
    fetchone,
)
from nodeprov.core.db_postgres import PostgresDatabase
from nodeprov.core.db_sqlite import SqliteDatabase

__all__ = [
    "DATABASE_ERRORS",
    "Conn",
    "Cursor",
    "Database",
    "Migration",
    "PostgresDatabase",
    "SqliteDatabase",
    "SyncConn",
    "fetchone",
    "open_database",
]


async def open_database(
    target: Path | str,
    migrations: Iterable[Migration],
    *,
    durable: bool = False,
    pool_size: int = 8,
) -> Database:
    """Open ``target`` (a SQLite path or URL, or a PostgreSQL URL), apply pending migrations.

    ``durable`` asks SQLite to fsync every commit; ``pool_size`` is how many PostgreSQL
    connections this process keeps for writes.
    """
    if isinstance(target, str) and target.startswith(POSTGRES_URL_PREFIXES):
        return await PostgresDatabase.connect(target, migrations, pool_size=pool_size)
    path = Path(target.removeprefix(SQLITE_URL_PREFIX)) if isinstance(target, str) else target
    return await SqliteDatabase.connect(path, migrations, durable=durable)
