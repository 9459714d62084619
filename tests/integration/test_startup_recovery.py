"""Start-up survives one bad record: a mint that refuses (4xx) an op marks that op failed.

Recovery at start settles every interrupted wallet operation with the mint. A quote the
mint no longer knows used to raise out of ``nodeprov start`` every time; now the op is
marked failed, logged, counted by ``nodeprov status`` and the admin page, and the node runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from nodeprov.cli import main
from nodeprov.config import Config
from nodeprov.core.admin_queries import totals
from nodeprov.core.lightning_funding import LightningFunding
from nodeprov.core.melt import Melter
from nodeprov.core.mint_api import MintApi
from nodeprov.daemon import Core, books, run
from nodeprov.errors import MintUnavailable
from tests.support.core import Rerouting, build_core
from tests.support.daemon_core import make_core, write_config
from tests.support.ledger_backends import query
from tests.support.services import MintHandle
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.usefixtures("ledger_backend")


def forget_quote(db: Path, op_kind: str) -> None:
    """The mint lost the quote (or its database was reset): point the op at an unknown id."""
    query(db, "UPDATE wallet_ops SET quote = 'no-such-quote' WHERE kind = ?", (op_kind,))


def op_row(db: Path, op_kind: str) -> tuple[str, str | None]:
    row = query(
        db, "SELECT state, error FROM wallet_ops WHERE kind = ? ORDER BY id DESC", (op_kind,)
    )
    return str(row[0][0]), row[0][1]


async def start_and_stop(config: Config) -> Core:
    """``nodeprov start`` as far as "ready" (recovery included), then a clean stop."""
    stop = asyncio.Event()
    started: list[Core] = []

    def ready(core: Core) -> None:
        started.append(core)
        stop.set()

    async def idle(core: Core, stop: asyncio.Event) -> None:
        await stop.wait()

    await asyncio.wait_for(
        run(config, stop, services=(idle,), on_ready=ready, handle_signals=False), 60
    )
    assert started, "the node did not start"
    return started[0]


async def test_quote_the_mint_does_not_know_is_marked_failed_and_the_node_starts(
    tmp_path: Path, mint: MintHandle
) -> None:
    config = write_config(tmp_path, mint.url)
    core = await make_core(config)
    try:
        await LightningFunding(core.wallet).create(100)
    finally:
        await core.close()
    forget_quote(config.ledger_path, "mint")
    await start_and_stop(config)
    # An unpaid quote moved no money: start-up leaves it to the poll, whose round marks it.
    assert op_row(config.ledger_path, "mint") == ("unpaid", None)
    core = await make_core(config)
    try:
        assert await LightningFunding(core.wallet).recover() == {"failed": 1}
    finally:
        await core.close()
    state, error = op_row(config.ledger_path, "mint")
    assert state == "failed" and error is not None and "quote not found" in error
    core = await make_core(config)
    try:
        summary = await books(core.ledger)
        assert summary.failed_ops == 1 and summary.failures[0]["kind"] == "mint"
        assert (await totals(core.ledger)).failed_ops == 1
        assert (await core.ledger.audit()).ok
    finally:
        await core.close()
    args = ["-c", str(tmp_path / "nodeprov.toml"), "status"]
    shown = await asyncio.to_thread(CliRunner().invoke, main, args, catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert "failed ops:    1 (the mint refused to settle them)" in shown.stdout
    assert "quote not found" in shown.stdout


async def test_melt_whose_quote_the_mint_lost_is_undone_and_the_node_starts(
    tmp_path: Path, mint: MintHandle, fee_mint: MintHandle, make_token, tcp_proxy
) -> None:
    config = write_config(tmp_path, mint.url)
    proxy: TcpProxy = tcp_proxy(mint.url)
    core = await make_core(config, transport=Rerouting({mint.url: proxy.url}))
    try:
        await core.wallet.receive(await make_token(100, mint=mint), "key:m", "api_key")
        async with httpx.AsyncClient() as client:
            # An invoice of another mint: paying the node's own mint's invoice is internal.
            invoice = (await MintApi(fee_mint.url, client).mint_quote(20, "sat"))["request"]
        melter = Melter(core.wallet)
        quote = await melter.quote(invoice, mint_url=mint.url)
        proxy.pause(refuse=True)
        proxy.drop_connections()
        melted = await melter.pay("key:m", quote)  # the melt never reaches the mint
        assert melted.state == "pending"
    finally:
        proxy.resume()
        await core.close()
    forget_quote(config.ledger_path, "melt")
    await start_and_stop(config)
    state, error = op_row(config.ledger_path, "melt")
    assert state == "failed" and error is not None and "quote not found" in error
    core = await make_core(config)
    try:
        account = await core.ledger.account("key:m")
        assert account is not None and account.balance_msat == 100_000  # nothing was paid
        assert (await books(core.ledger)).failed_ops == 1
        assert (await core.ledger.audit()).ok
    finally:
        await core.close()


async def test_ops_of_a_mint_no_longer_trusted_are_left_and_the_node_starts(
    tmp_path: Path, mint: MintHandle, fee_mint: MintHandle
) -> None:
    core = await make_core(write_config(tmp_path, mint.url))
    try:
        await LightningFunding(core.wallet).create(100)
    finally:
        await core.close()
    config = write_config(tmp_path, fee_mint.url)  # the operator dropped the first mint
    await start_and_stop(config)
    assert op_row(config.ledger_path, "mint") == ("unpaid", None)  # kept for when it returns


class FromOneAddress(httpx.AsyncBaseTransport):
    """Every request says it comes from one public address (the mint exempts loopback)."""

    ADDRESS = "203.0.113.7"

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.headers["X-Forwarded-For"] = self.ADDRESS
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_rate_limited_mint_leaves_ops_as_they_are(tmp_path: Path, mint_factory) -> None:
    limited: MintHandle = mint_factory(rate_limit=True)  # nutshell: 20 quote requests a minute
    config = write_config(tmp_path, limited.url)
    core = await make_core(config, transport=FromOneAddress())
    try:
        funding = LightningFunding(core.wallet)
        quote = await funding.create(100)
        op = await funding._op_by_public_id(quote.id)
        assert op is not None and op.quote is not None
        async with httpx.AsyncClient(transport=FromOneAddress()) as client:
            for _ in range(100):  # use up this minute's quote requests
                answer = await client.get(f"{limited.url}/v1/mint/quote/bolt11/{op.quote}")
                if answer.status_code == 429:
                    break
            else:
                raise AssertionError("the mint never rate-limited")
        # 429 means "not now": the quote is not given up but polled again later. (Should the
        # mint's minute turn over in between, the poll finds it paid and mints it: also fine.)
        outcome = await funding.recover()
        assert outcome in ({}, {"done": 1})
        state, error = op_row(config.ledger_path, "mint")
        assert (state, error) == ("done" if outcome else "unpaid", None)
    finally:
        await core.close()


async def test_start_up_asks_a_hanging_mint_nothing_about_unpaid_quotes(
    tmp_path: Path, mint: MintHandle, tcp_proxy
) -> None:
    """Anyone can open unpaid quotes; none has moved money, so start-up leaves them to the poll
    (a mint that accepts connections and never answers used to cost a full timeout each)."""
    proxy: TcpProxy = tcp_proxy(mint.url)
    config = write_config(tmp_path, proxy.url)
    core = await make_core(config)
    try:
        for _ in range(6):
            await LightningFunding(core.wallet).create(100)
    finally:
        await core.close()
    proxy.pause()  # connections are accepted and never answered
    proxy.drop_connections()
    before = proxy.connections_total
    try:
        await start_and_stop(config)
        # At most the wallet's keyset load at start; not one call per quote.
        assert proxy.connections_total - before <= 1
    finally:
        proxy.resume()
    core = await make_core(config)
    try:
        # Nothing was lost: the poll finds them (this mint pays its invoices at once).
        assert await LightningFunding(core.wallet).recover() == {"done": 6}
        assert (await core.ledger.audit()).ok
    finally:
        await core.close()


async def test_a_recovery_round_asks_an_unreachable_mint_once_then_retries_next_round(
    tmp_path: Path, mint: MintHandle, make_token, tcp_proxy
) -> None:
    proxy: TcpProxy = tcp_proxy(mint.url)
    core = await build_core(
        tmp_path / "l.sqlite3", [mint.url], mint_timeout=1.0, routes={mint.url: proxy.url}
    )
    try:
        funding = LightningFunding(core.wallet)
        for _ in range(3):
            await funding.create(10)
        tokens = [await make_token(20, mint=mint) for _ in range(3)]
        proxy.delay = 60.0  # the swaps wait in the proxy: three receives left pending
        for i, token in enumerate(tokens):
            with pytest.raises(MintUnavailable):
                await core.wallet.receive(token, f"key:{i}", "api_key")
        proxy.drop_connections()
        proxy.delay = 0.0
        proxy.pause()  # the mint now accepts connections and never answers
        before = proxy.connections_total
        assert await core.wallet.recover() == {"pending": 3}
        assert await funding.recover() == {}
        assert proxy.connections_total - before == 2  # one call per round, not one per op
        proxy.resume()
        assert await core.wallet.recover() == {"failed": 3}  # the mint never saw the swaps
        assert await funding.recover() == {"done": 3}
        await core.assert_books_balance()
    finally:
        proxy.resume()
        await core.close()


async def test_a_melt_recovery_round_asks_an_unreachable_mint_once(
    tmp_path: Path, mint: MintHandle, fee_mint: MintHandle, make_token, tcp_proxy
) -> None:
    """Pending melts at a mint that accepts connections and never answers cost one timeout
    per recovery round, not one per melt; the next round settles them."""
    proxy: TcpProxy = tcp_proxy(mint.url)
    core = await build_core(
        tmp_path / "l.sqlite3", [mint.url], mint_timeout=1.0, routes={mint.url: proxy.url}
    )
    try:
        await core.wallet.receive(await make_token(300, mint=mint), "key:m", "api_key")
        melter = Melter(core.wallet)
        async with httpx.AsyncClient() as client:
            invoices = [
                (await MintApi(fee_mint.url, client).mint_quote(20, "sat"))["request"]
                for _ in range(3)
            ]
        quotes = [await melter.quote(invoice, mint_url=mint.url) for invoice in invoices]
        proxy.pause(refuse=True)
        proxy.drop_connections()
        for quote in quotes:
            assert (await melter.pay("key:m", quote)).state == "pending"
        proxy.resume()
        proxy.pause()  # the mint now accepts connections and never answers
        before = proxy.connections_total
        assert await melter.recover() == {"pending": 3}
        assert proxy.connections_total - before == 1  # one call this round, not three
        proxy.resume()
        assert "pending" not in await melter.recover()
        account = await core.ledger.account("key:m")
        assert account is not None and account.reserved_msat == 0
        await core.assert_books_balance()
    finally:
        proxy.resume()
        await core.close()
