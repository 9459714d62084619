"""A mint that is down or slow: a retryable error, and nothing is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeprov.errors import MintUnavailable
from tests.support.core import build_core
from tests.support.services import MintHandle
from tests.support.tcp_proxy import TcpProxy, dead_url
from tests.support.waiting import until


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


@pytest.mark.parametrize("late", ["request", "answer"])
async def test_slow_mint_times_out_then_recovery_credits_once(
    tmp_path: Path, mint: MintHandle, make_token, tcp_proxy, late: str
) -> None:
    """The client gives up on a slow mint; recovery credits once, whether the mint did the swap
    (its answer was late) or never saw it (the request was late and is cut off)."""
    token = await make_token(80, mint=mint)
    proxy: TcpProxy = tcp_proxy(mint.url)
    db = tmp_path / "l.sqlite3"
    core = await build_core(db, [mint.url], mint_timeout=1.0, routes={mint.url: proxy.url})
    try:
        # Both delays are far beyond the client's 1 s: which case happens is chosen here, not
        # by how a fixed sleep compares with a slow machine.
        if late == "request":
            proxy.delay = 60.0  # the swap request waits in the proxy; the mint never sees it
        else:
            proxy.response_delay = 60.0  # the mint does the swap; its answer waits
        with pytest.raises(MintUnavailable):
            await core.wallet.receive(token, "key:slow", "api_key")
        account = await core.ledger.account("key:slow")
        assert account is not None and account.balance_msat == 0
        if late == "answer":
            await until(lambda: _all_spent(make_token, token), what="the mint did the late swap")
        proxy.drop_connections()  # what is still waiting in the proxy never arrives
        proxy.delay = proxy.response_delay = 0.0
        outcome = await core.wallet.recover()
        if late == "request":
            # The mint never saw it: the token is still the user's and can be offered again.
            assert outcome == {"failed": 1}
            assert set(await make_token.proof_states(token)) == {"UNSPENT"}
            await core.wallet.receive(token, "key:slow", "api_key")
        else:
            assert outcome == {"done": 1}  # recovered from the mint's signatures
        account = await core.ledger.account("key:slow")
        assert account is not None and account.balance_msat == 80_000
        assert await core.wallet.recover() == {}
        await core.assert_books_balance()
    finally:
        await core.close()


async def _all_spent(make_token, token: str) -> bool:
    return set(await make_token.proof_states(token)) == {"SPENT"}
