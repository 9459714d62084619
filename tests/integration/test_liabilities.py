"""Liabilities per mint: a payout or withdrawal never takes what a pool owes its users.

Two pools at one real mint (sat and msat). Change owed to a per-request token is tied to
its token's mint and unit; the operator's earnings must come out of what is left.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeprov.core.ledger import OPERATOR
from nodeprov.core.payments import Payer
from nodeprov.daemon import Core
from nodeprov.errors import InsufficientBalance
from nodeprov.payouts import payout_now
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint
from tests.support.core import build_core
from tests.support.daemon_core import make_core, write_config
from tests.support.lnurl_server import LnurlServer
from tests.support.services import MintHandle


@pytest.fixture
def lnurl(fee_mint: MintHandle) -> Iterator[LnurlServer]:
    server = LnurlServer(fee_mint.url).start()
    try:
        yield server
    finally:
        server.close()


async def change_owed_in_msat_and_earnings_in_sat(core: Core, make_token: Any, mint: str) -> str:
    """Operator: 100 sat earned (sat pool). A per-request msat token: 150,000 msat of change
    not yet claimed (msat pool, the larger one). Returns that token."""
    await core.wallet.receive(await make_token(100, mint=mint), OPERATOR, "operator")
    token = await make_token(150_000, "msat", mint=mint)
    account = "req:" + token_fingerprint(parse_token(token))
    await core.wallet.receive(token, account, "request")
    return token


async def test_operator_withdrawal_cannot_take_change_owed_at_that_pool(
    tmp_path: Path, mint: MintHandle, make_token: Any
) -> None:
    core = await make_core(write_config(tmp_path, mint.url))
    try:
        token = await change_owed_in_msat_and_earnings_in_sat(core, make_token, mint.url)
        with pytest.raises(InsufficientBalance, match="owed to users"):
            await core.payments.withdraw(OPERATOR, 100_000, mint_url=mint.url, unit="msat")
        operator = await core.ledger.account(OPERATOR)
        assert operator is not None and operator.balance_msat == 100_000  # nothing moved
        # Without a mint and unit the node picks the pool that owes nobody (not the largest).
        sent = await core.payments.withdraw(OPERATOR, 100_000)
        assert sent.unit == "sat" and await make_token.redeem(sent.token) == 100
        # The per-request token's change is still all there, in its own mint and unit.
        (change,) = await core.payments.claim_change(token)
        assert await make_token.redeem(change) == 150_000
        assert (await core.ledger.audit()).ok
    finally:
        await core.close()


async def test_payout_takes_earnings_from_the_pool_that_owes_nobody(
    tmp_path: Path, mint: MintHandle, make_token: Any, lnurl: LnurlServer
) -> None:
    core = await make_core(write_config(tmp_path, mint.url))
    try:
        token = await change_owed_in_msat_and_earnings_in_sat(core, make_token, mint.url)
        result = await payout_now(core, lnurl.address())
        assert result.state == "paid" and result.unit == "sat"
        assert result.cost_msat <= 100_000
        (change,) = await core.payments.claim_change(token)
        assert await make_token.redeem(change) == 150_000
        assert (await core.ledger.audit()).ok
    finally:
        await core.close()


async def test_change_below_the_mint_fee_goes_to_the_token_account_not_retried(
    tmp_path: Path, fee_mint: MintHandle, make_token: Any
) -> None:
    core = await build_core(tmp_path / "l.sqlite3", [fee_mint.url], units=("sat",))
    try:
        # A 2-sat per-request token (1 sat input fee) leaves 1 sat of change in a 1-sat proof.
        token = await make_token(2, mint=fee_mint)
        fingerprint = token_fingerprint(parse_token(token))
        await core.wallet.receive(token, "req:" + fingerprint, "request")
        # Another user's exact withdrawals take every 1-sat proof: the change needs a swap,
        # and the swap's 1-sat fee is all the change is worth.
        await core.wallet.receive(await make_token(4, mint=fee_mint), "key:k", "api_key")
        for _ in range(2):
            await core.wallet.send("key:k", 1000, mint_url=fee_mint.url, unit="sat")
        assert await core.payments.claim_change(token) == []
        req = await core.ledger.account("req:" + fingerprint)
        assert req is not None and req.balance_msat == 0
        kept = await core.ledger.account("token:" + fingerprint)
        assert kept is not None and kept.balance_msat == 1000
        ops = await core.ledger.db.fetchall("SELECT id FROM wallet_ops")
        assert await core.payments.claim_change(token) == []  # nothing left to retry
        assert await core.ledger.db.fetchall("SELECT id FROM wallet_ops") == ops
        # The original token now pays as a key from that balance, without a mint call.
        payer = Payer("token_key", token)
        assert await core.payments.account_for(payer) == "token:" + fingerprint
        await core.assert_books_balance()
    finally:
        await core.close()


async def test_withdrawing_all_earnings_pays_what_one_pool_can_and_leaves_the_rest(
    tmp_path: Path, mint: MintHandle, make_token: Any
) -> None:
    """Found by the soak: earnings split over the sat and msat pools, with users' balances
    owed from the sat pool, made "withdraw everything" refuse with "no single mint holds
    enough" although 100 sat of it could be paid. It pays those and leaves the rest."""
    core = await make_core(write_config(tmp_path, mint.url))
    try:
        for amount, unit in ((100, "sat"), (5_000, "msat")):
            earned = await make_token(amount, unit, mint=mint.url)
            await core.wallet.receive(earned, OPERATOR, "operator")
        await core.wallet.receive(await make_token(60, mint=mint.url), "key:u", "api_key")
        sent = await core.payments.withdraw(OPERATOR)
        assert (sent.unit, sent.debited_msat) == ("sat", 100_000)
        assert await make_token.redeem(sent.token) == 100
        operator = await core.ledger.account(OPERATOR)
        assert operator is not None and operator.balance_msat == 5_000
        assert (await core.ledger.audit()).ok
    finally:
        await core.close()
