"""``nodeprov ledger copy``: the books of a SQLite data dir moved into an empty PostgreSQL.

The source is a real node's ledger file with real activity against a real mint (a key
funded by a token, a charge, a withdrawal, an open hold, a DM job); the target a real
PostgreSQL database. What was copied must be the same books: the same audit, the same
balances, a key that still pays, hold ids that are never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from nodeprov.cli import main
from nodeprov.config import Config
from nodeprov.core.datadir import DataDirLock
from nodeprov.core.ledger import OPERATOR, AuditReport, open_ledger
from nodeprov.core.ledger_copy import CopyRefused, copy_ledger
from nodeprov.core.payments import Payer
from nodeprov.nostr.dm_store import DmStore
from tests.support.daemon_core import make_core, write_config
from tests.support.services import MintHandle

MODEL = "demo-chat"  # write_config's model: 1000 msat per 1M input tokens
BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
USAGE = {"prompt_tokens": 5000, "completion_tokens": 7}
EVENT = "e" * 64


def job(usage: Mapping[str, Any] = USAGE) -> Any:
    async def run() -> tuple[str, Mapping[str, Any]]:
        return "ok", usage

    return run


@dataclass(frozen=True)
class Books:
    """A node's books after some real activity, as the SQLite file holds them."""

    config: Config
    api_key: str
    account_id: str
    audit: AuditReport
    balance_msat: int
    operator_msat: int
    last_hold_id: int  # the highest hold id ever used (that hold is gone)

    @property
    def path(self) -> Path:
        return self.config.ledger_path


async def busy_books(tmp_path: Path, mint: MintHandle, make_token: Any) -> Books:
    config = write_config(tmp_path, mint.url)
    core = await make_core(config)
    try:
        api_key, account = await core.payments.create_key(await make_token(100, mint=mint))
        await core.payments.run(Payer("api_key", api_key), MODEL, BODY, job())
        await core.payments.withdraw(account.id, 10_000)  # proofs out, a wallet op
        await core.ledger.hold(account.id, 2_000, ref="dm:still-running")  # stays open
        gone = await core.ledger.hold(account.id, 1_000)
        await core.ledger.release(gone)  # the highest id ever used is no longer in holds
        store = DmStore(core.ledger.db)
        await store.accept(EVENT, "f" * 64, "nip17", "r" * 64)
        await store.done(EVENT, ['{"answer": "ok"}'])
        await store.set_watermark(1_700_000_000)
        audit = await core.ledger.audit()
        assert audit.ok and audit.assets_msat > 0, audit
        user = await core.ledger.account(account.id)
        operator = await core.ledger.account(OPERATOR)
        assert user is not None and operator is not None
    finally:
        await core.close()
    return Books(
        config,
        api_key,
        account.id,
        audit,
        user.balance_msat,
        operator.balance_msat,  # unfolded earnings included, as Ledger.account shows them
        gone.id,
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pg_tables(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() ORDER BY table_name"
        ).fetchall()
    return [row[0] for row in rows]


def pg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [tuple(row) for row in conn.execute(sql).fetchall()]


def on_postgres(config: Config, tmp_path: Path, url: str) -> Config:
    """The same node (data dir, keys' secret) with its ledger on ``url``."""
    mints = list(config.wallet.mints)
    return write_config(tmp_path, mints, extra=f'[ledger]\nurl = "{url}"')


# --- the copy ------------------------------------------------------------------------------


async def test_copied_books_audit_the_same_and_a_key_still_pays_on_postgres(
    tmp_path: Path, mint: MintHandle, make_token: Any, postgres_url: str
) -> None:
    books = await busy_books(tmp_path, mint, make_token)
    before = digest(books.path)

    report = await copy_ledger(books.path, postgres_url)

    assert digest(books.path) == before  # the way back stays open
    copied = {table.name: table.rows for table in report.tables}
    assert copied["accounts"] == 2 and copied["holds"] == 1 and copied["nostr_dm_jobs"] == 1
    assert copied["proofs"] > 0 and copied["transactions"] >= 4 and copied["wallet_ops"] >= 2
    assert "migrations" not in copied and not any(name.startswith("sqlite_") for name in copied)
    assert report.rows == sum(copied.values())
    assert report.audit == books.audit and report.operator_msat == books.operator_msat
    names = [row[0] for row in pg_rows(postgres_url, "SELECT name FROM migrations ORDER BY name")]
    with contextlib.closing(sqlite3.connect(books.path)) as source:
        expected = [row[0] for row in source.execute("SELECT name FROM migrations ORDER BY name")]
    assert names == expected

    core = await make_core(on_postgres(books.config, tmp_path, postgres_url))
    try:
        assert core.ledger.db.backend == "postgresql"
        assert await core.ledger.audit() == books.audit
        user = await core.ledger.account(books.account_id)
        assert user is not None and user.balance_msat == books.balance_msat
        assert user.reserved_msat == 2_000  # the open hold came along
        operator = await core.ledger.account(OPERATOR)
        assert operator is not None and operator.balance_msat == books.operator_msat
        job_row = await DmStore(core.ledger.db).get(EVENT)
        assert job_row is not None and tuple(job_row.replies) == ('{"answer": "ok"}',)
        assert await DmStore(core.ledger.db).watermark() == 1_700_000_000

        _, settled = await core.payments.run(Payer("api_key", books.api_key), MODEL, BODY, job())
        assert settled.charged_msat > 0
        paid = await core.ledger.account(books.account_id)
        assert paid is not None and paid.balance_msat == books.balance_msat - settled.charged_msat
        fresh = await core.ledger.hold(books.account_id, 1_000)
        assert fresh.id > books.last_hold_id  # never an id an earlier hold had
        await core.ledger.release(fresh)
        assert (await core.ledger.audit()).ok
    finally:
        await core.close()


async def test_commits_a_killed_node_left_in_the_wal_are_copied(
    tmp_path: Path, mint: MintHandle, make_token: Any, postgres_url: str
) -> None:
    books = await busy_books(tmp_path, mint, make_token)
    # A process killed before SQLite checkpointed: its last commit is only in the -wal file.
    script = (
        "import os, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1])\n"
        "conn.execute('PRAGMA wal_autocheckpoint=0')\n"
        "conn.execute(\"INSERT INTO nostr_state (key, value) VALUES ('late', 7)\")\n"
        "conn.commit()\n"
        "os._exit(0)\n"
    )
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script, str(books.path)], check=True
    )
    assert done.returncode == 0
    wal = books.path.with_name(books.path.name + "-wal")
    assert wal.stat().st_size > 0
    before = digest(books.path)

    await copy_ledger(books.path, postgres_url)

    assert pg_rows(postgres_url, "SELECT value FROM nostr_state WHERE key = 'late'") == [(7,)]
    assert digest(books.path) == before


