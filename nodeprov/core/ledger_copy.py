"""Copy the books from the SQLite ledger file into an empty PostgreSQL database.

An operator who outgrows one process moves the ledger as it stands (``nodeprov ledger
copy``): every table the migrations create, row for row, columns matched by name, into a
database that holds nothing yet. All of it is ONE PostgreSQL transaction, migrations
included: the copy is checked before it commits (row counts per table, the audit, the
operator's balance) and a failure anywhere leaves the target as empty as it was, so the
copy can simply be run again. The SQLite file is opened read-only and never changed: the
way back is to point the config at it again.

The caller makes sure no node writes to the file meanwhile (the data dir's lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import graphlib
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from nodeprov.core.db_base import (
    POSTGRES_URL_PREFIXES,
    Migration,
    url_without_password,
)
from nodeprov.core.db_postgres import CONNECT_OPTIONS, MIGRATION_LOCK, PostgresSync
from nodeprov.core.db_sqlite import SqliteSync
from nodeprov.core.ledger import ACCOUNT_ROW, OPERATOR, AuditLine, AuditReport, Ledger
from nodeprov.core.ledger_copy_db import Joined, off_thread
from nodeprov.core.schema import MIGRATIONS
from nodeprov.errors import NodeprovError

BATCH_ROWS = 5_000  # rows read from SQLite and streamed into one COPY at a time
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EMPTY_HINT = "copy into a new, empty database (createdb), or drop this one's tables first"


class CopyRefused(NodeprovError):
    """The copy cannot start: the source or the target is not what it must be."""

    code = "copy_refused"


class CopyMismatch(NodeprovError):
    """The copied books differ from the source's; nothing was committed."""

    code = "copy_mismatch"


@dataclass(frozen=True)
class TableCopy:
    name: str
    rows: int


@dataclass(frozen=True)
class CopyReport:
    """What was copied, and the books both sides agree on."""

    source: Path
    target: str  # the URL without its password
    tables: tuple[TableCopy, ...]
    audit: AuditReport
    operator_msat: int

    @property
    def rows(self) -> int:
        return sum(table.rows for table in self.tables)


async def copy_ledger(
    source: Path,
    target_url: str,
    *,
    migrations: Sequence[Migration] = MIGRATIONS,
    batch_rows: int = BATCH_ROWS,
) -> CopyReport:
    """Copy the SQLite ledger at ``source`` into the empty PostgreSQL at ``target_url``.

    Raises :class:`CopyRefused` before anything is written, :class:`CopyMismatch` if the
    check before the commit fails; database errors pass through. The target is either the
    complete, checked copy or left exactly as it was.
    """
    if not target_url.startswith(POSTGRES_URL_PREFIXES):
        raise CopyRefused("the target must be a PostgreSQL URL: postgresql://user@host:port/db")
    if not source.is_file():
        raise CopyRefused(f"no ledger at {source}: nothing to copy")
    src = await off_thread(_open_read_only, source)
    try:
        await off_thread(src.execute, "BEGIN")  # one snapshot of the file for the whole copy
        await off_thread(_check_migrations, src, migrations)
        tables = await off_thread(_tables, src)
        counts = {table: await off_thread(_count, src, table) for table in tables}
        audit = _normal(await Ledger(Joined(SqliteSync(src))).audit())
        operator = await off_thread(_operator_msat, src)
        pg = await off_thread(
            partial(psycopg.connect, target_url, autocommit=True, **CONNECT_OPTIONS)
        )
        try:
            target = PostgresSync(pg)
            await off_thread(
                pg.execute, "BEGIN"
            )  # everything below commits together, or not at all
            try:
                await off_thread(_refuse_books, pg, {t.lower() for t in tables})
                await Joined(target, postgres=True).migrate(migrations)
                await off_thread(_copy_tables, src, pg, tables, batch_rows)
                copied = {table: await off_thread(_count, target, table) for table in tables}
                target_audit = _normal(await Ledger(Joined(target)).audit())
                _verify(counts, copied, audit, target_audit)
                _same_operator(operator, await off_thread(_operator_msat, target))
                await off_thread(pg.execute, "COMMIT")
            except BaseException:
                await asyncio.shield(off_thread(_rollback, pg))
                raise
        finally:
            await off_thread(pg.close)
    finally:
        await off_thread(src.close)
    return CopyReport(
        source=source,
        target=url_without_password(target_url),
        tables=tuple(TableCopy(table, counts[table]) for table in tables),
        audit=audit,
        operator_msat=operator,
    )


