"""The throwaway PostgreSQL the tests run against (tests/support/postgres.py) does what it says."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from tests.support.postgres import PostgresServer, children_of


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie has ended already)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_server_accepts_connections_with_the_test_settings(postgres_server: PostgresServer) -> None:
    with psycopg.connect(postgres_server.url) as conn:
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()
            for name in ("fsync", "synchronous_commit", "max_connections", "server_encoding")
        }
    assert settings == {
        "fsync": ("off",),
        "synchronous_commit": ("off",),
        "max_connections": ("300",),
        "server_encoding": ("UTF8",),
    }
    assert postgres_server.url.startswith("postgresql://postgres@127.0.0.1:")


def test_two_created_databases_are_independent_and_empty(postgres_server: PostgresServer) -> None:
    first = postgres_server.create_database()
    second = postgres_server.create_database()
    assert first != second
    with psycopg.connect(first) as conn:
        conn.execute("CREATE TABLE accounts (id text PRIMARY KEY, balance_msat bigint)")
        conn.execute("INSERT INTO accounts VALUES ('a', 5)")
    with psycopg.connect(second) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
    with psycopg.connect(first) as conn:
        assert conn.execute("SELECT balance_msat FROM accounts").fetchall() == [(5,)]
    postgres_server.drop_database(first)
    postgres_server.drop_database(second)
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(first).close()


def test_postgres_url_fixture_gives_a_fresh_database(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() != ("postgres",)
        conn.execute("CREATE TABLE t (v int)")


def test_ledger_url_names_its_backend(ledger_url: str, request: pytest.FixtureRequest) -> None:
    backend = request.node.callspec.id
    assert backend in ("sqlite", "postgresql")
    assert ledger_url.startswith(f"{backend}:")
    if backend == "sqlite":
        assert ledger_url.endswith("/ledger.sqlite3")


def test_data_dir_is_private_and_not_owned_by_root(postgres_server: PostgresServer) -> None:
    info = postgres_server.data_dir.stat()
    assert info.st_mode & 0o777 == 0o700
    if os.geteuid() == 0:
        assert info.st_uid != 0
        with psycopg.connect(postgres_server.url) as conn:
            row = conn.execute("SELECT current_setting('data_directory')").fetchone()
        assert row == (str(postgres_server.data_dir),)


def test_a_second_server_runs_beside_the_first_and_stop_leaves_nothing(
    postgres_server: PostgresServer, postgres_bin_dir: Path, tmp_path: Path
) -> None:
    second = PostgresServer.start(tmp_path)
    try:
        assert second.port != postgres_server.port
        url = second.create_database("beside")
        with psycopg.connect(postgres_server.url) as other:
            assert other.execute("SELECT 1").fetchone() == (1,)
        # A client session stays open while stopping: the fast shutdown must end it too.
        client = psycopg.connect(url, autocommit=True)
        client.execute("CREATE TABLE only_here (v int)")
        postmaster = second.pid
        assert postmaster is not None
        processes = [postmaster, *children_of(postmaster)]
        assert len(processes) > 2  # the postmaster, its backend for us, its helpers
        root = second.root
        second.stop()
        client.close()
        assert [pid for pid in processes if _alive(pid)] == []
        assert not root.exists()
        assert not second.running
        second.stop()  # idempotent
    finally:
        second.stop()
    # The session's server is untouched.
    with psycopg.connect(postgres_server.url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