async def test_a_target_that_holds_books_is_refused_and_left_as_it_was(
    tmp_path: Path, mint: MintHandle, make_token: Any, postgres_url: str
) -> None:
    books = await busy_books(tmp_path, mint, make_token)
    ledger = await open_ledger(postgres_url)  # a node already ran on it
    try:
        await ledger.open_account("key:already-here", "api_key")
    finally:
        await ledger.db.close()
    tables = pg_tables(postgres_url)
    accounts = pg_rows(postgres_url, "SELECT id, balance_msat FROM accounts ORDER BY id")

    with pytest.raises(CopyRefused) as refused:
        await copy_ledger(books.path, postgres_url)

    assert "already holds books" in refused.value.message
    assert "empty database" in refused.value.message and "\n" not in refused.value.message
    assert pg_tables(postgres_url) == tables
    assert pg_rows(postgres_url, "SELECT id, balance_msat FROM accounts ORDER BY id") == accounts


async def test_a_target_with_rows_of_its_own_is_refused(
    tmp_path: Path, mint: MintHandle, make_token: Any, postgres_url: str
) -> None:
    books = await busy_books(tmp_path, mint, make_token)
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")

    with pytest.raises(CopyRefused) as refused:
        await copy_ledger(books.path, postgres_url)

    assert "notes" in refused.value.message
    assert pg_tables(postgres_url) == ["notes"]
    assert pg_rows(postgres_url, "SELECT body FROM notes") == [("keep me",)]


