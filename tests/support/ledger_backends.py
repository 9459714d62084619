"""Which engine a test's ledger runs on: its SQLite file, or a PostgreSQL database per file.

A suite parametrized over both backends (the ``ledger_backend`` fixture) keeps its code as
it is: it names its ledger by a file path as always, and :func:`ledger_target` maps that path
to where the ledger lives for this run — the file itself, or one fresh PostgreSQL database per
distinct path, so a test that reopens "the same file" reopens the same database and one
that opens two files gets two databases.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg

from nodeprov.core.sql_dialect import statement

# Tells a test's subprocess (tests/support/crash_worker.py) the PostgreSQL database its
# ledger path stands for.
URL_ENV = "NODEPROV_TEST_LEDGER_URL"


class DatabaseServer(Protocol):
    def create_database(self, name: str | None = None) -> str: ...

    def drop_database(self, name_or_url: str) -> None: ...


class PostgresTargets:
    """One PostgreSQL database per ledger path, dropped when the test ends."""

    def __init__(self, server: DatabaseServer) -> None:
        self._server = server
        self._urls: dict[Path, str] = {}

    def url(self, path: Path) -> str:
        key = path.resolve()
        if key not in self._urls:
            self._urls[key] = self._server.create_database()
        return self._urls[key]

    def drop_all(self) -> None:
        for url in self._urls.values():
            self._server.drop_database(url)
        self._urls.clear()


class Targets(Protocol):
    def url(self, path: Path) -> str: ...


class FixedTarget:
    """Every ledger path stands for one database (a subprocess told its parent's)."""

    def __init__(self, url: str) -> None:
        self._url = url

    def url(self, path: Path) -> str:
        return self._url


_active: Targets | None = None


def use(targets: Targets | None) -> None:
    """Send ledgers to PostgreSQL (``targets``) or back to their files (None)."""
    global _active
    _active = targets


def ledger_target(path: Path) -> Path | str:
    """Where the ledger named by ``path`` lives in this test: the file, or a PostgreSQL URL."""
    return path if _active is None else _active.url(path)


def use_from_env() -> None:
    """In a test's subprocess: the database the parent named in :data:`URL_ENV`, if any."""
    if url := os.environ.get(URL_ENV):
        use(FixedTarget(url))


def env_for(path: Path) -> dict[str, str]:
    """The environment for a subprocess whose ledger is ``path`` in this test."""
    target = ledger_target(path)
    return {**os.environ, URL_ENV: target} if isinstance(target, str) else dict(os.environ)


def query(path: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the ledger named by ``path`` outside the node, committed at once
    (SQLite's spelling; rows as tuples): for a test that reads or tampers with the books."""
    target = ledger_target(path)
    if isinstance(target, Path):
        with contextlib.closing(sqlite3.connect(target)) as conn:
            rows = conn.execute(sql, params).fetchall()
            conn.commit()
            return rows
    with psycopg.connect(target, autocommit=True, cursor_factory=psycopg.ClientCursor) as pg:
        cursor = pg.execute(statement(sql), tuple(params))
        return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
