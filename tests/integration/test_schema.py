"""One migration list for every table, applied when the ledger opens; old data dirs upgrade.

Before this list, the payouts, Lightning funding, key refund and Nostr DM tables were
created at run time (``CREATE TABLE IF NOT EXISTS`` on first use, some inside status
polls) and never recorded in ``migrations``. A ledger written by that code must open
with its rows intact, record each migration once, and never apply one twice.
"""

from __future__ import annotations

import ast
from pathlib import Path

from nodeprov.core.db import open_database
from nodeprov.core.ledger import open_ledger
from nodeprov.core.schema import MIGRATIONS

PACKAGE = Path(__file__).resolve().parents[2] / "nodeprov"

# The core migrations the old code recorded (the names are kept so old ledgers upgrade).
OLD_CORE = ("0001_accounts_holds_transactions", "0002_wallet_journal", "0003_hold_state")

# What the old code's run-time ``ensure`` calls created, with a row in each.
OLD_RUNTIME_TABLES = """
CREATE TABLE IF NOT EXISTS payouts (
    id INTEGER PRIMARY KEY, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
    address TEXT NOT NULL, budget_msat INTEGER NOT NULL,
    amount_msat INTEGER NOT NULL DEFAULT 0, cost_msat INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL, mint_url TEXT, unit TEXT, quote TEXT, error TEXT
);
INSERT INTO payouts (created_at, updated_at, address, budget_msat, state)
    VALUES (1, 1, 'op@example.com', 5000, 'paid');
CREATE TABLE IF NOT EXISTS key_refunds (
    account_id TEXT PRIMARY KEY, address TEXT NOT NULL, state TEXT NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0, next_at INTEGER NOT NULL DEFAULT 0,
    balance_msat INTEGER NOT NULL DEFAULT 0, refunded_msat INTEGER NOT NULL DEFAULT 0,
    fees_msat INTEGER NOT NULL DEFAULT 0, quote TEXT, error TEXT, updated_at INTEGER NOT NULL
);
INSERT INTO key_refunds (account_id, address, state, updated_at)
    VALUES ('key:old', 'user@example.com', 'paid', 1);
CREATE TABLE IF NOT EXISTS nostr_dm_jobs (
    event_id TEXT PRIMARY KEY, sender TEXT NOT NULL, nip TEXT NOT NULL, state TEXT NOT NULL,
    replies TEXT, reply_to TEXT, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS nostr_dm_jobs_state ON nostr_dm_jobs (state);
CREATE TABLE IF NOT EXISTS nostr_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO nostr_dm_jobs (event_id, sender, nip, state, created_at, updated_at)
    VALUES ('e1', 'p1', 'nip17', 'sent', 1, 1);
INSERT INTO nostr_state (key, value) VALUES ('since', 42)
"""

RUNTIME_TABLES = {"payouts", "lightning_funding", "key_refunds", "nostr_dm_jobs", "nostr_state"}


async def _tables(path: Path) -> set[str]:
    ledger = await open_ledger(path)
    try:
        rows = await ledger.db.fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {r[0] for r in rows}
    finally:
        await ledger.db.close()


async def test_open_ledger_creates_every_table_the_node_uses(tmp_path: Path) -> None:
    assert await _tables(tmp_path / "ledger.sqlite3") >= RUNTIME_TABLES


async def test_a_ledger_from_the_old_code_path_upgrades_once_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite3"
    # The old open path: the core migrations only, then the run-time tables on first use.
    db = await open_database(path, [m for m in MIGRATIONS if m.name in OLD_CORE])
    async with db.write() as conn:
        for statement in OLD_RUNTIME_TABLES.split(";"):
            if statement.strip():
                await conn.execute(statement)
    await db.close()

    first = await open_ledger(path)
    try:
        applied = {
            r["name"]: r["applied_at"]
            for r in await first.db.fetchall("SELECT name, applied_at FROM migrations")
        }
        payout = await first.db.fetchone("SELECT address, budget_msat FROM payouts")
        assert payout is not None and tuple(payout) == ("op@example.com", 5000)
        refund = await first.db.fetchone("SELECT account_id, state FROM key_refunds")
        assert refund is not None and tuple(refund) == ("key:old", "paid")
        job = await first.db.fetchone("SELECT event_id, state FROM nostr_dm_jobs")
        assert job is not None and tuple(job) == ("e1", "sent")
        since = await first.db.fetchone("SELECT value FROM nostr_state WHERE key = 'since'")
        assert since is not None and since[0] == 42
        assert await first.db.fetchall("SELECT * FROM lightning_funding") == []
    finally:
        await first.db.close()
    assert set(OLD_CORE) < set(applied)
    assert await _tables(path) >= RUNTIME_TABLES

    again = await open_ledger(path)
    try:
        rows = await again.db.fetchall("SELECT name, applied_at FROM migrations")
        assert {r["name"]: r["applied_at"] for r in rows} == applied
        assert len(rows) == len(applied)
        assert len(await again.db.fetchall("SELECT * FROM payouts")) == 1
    finally:
        await again.db.close()


def test_only_the_schema_module_creates_or_alters_tables() -> None:
    """No table is created at run time (on first use, inside a status poll): one list does it."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in ("core/schema.py", "core/db_base.py"):  # db_base: the migrations table
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = " ".join(node.value.upper().split())
                if any(ddl in text for ddl in ("CREATE TABLE", "ALTER TABLE", "CREATE INDEX")):
                    offenders.append(f"{relative}:{node.lineno}")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in (
                "ensure_schema",
                "ensure",
            ):
                offenders.append(f"{relative}:{node.lineno} defines {node.name}()")
    assert offenders == []