async def test_a_failure_mid_copy_leaves_the_target_empty(
    tmp_path: Path, mint: MintHandle, make_token: Any, postgres_url: str
) -> None:
    books = await busy_books(tmp_path, mint, make_token)
    # A value SQLite's loose typing kept but PostgreSQL's BIGINT refuses: the copy fails at a
    # table copied after the accounts, holds, transactions, proofs and wallet ops.
    with contextlib.closing(sqlite3.connect(books.path)) as source:
        source.execute("UPDATE nostr_dm_jobs SET updated_at = 'yesterday'")
        source.commit()

    with pytest.raises(psycopg.Error):
        await copy_ledger(books.path, postgres_url)

    assert pg_tables(postgres_url) == []  # no table, no migration recorded: empty as before
    with contextlib.closing(sqlite3.connect(books.path)) as source:
        source.execute("UPDATE nostr_dm_jobs SET updated_at = 1")
        source.commit()
    report = await copy_ledger(books.path, postgres_url)  # again, at once
    assert report.audit == books.audit


async def test_an_out_of_date_ledger_file_is_refused(
    tmp_path: Path, mint: MintHandle, make_token: Any, postgres_url: str
) -> None:
    books = await busy_books(tmp_path, mint, make_token)
    with contextlib.closing(sqlite3.connect(books.path)) as source:
        source.execute("DELETE FROM migrations WHERE name = '0102_operator_earnings_shards'")
        source.commit()

    with pytest.raises(CopyRefused) as refused:
        await copy_ledger(books.path, postgres_url)

    assert "0102_operator_earnings_shards" in refused.value.message
    assert "nodeprov status" in refused.value.message
    assert pg_tables(postgres_url) == []


# --- the command ---------------------------------------------------------------------------


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    return CliRunner(env={"NODEPROV_CONFIG": None})


async def cli(runner: CliRunner, tmp_path: Path, *args: str) -> Result:
    argv = ["-c", str(tmp_path / "nodeprov.toml"), *args]
    return await asyncio.to_thread(runner.invoke, main, argv, catch_exceptions=False)


def one_error_line(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ")
    return result.stderr


async def test_ledger_copy_prints_the_summary_and_the_config_line_without_the_password(
    runner: CliRunner, tmp_path: Path, mint: MintHandle, make_token: Any, postgres_url: str
) -> None:
    books = await busy_books(tmp_path, mint, make_token)
    # The test server trusts local connections: the password is accepted and never checked.
    with_password = postgres_url.replace("postgres@", "postgres:s3cret-pw@", 1)
    assert with_password != postgres_url
    without = postgres_url

    result = await cli(runner, tmp_path, "ledger", "copy", "--to", with_password)

    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output
    out = result.stdout
    assert f"assets {books.audit.assets_msat} msat" in out
    assert f"operator {books.operator_msat} msat" in out
    assert f'[ledger]\n  url = "{without}"\n' in out
    assert f"NODEPROV_LEDGER__URL='{without}'" in out
    assert "PGPASSWORD" in out  # where the password goes instead
    assert pg_rows(postgres_url, "SELECT COUNT(*) FROM accounts") == [(2,)]


async def test_ledger_copy_is_refused_while_the_node_runs(
    runner: CliRunner, tmp_path: Path, mint: MintHandle, make_token: Any, postgres_url: str
) -> None:
    books = await busy_books(tmp_path, mint, make_token)
    with DataDirLock.acquire(books.config.node.data_dir, "start"):
        result = await cli(runner, tmp_path, "ledger", "copy", "--to", postgres_url)
    error = one_error_line(result, 2)
    assert "the node is running" in error and "stop it first" in error
    assert pg_tables(postgres_url) == []


async def test_ledger_copy_refuses_a_ledger_already_on_postgres_and_a_non_postgres_target(
    runner: CliRunner, tmp_path: Path, mint: MintHandle, postgres_url: str
) -> None:
    write_config(tmp_path, mint.url, extra=f'[ledger]\nurl = "{postgres_url}"')
    error = one_error_line(await cli(runner, tmp_path, "ledger", "copy", "--to", postgres_url), 2)
    assert "already on PostgreSQL" in error

    write_config(tmp_path, mint.url)
    target = f"sqlite:///{tmp_path / 'other.sqlite3'}"
    error = one_error_line(await cli(runner, tmp_path, "ledger", "copy", "--to", target), 2)
    assert "postgresql://" in error
    error = one_error_line(await cli(runner, tmp_path, "ledger", "copy", "--to", postgres_url), 2)
    assert "no ledger" in error  # nothing to copy yet: the node never ran
    assert pg_tables(postgres_url) == []
