"""The data dir is 0700 and every file in it (ledger, -wal, -shm, keys, lock) 0600 from creation.

The process umask is set to the common 022 so that a file SQLite creates on its own would
come out world-readable: only creating the files private (not a chmod afterwards) passes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodeprov.cli import main
from nodeprov.client.ask import KEY_FILE, client_keys
from nodeprov.client.wallet import data_dir
from nodeprov.core.datadir import DataDirLock
from nodeprov.core.ledger import open_ledger

pytestmark = pytest.mark.integration


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


async def test_ledger_wal_and_shm_are_0600_and_the_data_dir_0700_right_after_open(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    ledger = await open_ledger(data / "ledger.sqlite3")
    try:
        assert mode(data) == 0o700
        for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"):
            assert (data / name).exists(), name
            assert mode(data / name) == 0o600, name
    finally:
        await ledger.db.close()


async def test_a_loose_existing_data_dir_and_ledger_are_tightened_on_open(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    first = await open_ledger(data / "ledger.sqlite3")
    await first.db.close()
    data.chmod(0o755)
    for path in data.iterdir():
        path.chmod(0o644)
    ledger = await open_ledger(data / "ledger.sqlite3")
    try:
        assert mode(data) == 0o700
        assert {p.name: mode(p) for p in data.iterdir()} == {p.name: 0o600 for p in data.iterdir()}
    finally:
        await ledger.db.close()


def test_lock_file_is_0600_in_a_0700_data_dir(tmp_path: Path) -> None:
    with DataDirLock.acquire(tmp_path / "data") as lock:
        assert mode(lock.data_dir) == 0o700
        assert mode(lock.data_dir / "nodeprov.lock") == 0o600


def test_init_makes_a_private_data_dir_key_and_config(tmp_path: Path) -> None:
    target = tmp_path / "nodeprov.toml"
    result = CliRunner().invoke(main, ["init", str(target)])
    assert result.exit_code == 0, result.output
    assert mode(target) == 0o600
    assert mode(tmp_path / "data") == 0o700
    assert mode(tmp_path / "data" / "nostr.key") == 0o600


def test_the_client_wallet_folder_is_0700_and_its_nostr_key_0600(tmp_path: Path) -> None:
    folder = data_dir(tmp_path / "client")
    keys = client_keys(folder)
    assert mode(folder) == 0o700
    assert mode(folder / KEY_FILE) == 0o600
    assert client_keys(folder).npub == keys.npub
