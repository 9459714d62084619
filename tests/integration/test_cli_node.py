"""CLI ``announce`` against a real relay, and ``admin set-password``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nodeprov.admin_password import load_or_create, verify_password
from nodeprov.cli import main
from tests.support.daemon_core import write_config
from tests.support.services import MintHandle, RelayHandle


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    return CliRunner(env={"NODEPROV_CONFIG": None})


async def cli(runner: CliRunner, tmp_path: Path, *args: str, stdin: str = "") -> Result:
    argv = ["-c", str(tmp_path / "nodeprov.toml"), *args]
    return await asyncio.to_thread(runner.invoke, main, argv, input=stdin)


async def test_announce_reports_each_kind_per_relay(
    runner: CliRunner, tmp_path: Path, mint: MintHandle, relay: RelayHandle
) -> None:
    write_config(tmp_path, mint.url, extra=f'[nostr]\nrelays = ["{relay.url}"]\n')
    result = await cli(runner, tmp_path, "announce", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["npub"].startswith("npub1")
    assert set(data["kinds"]) == {"0", "10050", "38421", "31990"}
    for outcome in data["kinds"].values():
        assert outcome["accepted"] == [relay.url]
    text = await cli(runner, tmp_path, "announce")
    assert "kind 38421 (listing): accepted by 1" in text.stdout


async def test_announce_without_relays_is_one_error_line(
    runner: CliRunner, tmp_path: Path, mint: MintHandle
) -> None:
    write_config(tmp_path, mint.url)
    result = await cli(runner, tmp_path, "announce")
    assert result.exit_code == 1 and result.stderr.startswith("error: no relays")


async def test_set_password_stores_a_verifiable_hash(
    runner: CliRunner, tmp_path: Path, mint: MintHandle
) -> None:
    config = write_config(tmp_path, mint.url)
    short = await cli(runner, tmp_path, "admin", "set-password", stdin="short\nshort\n")
    assert short.exit_code == 1 and "8 characters" in short.stderr
    result = await cli(
        runner, tmp_path, "admin", "set-password", stdin="a long passphrase\na long passphrase\n"
    )
    assert result.exit_code == 0, result.output
    stored = config.node.data_dir / "admin_password"
    assert stored.stat().st_mode & 0o777 == 0o600
    encoded, generated = load_or_create(config)
    assert generated is None and verify_password("a long passphrase", encoded)
