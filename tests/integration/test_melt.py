"""Lightning payouts (melt) against the real FakeWallet mint."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from nodeprov.core.invoices import InvalidInvoice
from nodeprov.core.melt import Melter
from nodeprov.core.mint_api import MintApi
from nodeprov.errors import InsufficientBalance
from tests.support.core import Core, build_core
from tests.support.invoices import make_invoice
from tests.support.services import MintHandle

pytestmark = pytest.mark.usefixtures("ledger_backend")


@pytest.fixture
async def core(tmp_path: Path, mint: MintHandle) -> AsyncIterator[Core]:
    built = await build_core(tmp_path / "ledger.sqlite3", [mint.url])
    try:
        yield built
        await built.assert_books_balance()
    finally:
        await built.close()


async def invoice(mint: MintHandle, amount: int) -> str:
    """A bolt11 invoice from another mint's FakeWallet backend (an external payee)."""
    async with httpx.AsyncClient() as client:
        quote = await MintApi(mint.url, client).mint_quote(amount, "sat")
    return str(quote["request"])


async def test_melt_pays_and_credits_back_the_unused_fee_reserve(
    core: Core, mint: MintHandle, fee_mint: MintHandle, make_token
) -> None:
    await core.wallet.receive(await make_token(200, mint=mint), "operator", "operator")
    melted = await Melter(core.wallet).melt("operator", await invoice(fee_mint, 50), unit="sat")
    assert melted.state == "paid"
    account = await core.ledger.account("operator")
    assert account is not None
    assert account.balance_msat == 200_000 - melted.cost_msat
    assert 50_000 <= melted.cost_msat <= 60_000
    assert await Melter(core.wallet).recover() == {}


async def test_melt_more_than_the_balance_is_refused(
    core: Core, mint: MintHandle, fee_mint: MintHandle, make_token
) -> None:
    await core.wallet.receive(await make_token(20, mint=mint), "key:m", "api_key")
    with pytest.raises(InsufficientBalance):
        await Melter(core.wallet).melt("key:m", await invoice(fee_mint, 50), unit="sat")
    account = await core.ledger.account("key:m")
    assert account is not None and account.balance_msat == 20_000


async def test_expired_invoice_refused_before_the_mint_is_asked(
    core: Core, mint: MintHandle, make_token
) -> None:
    await core.wallet.receive(await make_token(200, mint=mint), "operator", "operator")
    expired = make_invoice(50_000, "bcrt", date=int(time.time()) - 7200)
    with pytest.raises(InvalidInvoice, match="expired") as err:
        await Melter(core.wallet).melt("operator", expired, unit="sat")
    assert err.value.status == 400
    account = await core.ledger.account("operator")
    assert account is not None and account.balance_msat == 200_000
