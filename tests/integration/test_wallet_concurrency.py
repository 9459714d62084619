"""The wallet next to live work: a slow mint never stalls the ledger, recovery never races.

Orderings are asserted through events (a proxy that holds requests until told, a list of
what finished first), never through timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodeprov.core.melt import Melter
from nodeprov.errors import MintError
from tests.support.core import Core, build_core
from tests.support.ledger_backends import query
from tests.support.services import MintHandle
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.usefixtures("ledger_backend")

# How long a step that must not wait for the mint may take before the test calls it stuck.
STUCK_SECONDS = 30.0


async def until(check: Callable[[], bool]) -> None:
    """Yield to the loop until ``check()`` holds (the test's hang guard bounds it)."""
    for _ in range(int(STUCK_SECONDS * 100)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never reached")


async def two_accounts_and_a_gappy_pool(db: Path, mint: MintHandle, make_token) -> None:
    """``key:a`` with 62 sat in a sat pool that has no 1-sat proof, ``key:b`` with msat.

    A receive leaves a pool where every amount is an exact subset (no mint call to send);
    two exact 1-sat sends take both 1-sat proofs, so the next 1-sat send needs a swap.
    """
    core = await build_core(db, [mint.url])
    try:
        await core.wallet.receive(await make_token(64, mint=mint), "key:a", "api_key")
        await core.wallet.receive(await make_token(10_000, "msat", mint=mint), "key:b", "api_key")
        for _ in range(2):
            await core.wallet.send("key:a", 1000, unit="sat", mint_url=mint.url)
    finally:
        await core.close()


async def core_without_keysets(db: Path, mint: MintHandle, proxy: TcpProxy) -> Core:
    """A core that started while the mint was down: it must fetch keysets on first use."""
    proxy.pause(refuse=True)
    core = await build_core(
        db, [mint.url], routes={mint.url: proxy.url}, mint_timeout=2 * STUCK_SECONDS
    )
    proxy.resume()
    return core


async def test_keyset_lookup_at_a_stalled_mint_does_not_block_holds_on_other_accounts(
    tmp_path: Path, mint: MintHandle, make_token, tcp_proxy
) -> None:
    db = tmp_path / "l.sqlite3"
    await two_accounts_and_a_gappy_pool(db, mint, make_token)
    proxy: TcpProxy = tcp_proxy(mint.url)
    core = await core_without_keysets(db, mint, proxy)
    events: list[str] = []
    try:
        proxy.pause()  # every new connection to the mint now waits for resume()
        before = proxy.connections_total

        async def withdraw() -> None:
            # A swap, so the wallet needs the pool's keysets (from the mint) first.
            await core.wallet.send("key:a", 1000, unit="sat", mint_url=mint.url)
            events.append("sent")

        async def job_on_b() -> None:
            hold = await core.ledger.hold("key:b", 2000)
            await core.ledger.settle(hold, 1500)
            events.append("settled")

        sending = asyncio.create_task(withdraw())
        await until(lambda: proxy.connections_total > before)
        job = asyncio.create_task(job_on_b())
        await asyncio.wait({job, sending}, timeout=STUCK_SECONDS, return_when="FIRST_COMPLETED")
        events.append("mint resumed")
        proxy.resume()
        await asyncio.gather(job, sending)
        assert events == ["settled", "mint resumed", "sent"]
        b = await core.ledger.account("key:b")
        assert b is not None and b.balance_msat == 10_000 - 1500
        await core.assert_books_balance()
    finally:
        proxy.resume()
        await core.close()


def op_states(db: Path) -> list[str]:
    return [row[0] for row in query(db, "SELECT state FROM wallet_ops ORDER BY id")]


async def stalled_at_the_proxy(proxy: TcpProxy, task: asyncio.Task[Any], db: Path) -> None:
    """Until ``task`` has journalled its op and its mint request waits in the proxy."""
    before = proxy.connections_total
    await until(lambda: "pending" in op_states(db) and proxy.connections_total > before)
    assert not task.done()


async def test_recovery_leaves_a_live_receive_alone_and_it_credits_once(
    tmp_path: Path, mint: MintHandle, make_token, tcp_proxy
) -> None:
    db = tmp_path / "l.sqlite3"
    proxy: TcpProxy = tcp_proxy(mint.url)
    core = await build_core(db, [mint.url], routes={mint.url: proxy.url})
    token = await make_token(40, mint=mint)
    try:
        proxy.pause()
        proxy.drop_connections()  # the swap must open a new (stalled) connection
        receiving = asyncio.create_task(core.wallet.receive(token, "key:live", "api_key"))
        await stalled_at_the_proxy(proxy, receiving, db)
        asked = proxy.connections_total
        # As the daemon does at start-up and every minute (no age cut-off at all here).
        assert await core.wallet.recover() == {}
        assert await Melter(core.wallet).recover() == {}
        assert proxy.connections_total == asked, "recovery asked the mint about a live op"
        assert op_states(db) == ["pending"]
        proxy.resume()
        received = await receiving
        assert received.credited_msat == 40_000
        account = await core.ledger.account("key:live")
        assert account is not None and account.balance_msat == 40_000
        assert await core.wallet.recover() == {}
        assert op_states(db) == ["done"]
        await core.assert_books_balance()
    finally:
        proxy.resume()
        await core.close()


async def test_receive_whose_op_another_process_failed_raises_and_credits_nobody(
    tmp_path: Path, mint: MintHandle, make_token, tcp_proxy
) -> None:
    db = tmp_path / "l.sqlite3"
    proxy: TcpProxy = tcp_proxy(mint.url)
    core = await build_core(db, [mint.url], routes={mint.url: proxy.url})
    other = await build_core(db, [mint.url])  # a second process: it cannot see our live ops
    token = await make_token(40, mint=mint)
    try:
        proxy.pause()
        proxy.drop_connections()
        receiving = asyncio.create_task(core.wallet.receive(token, "key:x", "api_key"))
        await stalled_at_the_proxy(proxy, receiving, db)
        assert await other.wallet.recover() == {"failed": 1}  # the mint has not seen it yet
        proxy.resume()  # now the swap lands
        with pytest.raises(MintError, match="given up"):
            await receiving
        account = await core.ledger.account("key:x")
        assert account is None or account.balance_msat == 0
        assert op_states(db) == ["failed"]
        await core.assert_books_balance()
    finally:
        proxy.resume()
        await other.close()
        await core.close()


async def test_send_whose_op_another_process_reversed_raises_and_keeps_the_proofs(
    tmp_path: Path, mint: MintHandle, make_token, tcp_proxy
) -> None:
    db = tmp_path / "l.sqlite3"
    await two_accounts_and_a_gappy_pool(db, mint, make_token)
    proxy: TcpProxy = tcp_proxy(mint.url)
    core = await build_core(db, [mint.url], routes={mint.url: proxy.url})
    other = await build_core(db, [mint.url])
    try:
        proxy.pause()
        proxy.drop_connections()
        sending = asyncio.create_task(
            core.wallet.send("key:a", 1000, unit="sat", mint_url=mint.url)
        )
        await stalled_at_the_proxy(proxy, sending, db)
        assert await other.wallet.recover() == {"failed": 1}  # reversed: key:a got it back
        proxy.resume()  # the swap lands after all
        with pytest.raises(MintError, match="given up"):
            await sending
        account = await core.ledger.account("key:a")
        assert account is not None and account.balance_msat == 62_000
        # The swap's outputs are the node's now; the spent inputs left the pool.
        assert await core.wallet.balances() == {(mint.url, "sat"): 62, (mint.url, "msat"): 10_000}
        await core.assert_books_balance()
        sent = await core.wallet.send("key:a", 62_000, unit="sat", mint_url=mint.url)
        assert await make_token.redeem(sent.token) == 62
        await core.assert_books_balance()
    finally:
        proxy.resume()
        await other.close()
        await core.close()
