"""The node's wallet against a real nutshell mint: receive, send, bad tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nodeprov.core.wallet import MAX_SEND_PROOFS
from nodeprov.errors import (
    InvalidToken,
    TokenAlreadySpent,
    TokenTooSmall,
    UnsupportedUnit,
    UntrustedMint,
)
from nodeprov.protocol.cashu_token import parse_token
from tests.support.core import Core, build_core
from tests.support.services import MintHandle

pytestmark = pytest.mark.usefixtures("ledger_backend")


@pytest.fixture
async def core(tmp_path: Path, mint: MintHandle, fee_mint: MintHandle) -> AsyncIterator[Core]:
    built = await build_core(tmp_path / "ledger.sqlite3", [mint.url, fee_mint.url])
    try:
        yield built
        await built.assert_books_balance()
    finally:
        await built.close()


@pytest.mark.parametrize("unit", ["sat", "msat"])
@pytest.mark.parametrize("version", [3, 4])
async def test_receive_credits_exact_value(
    core: Core, make_token, mint: MintHandle, unit: str, version: int
) -> None:
    token = await make_token(100, unit=unit, mint=mint, version=version)
    received = await core.wallet.receive(token, "key:a", "api_key")
    assert received.credited_msat == (100_000 if unit == "sat" else 100)
    account = await core.ledger.account("key:a")
    assert account is not None and account.balance_msat == received.credited_msat
    assert await make_token.proof_states(token) == ["SPENT"] * len(parse_token(token).proofs)


async def test_receive_with_input_fees(core: Core, make_token, fee_mint: MintHandle) -> None:
    token = await make_token(100, unit="sat", mint=fee_mint)
    proofs = len(parse_token(token).proofs)
    received = await core.wallet.receive(token, "key:f", "api_key")
    fee = -(-proofs * 100 // 1000)
    assert received.fee == fee
    assert received.credited_msat == (100 - fee) * 1000


async def test_same_token_twice_concurrently_credits_once(
    core: Core, make_token, mint: MintHandle
) -> None:
    token = await make_token(64, mint=mint)
    results = await asyncio.gather(
        *(core.wallet.receive(token, "key:c", "api_key") for _ in range(5)),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert len(ok) == 1
    assert all(isinstance(r, TokenAlreadySpent) for r in results if r not in ok)
    account = await core.ledger.account("key:c")
    assert account is not None and account.balance_msat == 64_000


async def test_spent_token_is_refused(core: Core, make_token, mint: MintHandle) -> None:
    token = await make_token(10, mint=mint)
    await make_token.redeem(token)
    with pytest.raises(TokenAlreadySpent) as info:
        await core.wallet.receive(token, "key:s", "api_key")
    assert info.value.status == 400


@pytest.mark.parametrize(
    "text",
    ["", "cashuB", "cashuAeyJ0b2tlbiI6", "hello", "cashuBo2F0gaJhaUgA" + "x" * 10],
)
async def test_garbage_is_invalid_token(core: Core, text: str) -> None:
    with pytest.raises(InvalidToken):
        await core.wallet.receive(text, "key:g", "api_key")


async def test_truncated_token(core: Core, make_token, mint: MintHandle) -> None:
    token = await make_token(10, mint=mint)
    with pytest.raises(InvalidToken):
        await core.wallet.receive(token[: len(token) // 2], "key:t", "api_key")


async def test_untrusted_mint(tmp_path: Path, make_token, mint: MintHandle, fee_mint) -> None:
    core = await build_core(tmp_path / "l.sqlite3", [fee_mint.url])
    try:
        token = await make_token(10, mint=mint)
        with pytest.raises(UntrustedMint):
            await core.wallet.receive(token, "key:u", "api_key")
        assert await make_token.proof_states(token) == ["UNSPENT"] * len(parse_token(token).proofs)
    finally:
        await core.close()


async def test_unit_not_accepted(tmp_path: Path, make_token, mint: MintHandle) -> None:
    core = await build_core(tmp_path / "l.sqlite3", [mint.url], units=("sat",))
    try:
        token = await make_token(10, unit="msat", mint=mint)
        with pytest.raises(UnsupportedUnit):
            await core.wallet.receive(token, "key:u", "api_key")
    finally:
        await core.close()


async def test_fee_larger_than_amount(core: Core, make_token, fee_mint: MintHandle) -> None:
    # 1 msat in one proof at 100 ppk: the fee (1) eats the whole token.
    token = await make_token(1, unit="msat", mint=fee_mint)
    with pytest.raises(TokenTooSmall):
        await core.wallet.receive(token, "key:z", "api_key")


@pytest.mark.parametrize("unit", ["sat", "msat"])
async def test_send_returns_redeemable_token(
    core: Core, make_token, mint: MintHandle, unit: str
) -> None:
    token = await make_token(100, unit=unit, mint=mint)
    received = await core.wallet.receive(token, "key:w", "api_key")
    factor = 1000 if unit == "sat" else 1
    sent = await core.wallet.send("key:w", 37 * factor, mint_url=mint.url, unit=unit)
    assert sent.amount == 37 and sent.fee == 0
    assert await make_token.redeem(sent.token) == 37
    account = await core.ledger.account("key:w")
    assert account is not None
    assert account.balance_msat == received.credited_msat - 37 * factor


async def test_zero_value_token_is_refused(core: Core, make_token, mint: MintHandle) -> None:
    import base64
    import json

    real = parse_token(await make_token(1, mint=mint))
    proof = real.proofs[0].to_wire() | {"amount": 0}
    body = {"token": [{"mint": real.mint, "proofs": [proof]}], "unit": "sat"}
    text = "cashuA" + base64.urlsafe_b64encode(json.dumps(body).encode()).decode()
    with pytest.raises(InvalidToken) as info:
        await core.wallet.receive(text, "key:0", "api_key")
    assert info.value.status == 400 and "amount" in info.value.message


async def test_a_withdrawal_from_a_pool_of_small_proofs_is_a_token_of_few_proofs(
    core: Core, make_token, mint: MintHandle
) -> None:
    """Found by the soak: a withdrawal sent an exact subset of a pool grown from many small
    payments, a token of so many proofs that it was over 200 kB and no wallet, the node's
    own parser included, would read it. A long exact subset is swapped into a short split."""
    for _ in range(MAX_SEND_PROOFS + 6):
        await core.wallet.receive(await make_token(1, unit="msat", mint=mint), "key:s", "api_key")
    sent = await core.wallet.send("key:s", MAX_SEND_PROOFS + 6, mint_url=mint.url, unit="msat")
    proofs = parse_token(sent.token).proofs
    assert len(proofs) <= MAX_SEND_PROOFS
    assert sum(p.amount for p in proofs) == MAX_SEND_PROOFS + 6
    assert await make_token.redeem(sent.token) == MAX_SEND_PROOFS + 6