def _rollback(pg: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):  # the connection is gone: the server rolled back
        pg.execute("ROLLBACK")


def _copy_tables(
    src: sqlite3.Connection, pg: psycopg.Connection[Any], tables: list[str], batch: int
) -> None:
    """Replace the rows the migrations seeded (the operator...) with every row of the file."""
    for table in reversed(tables):
        pg.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table.lower())))
    for table in tables:
        _copy_table(src, pg, table, batch)
    _move_sequences(src, pg)


def _open_read_only(path: Path) -> sqlite3.Connection:
    # mode=ro: SQLite itself refuses any write to the file, whatever runs on this connection.
    # One statement at a time, from whichever worker thread the copy is in at that moment.
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro",
        uri=True,
        isolation_level=None,
        check_same_thread=False,
    )
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _check_migrations(src: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
    """The file must be on exactly this version's schema (copying by name needs it)."""
    try:
        done = {row[0] for row in src.execute("SELECT name FROM migrations")}
    except sqlite3.DatabaseError as exc:
        raise CopyRefused(f"the file is not a nodeprov ledger ({exc})") from None
    known = [m.name for m in migrations]
    missing = [name for name in known if name not in done]
    if missing:
        raise CopyRefused(
            f"the ledger file lacks migration {missing[0]} (an older nodeprov wrote it): run"
            " `nodeprov status` once with this version to bring it up to date, then copy"
        )
    unknown = sorted(done - set(known))
    if unknown:
        raise CopyRefused(
            f"the ledger file has migration {unknown[0]}, which this nodeprov does not know:"
            " copy with the version that wrote it"
        )


def _tables(src: sqlite3.Connection) -> list[str]:
    """The ledger's tables, each after the tables its foreign keys point to."""
    names = [
        row[0]
        for row in src.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'migrations'"
            " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY rowid"
        )
    ]
    for name in names:
        if not _NAME.match(name):
            raise CopyRefused(f"the ledger file has a table named {name!r}, not one of nodeprov's")
    order: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for name in names:
        parents = {row[2] for row in src.execute(f"PRAGMA foreign_key_list({name})")}
        order.add(name, *(parent for parent in parents if parent in names and parent != name))
    return list(order.static_order())


def _columns(src: sqlite3.Connection, table: str) -> list[str]:
    columns = [row[1] for row in src.execute(f"PRAGMA table_info({table})")]
    for column in columns:
        if not _NAME.match(column):
            raise CopyRefused(f"the ledger file has a column {table}.{column!r}")
    return columns


def _count(conn: sqlite3.Connection | PostgresSync, table: str) -> int:
    (count,) = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
    return int(count)


def _operator_msat(conn: sqlite3.Connection | PostgresSync) -> int:
    """The operator's balance as :meth:`Ledger.account` shows it (unfolded earnings in)."""
    row = conn.execute(f"{ACCOUNT_ROW} WHERE id = ?", (OPERATOR,)).fetchone()
    return int(row[2]) if row is not None else 0


def _refuse_books(pg: psycopg.Connection[Any], ours: set[str]) -> None:
    """Refuse a target with a migration recorded, a table with rows, or a table of ours."""
    pg.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))  # no node migrates now
    existing = [
        row[0]
        for row in pg.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema ="
            " current_schema() AND table_type = 'BASE TABLE' ORDER BY table_name"
        )
    ]
    filled = [table for table in existing if _has_rows(pg, table)]
    if "migrations" in filled:  # a node (or an earlier copy) opened it: books are there
        raise CopyRefused(f"the target already holds books (migrations recorded); {_EMPTY_HINT}")
    if filled:
        raise CopyRefused(f"the target is not empty: table {filled[0]} has rows; {_EMPTY_HINT}")
    clash = sorted(ours & set(existing))
    if clash:
        raise CopyRefused(f"the target already has the table {clash[0]}; {_EMPTY_HINT}")


