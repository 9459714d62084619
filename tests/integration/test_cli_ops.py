"""CLI ``keys list|show|revoke`` and ``wallet withdraw|payout`` on a real ledger and mint.

The CLI opens the ledger itself (no daemon). Each command runs in a worker thread because
it starts its own event loop, as it does when run from a shell.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from nodeprov.cli import main
from nodeprov.core.ledger import OPERATOR
from nodeprov.core.payments import Payer
from nodeprov.errors import Unauthorized
from tests.support.daemon_core import make_core, write_config
from tests.support.lnurl_server import LnurlServer
from tests.support.services import MintHandle


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    return CliRunner(env={"NODEPROV_CONFIG": None})


@pytest.fixture
def lnurl(fee_mint: MintHandle) -> Iterator[LnurlServer]:
    server = LnurlServer(fee_mint.url).start()
    try:
        yield server
    finally:
        server.close()


async def cli(runner: CliRunner, tmp_path: Path, *args: str) -> Result:
    argv = ["-c", str(tmp_path / "nodeprov.toml"), *args]
    return await asyncio.to_thread(runner.invoke, main, argv, catch_exceptions=False)


def one_error_line(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ")
    return result.stderr


async def test_keys_show_finds_a_key_by_the_users_full_or_masked_key(
    runner: CliRunner, tmp_path: Path, mint: MintHandle, make_token: Any
) -> None:
    config = write_config(tmp_path, mint.url)
    core = await make_core(config)
    try:
        key, account = await core.payments.create_key(await make_token(9, mint=mint))
        await core.payments.create_key(await make_token(3, mint=mint))
    finally:
        await core.close()
    masked = key[:7] + "…" + key[-4:]  # as GET /v1/wallet/balance shows it
    for name in (key, masked, key[:7] + "..." + key[-4:]):
        shown = await cli(runner, tmp_path, "keys", "show", name, "--json")
        assert shown.exit_code == 0, shown.output
        view = json.loads(shown.stdout)
        assert view["id"] == account.id and view["key_hint"] == masked
    text = await cli(runner, tmp_path, "keys", "show", key)
    assert f"{'key:':<22}{masked}\n" in text.stdout
    assert "no account matches 'sk-unknown'" in one_error_line(
        await cli(runner, tmp_path, "keys", "show", "sk-unknown")
    )


async def test_keys_list_show_revoke(
    runner: CliRunner, tmp_path: Path, mint: MintHandle, make_token: Any
) -> None:
    config = write_config(tmp_path, mint.url)
    core = await make_core(config)
    try:
        key_a, account_a = await core.payments.create_key(await make_token(40, mint=mint))
        _, account_b = await core.payments.create_key(await make_token(7, mint=mint))
    finally:
        await core.close()
    short = account_a.id.split(":", 1)[1][:10]

    listed = await cli(runner, tmp_path, "keys", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {r["id"]: r for r in json.loads(listed.stdout)["accounts"]}
    assert set(rows) == {account_a.id, account_b.id}  # the operator is not listed
    assert rows[account_a.id]["balance_msat"] == 40_000 and rows[account_a.id]["revoked"] is False
    rich = json.loads(
        (
            await cli(runner, tmp_path, "keys", "list", "--min-balance-msat", "10000", "--json")
        ).stdout
    )
    assert [r["id"] for r in rich["accounts"]] == [account_a.id]
    table = await cli(runner, tmp_path, "keys", "list")
    assert account_a.id[:22] in table.stdout and "40000" in table.stdout

    shown = json.loads((await cli(runner, tmp_path, "keys", "show", short, "--json")).stdout)
    assert shown["id"] == account_a.id and shown["available_msat"] == 40_000
    assert [t["kind"] for t in shown["transactions"]] == ["deposit"]
    text = await cli(runner, tmp_path, "keys", "show", account_a.id[:12])
    assert "status:" in text.stdout and "active" in text.stdout and "+40000 msat" in text.stdout

    revoked = await cli(runner, tmp_path, "keys", "revoke", short)
    assert revoked.exit_code == 0, revoked.output
    assert revoked.stdout == f"{account_a.id} revoked (balance 40000 msat kept)\n"
    again = json.loads((await cli(runner, tmp_path, "keys", "revoke", short, "--json")).stdout)
    assert again["changed"] is False and again["account"]["revoked"] is True
    only = json.loads((await cli(runner, tmp_path, "keys", "list", "--revoked", "--json")).stdout)
    assert [r["id"] for r in only["accounts"]] == [account_a.id]
    active = json.loads((await cli(runner, tmp_path, "keys", "list", "--active", "--json")).stdout)
    assert [r["id"] for r in active["accounts"]] == [account_b.id]

    core = await make_core(config)
    try:  # the payment pipeline refuses the revoked key; the books are unchanged
        with pytest.raises(Unauthorized):
            await core.payments.account_for(Payer("api_key", key_a))
        assert (await core.ledger.audit()).ok
    finally:
        await core.close()

    assert "no account id starts with 'zzzzzz'" in one_error_line(
        await cli(runner, tmp_path, "keys", "show", "zzzzzz")
    )
    assert "at least 4 characters" in one_error_line(
        await cli(runner, tmp_path, "keys", "revoke", "k")
    )
    assert "cannot be revoked" in one_error_line(
        await cli(runner, tmp_path, "keys", "revoke", "operator")
    )


async def test_wallet_withdraw_prints_the_token_once(
    runner: CliRunner, tmp_path: Path, mint: MintHandle, make_token: Any
) -> None:
    config = write_config(tmp_path, mint.url)
    core = await make_core(config)
    try:
        await core.wallet.receive(await make_token(100, mint=mint), OPERATOR, "operator")
    finally:
        await core.close()

    part = await cli(runner, tmp_path, "wallet", "withdraw", "--amount-msat", "30000", "--json")
    assert part.exit_code == 0, part.output
    data = json.loads(part.stdout)
    assert data["amount"] == 30 and data["unit"] == "sat" and data["debited_msat"] == 30_000
    assert await make_token.redeem(data["token"]) == 30

    rest = await cli(runner, tmp_path, "wallet", "withdraw")
    assert rest.exit_code == 0, rest.output
    token = rest.stdout.strip()
    assert token.startswith("cashu") and rest.stdout.count("\n") == 1  # only the token
    assert "withdrew 70000 msat" in rest.stderr and "shown only once" in rest.stderr
    assert await make_token.redeem(token) == 70

    assert "no earnings to withdraw" in one_error_line(
        await cli(runner, tmp_path, "wallet", "withdraw")
    )
    assert "not one of the configured" in one_error_line(
        await cli(runner, tmp_path, "wallet", "withdraw", "--mint", "http://127.0.0.1:1")
    )
    audit = await cli(runner, tmp_path, "wallet", "audit", "--json")
    assert audit.exit_code == 0 and json.loads(audit.stdout)["ok"] is True


async def test_wallet_payout_to_a_lightning_address(
    runner: CliRunner, tmp_path: Path, mint: MintHandle, lnurl: LnurlServer, make_token: Any
) -> None:
    config = write_config(tmp_path, mint.url)
    core = await make_core(config)
    try:
        await core.wallet.receive(await make_token(500, mint=mint), OPERATOR, "operator")
    finally:
        await core.close()

    missing = await cli(runner, tmp_path, "wallet", "payout")
    assert "no Lightning address" in one_error_line(missing, 2)

    address = lnurl.address()
    paid = await cli(
        runner,
        tmp_path,
        "wallet",
        "payout",
        "--address",
        address,
        "--amount-msat",
        "200000",
        "--json",
    )
    assert paid.exit_code == 0, paid.output
    data = json.loads(paid.stdout)
    assert data["state"] == "paid" and data["address"] == address
    assert data["amount_msat"] + data["fee_msat"] == data["cost_msat"] <= 200_000
    assert data["amount_msat"] >= 190_000

    text = await cli(runner, tmp_path, "wallet", "payout", "--address", address)
    assert text.exit_code == 0, text.output
    assert text.stdout.startswith("payout #2 to " + address + ": paid; amount ")
    assert "fee " in text.stdout

    lnurl.fail_next = 1
    down = await cli(runner, tmp_path, "wallet", "payout", "--address", address)
    assert "answered 500" in one_error_line(down)

    books = json.loads((await cli(runner, tmp_path, "wallet", "balance", "--json")).stdout)["books"]
    assert 0 <= books["operator_msat"] < 500_000 // 20
    audit = await cli(runner, tmp_path, "wallet", "audit", "--json")
    assert audit.exit_code == 0 and json.loads(audit.stdout)["ok"] is True
