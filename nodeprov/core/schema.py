"""The ledger file's schema: one ordered list of named migrations for every table.

:func:`~nodeprov.core.ledger.open_ledger` applies the pending ones when the file opens
(each once, in order, recorded in ``migrations``); nothing creates a table at run time.
Names are never changed or reused: an existing data dir upgrades by applying the names it
has not recorded yet. The tables added by ``0004``-``0100`` were once created on first use
without a record, hence ``IF NOT EXISTS`` there: an old ledger may already hold them.
"""

from __future__ import annotations

from nodeprov.core.db import Migration

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_accounts_holds_transactions",
        """
        CREATE TABLE accounts (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            balance_msat INTEGER NOT NULL DEFAULT 0,
            reserved_msat INTEGER NOT NULL DEFAULT 0,
            total_deposited_msat INTEGER NOT NULL DEFAULT 0,
            total_spent_msat INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL,
            last_used_at INTEGER,
            expires_at INTEGER,
            refund_address TEXT,
            revoked INTEGER NOT NULL DEFAULT 0,
            CHECK (reserved_msat >= 0 AND balance_msat >= reserved_msat)
        );
        CREATE TABLE holds (
            id INTEGER PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            amount_msat INTEGER NOT NULL CHECK (amount_msat >= 0),
            purpose TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL
        );
        CREATE INDEX holds_expiry ON holds (expires_at);
        CREATE TABLE transactions (
            id INTEGER PRIMARY KEY,
            at INTEGER NOT NULL,
            account_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            delta_msat INTEGER NOT NULL,
            ref TEXT,
            detail TEXT
        );
        CREATE INDEX transactions_account ON transactions (account_id, id);
        CREATE TABLE assets (
            mint_url TEXT NOT NULL,
            unit TEXT NOT NULL,
            value_msat INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (mint_url, unit)
        );
        CREATE TABLE processed (
            kind TEXT NOT NULL,
            id TEXT NOT NULL,
            at INTEGER NOT NULL,
            PRIMARY KEY (kind, id)
        );
        INSERT INTO accounts (id, kind, created_at) VALUES ('operator', 'operator', 0)
        """,
    ),
    Migration(
        "0002_wallet_journal",
        """
        CREATE TABLE wallet_ops (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            mint_url TEXT NOT NULL,
            unit TEXT NOT NULL,
            account_id TEXT,
            amount INTEGER NOT NULL,
            debit_msat INTEGER NOT NULL DEFAULT 0,
            fee INTEGER NOT NULL DEFAULT 0,
            fingerprint TEXT,
            token TEXT,
            inputs TEXT,
            outputs TEXT,
            quote TEXT,
            ref TEXT,
            error TEXT,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX wallet_ops_state ON wallet_ops (state);
        CREATE INDEX wallet_ops_fingerprint ON wallet_ops (fingerprint);
        CREATE TABLE proofs (
            secret TEXT PRIMARY KEY,
            mint_url TEXT NOT NULL,
            unit TEXT NOT NULL,
            keyset_id TEXT NOT NULL,
            amount INTEGER NOT NULL CHECK (amount > 0),
            C TEXT NOT NULL,
            dleq TEXT,
            state TEXT NOT NULL,
            op_id INTEGER,
            created_at INTEGER NOT NULL
        );
        CREATE INDEX proofs_pool ON proofs (mint_url, unit, state, amount)
        """,
    ),
    Migration(
        "0003_hold_state",
        """
        ALTER TABLE holds ADD COLUMN state TEXT NOT NULL DEFAULT 'open'
        """,
    ),
    # Mint quotes that fund API keys over Lightning (nodeprov.core.lightning_funding).
    Migration(
        "0004_lightning_funding",
        """
        CREATE TABLE IF NOT EXISTS lightning_funding (
            id TEXT PRIMARY KEY,
            op_id INTEGER NOT NULL UNIQUE,
            invoice TEXT NOT NULL,
            expires_at INTEGER NOT NULL,
            new_key INTEGER NOT NULL,
            api_key TEXT,
            key_expires_at INTEGER,
            refund_address TEXT,
            created_at INTEGER NOT NULL
        )
        """,
    ),
    # Refunds of expired keys to their Lightning address (nodeprov.core.expiry).
    Migration(
        "0005_key_refunds",
        """
        CREATE TABLE IF NOT EXISTS key_refunds (
            account_id TEXT PRIMARY KEY,
            address TEXT NOT NULL,
            state TEXT NOT NULL,
            failures INTEGER NOT NULL DEFAULT 0,
            next_at INTEGER NOT NULL DEFAULT 0,
            balance_msat INTEGER NOT NULL DEFAULT 0,
            refunded_msat INTEGER NOT NULL DEFAULT 0,
            fees_msat INTEGER NOT NULL DEFAULT 0,
            quote TEXT,
            error TEXT,
            updated_at INTEGER NOT NULL
        )
        """,
    ),
    # Payouts of operator earnings (nodeprov.payouts).
    Migration(
        "0006_payouts",
        """
        CREATE TABLE IF NOT EXISTS payouts (
            id INTEGER PRIMARY KEY,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            address TEXT NOT NULL,
            budget_msat INTEGER NOT NULL,
            amount_msat INTEGER NOT NULL DEFAULT 0,
            cost_msat INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL,
            mint_url TEXT,
            unit TEXT,
            quote TEXT,
            error TEXT
        )
        """,
    ),
    # Holds become leases renewed by their running job, carry the job's reference, and a
    # settled job's outcome is kept under that reference (nodeprov.core.holds, charges).
    Migration(
        "0007_hold_leases_job_outcomes",
        """
        ALTER TABLE holds RENAME COLUMN expires_at TO lease_expires_at;
        ALTER TABLE holds ADD COLUMN ref TEXT;
        CREATE INDEX holds_ref ON holds (ref);
        CREATE TABLE job_outcomes (
            ref TEXT PRIMARY KEY,
            account_id TEXT NOT NULL,
            charged_msat INTEGER NOT NULL,
            cost_msat INTEGER NOT NULL,
            input_msat INTEGER NOT NULL,
            output_msat INTEGER NOT NULL,
            result TEXT,
            at INTEGER NOT NULL
        );
        CREATE INDEX job_outcomes_at ON job_outcomes (at)
        """,
    ),
    # Money moves keyed by a reference (dm:<event id>) look up their earlier outcome.
    Migration(
        "0008_wallet_ops_ref",
        """
        CREATE INDEX IF NOT EXISTS wallet_ops_ref ON wallet_ops (ref, kind)
        """,
    ),
    # Hold ids are never reused: a late settle, renew or release of a hold that is gone must
    # not touch a newer job's hold that took its id (SQLite reuses the highest rowid freed).
    Migration(
        "0009_hold_ids_never_reused",
        """
        CREATE TABLE holds_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            account_id TEXT NOT NULL REFERENCES accounts(id),
            amount_msat INTEGER NOT NULL CHECK (amount_msat >= 0),
            purpose TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            lease_expires_at INTEGER NOT NULL,
            state TEXT NOT NULL DEFAULT 'open',
            ref TEXT
        );
        INSERT INTO holds_new
            (id, account_id, amount_msat, purpose, created_at, lease_expires_at, state, ref)
            SELECT id, account_id, amount_msat, purpose, created_at, lease_expires_at, state, ref
            FROM holds;
        DROP TABLE holds;
        ALTER TABLE holds_new RENAME TO holds;
        CREATE INDEX holds_expiry ON holds (lease_expires_at);
        CREATE INDEX holds_ref ON holds (ref)
        """,
    ),
    # DM jobs and the listener's cursor (nodeprov.nostr.dm_store).
    Migration(
        "0100_nostr_dm_jobs",
        """
        CREATE TABLE IF NOT EXISTS nostr_dm_jobs (
            event_id TEXT PRIMARY KEY,
            sender TEXT NOT NULL,
            nip TEXT NOT NULL,
            state TEXT NOT NULL,
            replies TEXT,
            reply_to TEXT,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX IF NOT EXISTS nostr_dm_jobs_state ON nostr_dm_jobs (state);
        CREATE TABLE IF NOT EXISTS nostr_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL)
        """,
    ),
    # What the dashboard shows per request: a charge's channel (http, nostr), model, hold and
    # request (the key its rows share: the hold, or the per-request token's account), and an
    # API key's masked form as ``/v1/wallet/balance`` shows it, to find the key by it.
    Migration(
        "0101_request_channel_and_key_hint",
        """
        ALTER TABLE transactions ADD COLUMN request TEXT;
        ALTER TABLE transactions ADD COLUMN channel TEXT;
        ALTER TABLE transactions ADD COLUMN model TEXT;
        ALTER TABLE transactions ADD COLUMN held_msat INTEGER;
        ALTER TABLE accounts ADD COLUMN key_hint TEXT;
        CREATE INDEX accounts_key_hint ON accounts (key_hint)
        """,
    ),
    # The operator's earnings accumulate in shards (nodeprov.core.holds): every paid request
    # credits the operator, and one row for all of them would serialise the commits of every
    # writer on PostgreSQL. The sweeper folds them into the operator's balance.
    Migration(
        "0102_operator_earnings_shards",
        """
        CREATE TABLE operator_earnings (
            shard INTEGER PRIMARY KEY,
            unfolded_msat INTEGER NOT NULL DEFAULT 0 CHECK (unfolded_msat >= 0)
        );
        INSERT INTO operator_earnings (shard) VALUES
            (0), (1), (2), (3), (4), (5), (6), (7), (8), (9), (10), (11), (12), (13), (14), (15),
            (16), (17), (18), (19), (20), (21), (22), (23), (24), (25), (26), (27), (28), (29),
            (30), (31)
        """,
    ),
    # NIP-98 auth events used once (nodeprov.core.auth_events): the unique signature makes a
    # replay fail on every worker sharing the books; the sweeper prunes rows past the window.
    Migration(
        "0110_nip98_replay",
        """
        CREATE TABLE auth_events (
            sig TEXT PRIMARY KEY,
            event_id TEXT NOT NULL,
            pubkey TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            used_at INTEGER NOT NULL
        );
        CREATE INDEX auth_events_created_at ON auth_events (created_at)
        """,
    ),
    # NIP-90 jobs (kind 5050) and how far each got (nodeprov.nostr.nip90_store): the request
    # event, the invoice it waits for, the events to publish once it is done.
    Migration(
        "0130_nip90_jobs",
        """
        CREATE TABLE nostr_nip90_jobs (
            event_id TEXT PRIMARY KEY,
            customer TEXT NOT NULL,
            request TEXT NOT NULL,
            state TEXT NOT NULL,
            quote_id TEXT,
            replies TEXT,
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX nostr_nip90_jobs_state ON nostr_nip90_jobs (state)
        """,
    ),
    # Child keys (nodeprov.core.child_keys): a key that spends from its parent key's balance
    # up to its own limit. A child holds no money: its holds reserve on the parent's account
    # (holds.child_id names the child) and on its own remaining limit, in one transaction.
    Migration(
        "0120_child_keys",
        """
        CREATE TABLE child_keys (
            id TEXT PRIMARY KEY,
            key_account TEXT NOT NULL UNIQUE,
            parent_id TEXT NOT NULL REFERENCES accounts(id),
            label TEXT,
            limit_msat INTEGER,
            spent_msat INTEGER NOT NULL DEFAULT 0,
            reserved_msat INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL,
            last_used_at INTEGER,
            expires_at INTEGER,
            revoked INTEGER NOT NULL DEFAULT 0,
            key_hint TEXT,
            CHECK (reserved_msat >= 0 AND spent_msat >= 0),
            CHECK (limit_msat IS NULL OR spent_msat + reserved_msat <= limit_msat)
        );
        CREATE INDEX child_keys_parent ON child_keys (parent_id);
        ALTER TABLE holds ADD COLUMN child_id TEXT
        """,
    ),
)