def _has_rows(pg: psycopg.Connection[Any], table: str) -> bool:
    row = pg.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table))
    ).fetchone()
    return bool(row and row[0])


def _copy_table(
    src: sqlite3.Connection, pg: psycopg.Connection[Any], table: str, batch: int
) -> None:
    """Stream ``table``'s rows into the target with COPY, ``batch`` rows read at a time."""
    columns = _columns(src, table)
    target = {
        row[0]
        for row in pg.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = %s",
            (table.lower(),),
        )
    }
    if not target:
        raise CopyRefused(f"the ledger file has a table {table} that no migration creates")
    extra = [column for column in columns if column.lower() not in target]
    if extra:
        raise CopyRefused(f"the ledger file has a column {table}.{extra[0]} the migrations lack")
    listed = ", ".join(columns)
    copy = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table.lower()),
        sql.SQL(", ").join(sql.Identifier(c.lower()) for c in columns),
    )
    rows = src.execute(f"SELECT {listed} FROM {table}")
    with pg.cursor().copy(copy) as sink:
        while chunk := rows.fetchmany(batch):
            for row in chunk:
                sink.write_row(row)


def _move_sequences(src: sqlite3.Connection, pg: psycopg.Connection[Any]) -> None:
    """Move every identity column's sequence past the highest id used, copied or not.

    SQLite's AUTOINCREMENT tables (holds) remember ids whose rows are gone in
    ``sqlite_sequence``: a new hold must never get the id of one closed before the copy.
    """
    used: dict[str, int] = {}
    with contextlib.suppress(sqlite3.OperationalError):  # no AUTOINCREMENT table: none kept
        used = {
            name.lower(): int(seq)
            for name, seq in src.execute("SELECT name, seq FROM sqlite_sequence")
        }
    identities = pg.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND is_identity = 'YES'"
    ).fetchall()
    for table, column in identities:
        query = sql.SQL("SELECT MAX({}) FROM {}").format(
            sql.Identifier(column), sql.Identifier(table)
        )
        row = pg.execute(query).fetchone()
        high = max(int(row[0]) if row and row[0] is not None else 0, used.get(table, 0))
        if high > 0:
            pg.execute(
                "SELECT setval(pg_get_serial_sequence(%s, %s), %s)",
                (table, column, high),
            )


def _normal(report: AuditReport) -> AuditReport:
    """The report with plain ints (PostgreSQL's SUM gives Decimals), to compare and print."""
    return replace(
        report,
        lines=tuple(
            AuditLine(line.mint_url, line.unit, int(line.books_msat), int(line.proofs_msat))
            for line in report.lines
        ),
        assets_msat=int(report.assets_msat),
        liabilities_msat=int(report.liabilities_msat),
    )


def _verify(
    counts: dict[str, int], copied: dict[str, int], audit: AuditReport, target: AuditReport
) -> None:
    """The copy's rows and audit are the file's, or nothing commits."""
    for table, rows in counts.items():
        if copied[table] != rows:
            raise CopyMismatch(
                f"table {table}: {rows} rows in the file, {copied[table]} copied; nothing was"
                " committed, the target is left empty"
            )
    if target != audit:
        raise CopyMismatch(
            f"the copy's audit differs (assets {target.assets_msat} msat, owed"
            f" {target.liabilities_msat} msat; the file: {audit.assets_msat},"
            f" {audit.liabilities_msat}); nothing was committed, the target is left empty"
        )


def _same_operator(operator: int, copied: int) -> None:
    if copied != operator:
        raise CopyMismatch(
            f"the operator's balance differs ({copied} msat copied, {operator} in the file);"
            " nothing was committed, the target is left empty"
        )
