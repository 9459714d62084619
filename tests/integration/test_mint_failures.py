"""A mint that is down or slow: a retryable error, and nothing is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nodeprov.errors import MintUnavailable
from tests.support.core import build_core
from tests.support.services import MintHandle
from tests.support.tcp_proxy import TcpProxy, dead_url


async def test_mint_down_gives_a_retryable_error_and_keeps_the_token(
    tmp_path: Path, mint: MintHandle, make_token
) -> None:
    token = await make_token(50, mint=mint)
    core = await build_core(tmp_path / "l.sqlite3", [mint.url], routes={mint.url: dead_url()})
    try:
        with pytest.raises(MintUnavailable) as info:
            await core.wallet.receive(token, "key:d", "api_key")
        assert info.value.status == 503 and info.value.retryable
        assert set(await make_token.proof_states(token)) == {"UNSPENT"}
        await core.assert_books_balance()
    finally:
        await core.close()
    # Once the mint is back the same token is accepted.
    core = await build_core(tmp_path / "l.sqlite3", [mint.url])
    try:
        received = await core.wallet.receive(token, "key:d", "api_key")
        assert received.credited_msat == 50_000
        await core.assert_books_balance()
    finally:
        await core.close()


async def test_slow_mint_times_out_then_recovery_credits_once(
    tmp_path: Path, mint: MintHandle, make_token, tcp_proxy
) -> None:
    token = await make_token(80, mint=mint)
    proxy: TcpProxy = tcp_proxy(mint.url)
    db = tmp_path / "l.sqlite3"
    core = await build_core(db, [mint.url], mint_timeout=1.0, routes={mint.url: proxy.url})
    try:
        proxy.delay = 2.0  # every request now reaches the mint after the client gave up
        with pytest.raises(MintUnavailable):
            await core.wallet.receive(token, "key:slow", "api_key")
        account = await core.ledger.account("key:slow")
        assert account is not None and account.balance_msat == 0
        await asyncio.sleep(2.5)  # let any late request reach the mint (or be cut off)
        proxy.delay = 0.0
        outcome = await core.wallet.recover()
        # Either the mint did the swap (recovered from its signatures) or it never saw it
        # (the token is still the user's and can be offered again): credited exactly once.
        if outcome == {"failed": 1}:
            assert set(await make_token.proof_states(token)) == {"UNSPENT"}
            await core.wallet.receive(token, "key:slow", "api_key")
        else:
            assert outcome == {"done": 1}
        account = await core.ledger.account("key:slow")
        assert account is not None and account.balance_msat == 80_000
        assert await core.wallet.recover() == {}
        await core.assert_books_balance()
    finally:
        await core.close()
