"""Payouts to a Lightning address: a real local LNURL server and real FakeWallet mints.

The node melts at one mint; the LNURL server hands out invoices from another mint's
``POST /v1/mint/quote/bolt11``, so the payment crosses a real mint boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nodeprov.core.ledger import OPERATOR
from nodeprov.core.lnurl import LnurlError
from nodeprov.core.node import Core
from nodeprov.daemon import run
from nodeprov.payouts import PayoutError, PayoutService, payout_now, recent_payouts
from tests.support.daemon_core import make_core, write_config
from tests.support.ledger_backends import query
from tests.support.lnurl_server import LnurlServer
from tests.support.services import MintHandle
from tests.support.waiting import until

pytestmark = pytest.mark.usefixtures("ledger_backend")


class MeltAnswerLost(httpx.AsyncBaseTransport):
    """Sends every request; for melts it then drops the answer, as a cut connection would."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path.endswith("/v1/melt/bolt11"):
            await response.aread()  # the mint has paid; the node never hears of it
            self.lost += 1
            raise httpx.ReadTimeout("answer lost", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def assert_books_balance(core: Core) -> None:
    report = await core.ledger.audit()
    assert report.ok, report


async def earnings(core: Core) -> int:
    account = await core.ledger.account(OPERATOR)
    return account.balance_msat if account else 0


@pytest.fixture
def lnurl(fee_mint: MintHandle) -> Iterator[LnurlServer]:
    server = LnurlServer(fee_mint.url).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def core(tmp_path: Path, mint: MintHandle, lnurl: LnurlServer) -> AsyncIterator[Core]:
    config = write_config(
        tmp_path,
        mint.url,
        f'lightning_address = "{lnurl.address()}"\nthreshold_msat = 500000\ninterval_seconds = 60',
    )
    built = await make_core(config)
    try:
        yield built
    finally:
        await built.close()


async def fund_operator(core: Core, make_token: Any, sat: int, mint: str) -> None:
    await core.wallet.receive(await make_token(sat, mint=mint), OPERATOR, "operator")


# --- sizing and recording ------------------------------------------------------------------


@pytest.mark.parametrize("fees", ["no_input_fee", "input_fee"])
async def test_payout_now_pays_earnings_with_fees_inside_budget(
    tmp_path: Path,
    mint: MintHandle,
    fee_mint: MintHandle,
    make_token: Any,
    fees: str,
) -> None:
    # With input fees on, the node melts at fee_mint and the payee's invoices come from mint.
    node_mint, payee_mint = (mint, fee_mint) if fees == "no_input_fee" else (fee_mint, mint)
    server = LnurlServer(payee_mint.url).start()
    core = await make_core(write_config(tmp_path, node_mint.url))
    try:
        await fund_operator(core, make_token, 1000, node_mint.url)
        before = await earnings(core)
        result = await payout_now(core, server.address())
        assert result.state == "paid"
        assert result.amount_msat % 1000 == 0 and result.amount_msat >= 900_000
        assert result.cost_msat == result.amount_msat + result.fee_msat <= before
        assert await earnings(core) == before - result.cost_msat
        # The invoice paid is the last one handed out, for exactly the amount asked.
        assert server.invoices[-1][0] == result.amount_msat
        quote = (
            await core.client.get(f"{node_mint.url}/v1/melt/quote/bolt11/{result.quote}")
        ).json()
        assert quote["state"] == "PAID"
        rows = await recent_payouts(core.ledger.db)
        assert rows[0]["state"] == "paid" and rows[0]["cost_msat"] == result.cost_msat
        assert rows[0]["budget_msat"] == before and rows[0]["address"] == server.address()
        await assert_books_balance(core)
    finally:
        await core.close()
        server.close()


async def test_payout_of_a_part_and_refusals(
    core: Core, mint: MintHandle, lnurl: LnurlServer, make_token: Any
) -> None:
    with pytest.raises(PayoutError, match="no earnings"):
        await payout_now(core, lnurl.address())
    await fund_operator(core, make_token, 100, mint.url)
    with pytest.raises(PayoutError, match="do not cover"):  # 2 sat is below the fee reserve
        await payout_now(core, lnurl.address(), 2000)
    result = await payout_now(core, lnurl.address(), 50_000)
    assert result.state == "paid" and result.cost_msat <= 50_000
    assert await earnings(core) == 100_000 - result.cost_msat
    lnurl.wrong_amount = True
    with pytest.raises(LnurlError, match=r"not the .* msat requested"):
        await payout_now(core, lnurl.address(), 50_000)
    lnurl.wrong_amount = False
    states = [r["state"] for r in await recent_payouts(core.ledger.db)]
    assert states == ["failed", "paid", "failed"]  # newest first; "no earnings" makes no row
    await assert_books_balance(core)


# --- the service -----------------------------------------------------------------------------


async def test_threshold_is_respected(
    core: Core, mint: MintHandle, lnurl: LnurlServer, make_token: Any
) -> None:
    service = PayoutService()
    await fund_operator(core, make_token, 400, mint.url)  # threshold is 500 sat
    assert await service.round(core) is None
    assert lnurl.requests == [] and service.attempts == 0
    await fund_operator(core, make_token, 100, mint.url)
    result = await service.round(core)
    assert result is not None and result.state == "paid"
    assert service.attempts == 1
    assert await earnings(core) == 500_000 - result.cost_msat < 500_000 // 50
    await assert_books_balance(core)


async def test_failing_lnurl_server_backs_off_and_loses_nothing(
    core: Core, mint: MintHandle, lnurl: LnurlServer, make_token: Any
) -> None:
    await fund_operator(core, make_token, 600, mint.url)
    lnurl.fail_next = 3
    service = PayoutService(retry_base_seconds=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(service.service()(core, stop))
    try:
        for _ in range(200):
            if service.results:
                break
            # Before, between and during attempts every msat is accounted for.
            await assert_books_balance(core)
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert service.attempts == 4 and len(service.results) == 1
    assert service.failures == 0 and service.last_error is None
    rows = await recent_payouts(core.ledger.db)
    assert [r["state"] for r in rows] == ["paid", "failed", "failed", "failed"]
    assert all("500" in r["error"] for r in rows[1:])
    assert await earnings(core) == 600_000 - service.results[0].cost_msat
    await assert_books_balance(core)


def test_backoff_doubles_up_to_the_interval() -> None:
    service = PayoutService(retry_base_seconds=30)
    delays = []
    for failures in range(8):
        service.failures = failures
        delays.append(service.delay(3600))
    assert delays == [3600, 30, 60, 120, 240, 480, 960, 1920]
    service.failures = 9
    assert service.delay(3600) == 3600


async def test_pending_melt_is_recovered_when_the_service_starts(
    tmp_path: Path, mint: MintHandle, lnurl: LnurlServer, make_token: Any
) -> None:
    config = write_config(tmp_path, mint.url, f'lightning_address = "{lnurl.address()}"')
    lossy = MeltAnswerLost()
    first = await make_core(config, lossy)
    try:
        await fund_operator(first, make_token, 300, mint.url)
        result = await payout_now(first, lnurl.address())
        assert lossy.lost == 1 and result.state == "pending"
        # The debit is in flight: the books still balance, nothing is paid out twice.
        assert await earnings(first) == 300_000 - result.cost_msat
        assert (await recent_payouts(first.ledger.db))[0]["state"] == "pending"
        await assert_books_balance(first)
    finally:
        await first.close()
    # That process died a while ago: on a shared (PostgreSQL) ledger the service settles
    # only melts old enough to be abandoned, not another worker's live one.
    query(tmp_path / "data" / "ledger.sqlite3", "UPDATE wallet_ops SET updated_at = 0")

    restarted = await make_core(config)  # the next start: the answer reaches us now
    try:
        service = PayoutService()
        stop = asyncio.Event()
        stop.set()  # start, recover, stop at once
        await service.run(restarted, stop)
        assert service.recovered == {"melt_paid": 1, "payout_paid": 1}
        row = (await recent_payouts(restarted.ledger.db))[0]
        assert row["state"] == "paid" and row["amount_msat"] == result.amount_msat
        # The unused fee reserve came back: the final cost is below what was held.
        assert result.amount_msat <= row["cost_msat"] <= result.cost_msat
        assert await earnings(restarted) == 300_000 - row["cost_msat"]
        await assert_books_balance(restarted)
    finally:
        await restarted.close()


async def test_service_without_address_only_recovers(tmp_path: Path, mint: MintHandle) -> None:
    core = await make_core(write_config(tmp_path, mint.url))
    try:
        service = PayoutService()
        stop = asyncio.Event()
        task = asyncio.create_task(service.service()(core, stop))
        await asyncio.sleep(0.2)
        assert service.recovered == {} and not task.done()
        stop.set()
        await asyncio.wait_for(task, 5)
        assert service.attempts == 0
    finally:
        await core.close()


async def test_service_runs_inside_the_daemon(
    tmp_path: Path, mint: MintHandle, lnurl: LnurlServer, make_token: Any
) -> None:
    config = write_config(
        tmp_path, mint.url, f'lightning_address = "{lnurl.address()}"\nthreshold_msat = 100000'
    )
    funded = await make_core(config)
    try:
        await fund_operator(funded, make_token, 200, mint.url)
    finally:
        await funded.close()
    service = PayoutService()
    stop = asyncio.Event()
    daemon = asyncio.create_task(
        run(config, stop, services=(service.service(),), handle_signals=False)
    )
    try:
        await until(lambda: service.results or daemon.done(), what="a payout or the daemon's end")
    finally:
        stop.set()
        await asyncio.wait_for(daemon, 30)
    assert [r.state for r in service.results] == ["paid"]
    after = await make_core(config)
    try:
        assert await earnings(after) == 200_000 - service.results[0].cost_msat
        await assert_books_balance(after)
    finally:
        await after.close()
