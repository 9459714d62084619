"""Expired keys are refunded to their Lightning address; failures keep the balance claimable.

The Lightning address is served by a real local LNURL-pay server whose invoices come from a
second real mint (an outside payee the node's mint pays through its FakeWallet).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nodeprov.config import Config, WalletSection
from nodeprov.core.expiry import ExpiryRefunder, refund_expired_keys, refund_record
from nodeprov.core.lnurl import lnurl_client
from nodeprov.core.mint_api import MintApi
from nodeprov.core.payments import api_key_account
from nodeprov.core.wallet import Wallet
from nodeprov.http.app import bind, serve
from tests.support.core import Core, build_core
from tests.support.drip_server import drip_server
from tests.support.http_node import Node, node_fixture, upstream_fixture  # noqa: F401  (fixtures)
from tests.support.services import MintHandle
from tests.support.tcp_proxy import dead_port
from tests.support.waiting import expires_soon, until, until_past

pytestmark = pytest.mark.usefixtures("ledger_backend")


@dataclass
class LnurlServer:
    """LNURL-pay for ``<user>@127.0.0.1:<port>``; user ``broken`` always refuses."""

    payee: MintHandle
    url: str = ""
    failing: bool = False
    invoices: list[tuple[str, int, str]] = field(default_factory=list)  # user, msat, quote
    lookups: list[str] = field(default_factory=list)  # users whose pay request was read

    def address(self, user: str) -> str:
        return f"{user}@{self.url.removeprefix('http://')}"

    def app(self) -> Starlette:
        async def pay_request(request: Request) -> JSONResponse:
            user = request.path_params["user"]
            self.lookups.append(user)
            return JSONResponse(
                {
                    "tag": "payRequest",
                    "callback": f"{self.url}/callback/{user}",
                    "minSendable": 1000,
                    "maxSendable": 100_000_000,
                    "metadata": '[["text/plain", "refund"]]',
                }
            )

        async def callback(request: Request) -> JSONResponse:
            user = request.path_params["user"]
            amount = int(request.query_params["amount"])
            if self.failing or user == "broken" or amount % 1000:
                return JSONResponse({"status": "ERROR", "reason": "cannot take this now"})
            async with httpx.AsyncClient() as client:
                quote = await MintApi(self.payee.url, client).mint_quote(amount // 1000, "sat")
            self.invoices.append((user, amount, str(quote["quote"])))
            return JSONResponse({"pr": quote["request"], "routes": []})

        return Starlette(
            routes=[
                Route("/.well-known/lnurlp/{user}", pay_request),
                Route("/callback/{user}", callback),
            ]
        )


@pytest.fixture
async def lnurl_factory() -> AsyncIterator[object]:
    """``await lnurl_factory(payee_mint) -> LnurlServer`` (served until the test ends)."""
    stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def make(payee: MintHandle) -> LnurlServer:
        server = LnurlServer(payee)
        sock = bind("127.0.0.1", 0)
        server.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        stop = asyncio.Event()
        stops.append((stop, asyncio.create_task(serve(server.app(), sock, stop))))
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                try:
                    await client.get(server.url + "/.well-known/lnurlp/x")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.01)
        return server

    yield make
    for stop, task in stops:
        stop.set()
        await task


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[MintHandle, MintHandle]]:
    """(node's mint, payee's mint): fees off at the node, or on."""
    mint: MintHandle = request.getfixturevalue("mint")
    fee_mint: MintHandle = request.getfixturevalue("fee_mint")
    yield (mint, fee_mint) if request.param == "no_fee" else (fee_mint, mint)


async def expired_key(core: Core, make_token, mint: MintHandle, sats: int, address: str) -> str:
    api_key, _ = await core.payments.create_key(
        await make_token(sats, mint=mint), expires_at=int(time.time()) - 1, refund_address=address
    )
    return api_key_account(api_key)


@pytest.mark.parametrize("pair", ["no_fee", "input_fee"], indirect=True)
async def test_expired_key_is_refunded_to_its_address(
    tmp_path: Path, pair: tuple[MintHandle, MintHandle], make_token, lnurl_factory
) -> None:
    node_mint, payee = pair
    lnurl = await lnurl_factory(payee)
    core = await build_core(tmp_path / "ledger.sqlite3", [node_mint.url])
    try:
        account_id = await expired_key(core, make_token, node_mint, 200, lnurl.address("alice"))
        before = await core.ledger.account(account_id)
        assert before is not None
        refunder = ExpiryRefunder(core.wallet, private_hosts=True)
        (result,) = await refunder.round()
        assert result.state == "paid", result
        # Sizing may ask for a smaller invoice once the fee reserve is known; the last is paid.
        user, amount, _ = lnurl.invoices[-1]
        assert user == "alice" and amount == result.amount_msat and len(lnurl.invoices) <= 4
        after = await core.ledger.account(account_id)
        assert after is not None
        # The invoice plus what the mint kept is all that left the key; the rest stays.
        assert before.balance_msat - after.balance_msat == result.amount_msat + result.fee_msat
        assert after.balance_msat < 5_000  # at most the fee reserve it could not cover
        assert 180_000 <= result.amount_msat <= 200_000
        record = await refund_record(core.ledger.db, account_id)
        assert record is not None and record["state"] in {"paid", "too_small"}
        assert record["refunded_msat"] == result.amount_msat
        # Nothing more to do: the remainder is too small or already judged so.
        later = await refunder.round()
        assert all(r.state == "too_small" for r in later)
        assert await refunder.round() == []
        await core.assert_books_balance()
    finally:
        await core.close()


async def test_only_expired_keys_with_an_address_are_refunded(
    tmp_path: Path, mint: MintHandle, fee_mint: MintHandle, make_token, lnurl_factory
) -> None:
    lnurl = await lnurl_factory(fee_mint)
    core = await build_core(tmp_path / "ledger.sqlite3", [mint.url])
    try:
        address = lnurl.address("bob")
        live, _ = await core.payments.create_key(
            await make_token(50), expires_at=int(time.time()) + 3600, refund_address=address
        )
        forever, _ = await core.payments.create_key(await make_token(50), refund_address=address)
        no_address, _ = await core.payments.create_key(
            await make_token(50), expires_at=int(time.time()) - 1
        )
        assert await ExpiryRefunder(core.wallet, private_hosts=True).round() == []
        for key in (live, forever, no_address):
            account = await core.ledger.account(api_key_account(key))
            assert account is not None and account.balance_msat == 50_000
        assert lnurl.invoices == []
    finally:
        await core.close()


async def test_failed_refund_keeps_the_balance_and_retries_with_backoff(
    tmp_path: Path, mint: MintHandle, fee_mint: MintHandle, make_token, lnurl_factory
) -> None:
    lnurl = await lnurl_factory(fee_mint)
    lnurl.failing = True
    core = await build_core(tmp_path / "ledger.sqlite3", [mint.url])
    try:
        account_id = await expired_key(core, make_token, mint, 100, lnurl.address("carol"))
        refunder = ExpiryRefunder(core.wallet, retry_base_seconds=30, private_hosts=True)
        t0 = int(time.time())
        (first,) = await refunder.round(at=t0)
        assert first.state == "failed" and "cannot take this now" in (first.error or "")
        account = await core.ledger.account(account_id)
        assert account is not None and account.balance_msat == 100_000
        record = await refund_record(core.ledger.db, account_id)
        assert record is not None and record["failures"] == 1 and record["next_at"] == t0 + 30
        assert await refunder.round(at=t0 + 29) == []  # backing off
        (second,) = await refunder.round(at=t0 + 30)
        assert second.state == "failed"
        record = await refund_record(core.ledger.db, account_id)
        assert record is not None and record["next_at"] == t0 + 30 + 60  # doubled
        lnurl.failing = False
        (third,) = await refunder.round(at=t0 + 90)
        assert third.state == "paid"
        record = await refund_record(core.ledger.db, account_id)
        assert record is not None and record["failures"] == 0 and record["state"] == "paid"
        await core.assert_books_balance()
    finally:
        await core.close()


async def test_unreachable_address_fails_cleanly(
    tmp_path: Path, mint: MintHandle, make_token
) -> None:
    core = await build_core(tmp_path / "ledger.sqlite3", [mint.url])
    try:
        account_id = await expired_key(core, make_token, mint, 30, f"dave@127.0.0.1:{dead_port()}")
        (result,) = await ExpiryRefunder(core.wallet, private_hosts=True).round()
        assert result.state == "failed" and result.error
        account = await core.ledger.account(account_id)
        assert account is not None and account.balance_msat == 30_000
        await core.assert_books_balance()
    finally:
        await core.close()


async def test_expired_key_owner_claims_the_balance_after_a_failed_refund(
    node: Node, make_token, fee_mint: MintHandle, lnurl_factory
) -> None:
    lnurl = await lnurl_factory(fee_mint)
    async with httpx.AsyncClient(base_url=node.base) as http:
        token = await make_token(40)
        soon = expires_soon()
        r = await http.post(
            "/wallet/create",
            json={
                "cashu_token": token,
                "expires_at": soon,
                "refund_address": lnurl.address("broken"),
            },
        )
        assert r.status_code == 200, r.text
        key = r.json()["api_key"]
        await until_past(soon)
        (result,) = await ExpiryRefunder(node.core.wallet, private_hosts=True).round()
        assert result.state == "failed"
        auth = {"Authorization": f"Bearer {key}"}
        info = (await http.get("/wallet/balance", headers=auth)).json()
        assert info["balance"] == 40_000
        r = await http.post("/wallet/refund", headers=auth)
        assert r.status_code == 200, r.text
        assert await make_token.redeem(r.json()["token"]) == 40
        assert (await http.get("/wallet/balance", headers=auth)).json()["balance"] == 0
    # A claimed key has nothing left to refund.
    assert await ExpiryRefunder(node.core.wallet, private_hosts=True).round() == []


@dataclass
class Service:
    """What the refund service reads of the daemon's core."""

    wallet: Wallet
    config: Config


def settings(**wallet: Any) -> Config:
    return dataclasses.replace(Config(), wallet=dataclasses.replace(WalletSection(), **wallet))


async def test_a_refund_address_on_a_loopback_host_is_refused_by_default(
    tmp_path: Path, mint: MintHandle, make_token, lnurl_factory
) -> None:
    """Clients choose refund addresses: the node calls no loopback or private host for them."""
    lnurl = await lnurl_factory(mint)
    core = await build_core(tmp_path / "ledger.sqlite3", [mint.url])
    try:
        account_id = await expired_key(core, make_token, mint, 64, lnurl.address("mallory"))
        (result,) = await ExpiryRefunder(core.wallet).round()
        assert result.state == "failed" and "not a public address" in (result.error or "")
        assert "mallory" not in lnurl.lookups
        account = await core.ledger.account(account_id)
        assert account is not None and account.balance_msat == 64_000
        await core.assert_books_balance()
    finally:
        await core.close()


async def test_service_does_nothing_when_refunds_are_off(
    tmp_path: Path, mint: MintHandle, make_token, lnurl_factory
) -> None:
    lnurl = await lnurl_factory(mint)
    core = await build_core(tmp_path / "ledger.sqlite3", [mint.url])
    try:
        await expired_key(core, make_token, mint, 64, lnurl.address("erin"))
        stop = asyncio.Event()
        service = Service(core.wallet, settings(refund_expired=False, refund_private_hosts=True))
        task = asyncio.create_task(refund_expired_keys(service, stop))
        await asyncio.sleep(0)
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        assert "erin" not in lnurl.lookups
    finally:
        await core.close()


async def test_service_refunds_and_stops(
    tmp_path: Path, mint: MintHandle, fee_mint: MintHandle, make_token, lnurl_factory
) -> None:
    lnurl = await lnurl_factory(fee_mint)
    core = await build_core(tmp_path / "ledger.sqlite3", [mint.url])
    try:
        account_id = await expired_key(core, make_token, mint, 64, lnurl.address("erin"))
        stop = asyncio.Event()
        service = Service(core.wallet, settings(refund_private_hosts=True))
        task = asyncio.create_task(refund_expired_keys(service, stop))
        record = await until(
            lambda: refund_record(core.ledger.db, account_id), what="the refund was recorded"
        )
        assert record["state"] == "paid"
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        await core.assert_books_balance()
    finally:
        await core.close()


async def test_a_stalling_refund_address_does_not_hold_up_the_refunds_after_it(
    tmp_path: Path, mint: MintHandle, fee_mint: MintHandle, make_token, lnurl_factory
) -> None:
    """A client's address whose server drips its answer is cut off within the round's time box
    (here the LNURL client's own deadline is far longer), and the next key is refunded."""
    lnurl = await lnurl_factory(fee_mint)
    core = await build_core(tmp_path / "ledger.sqlite3", [mint.url])
    try:
        async with drip_server() as port, lnurl_client(600.0) as http:
            stalled = await expired_key(core, make_token, mint, 50, f"eve@127.0.0.1:{port}")
            fine = await expired_key(core, make_token, mint, 100, lnurl.address("frank"))
            async with core.ledger.db.write() as conn:  # the stalling key comes first
                await conn.execute("UPDATE accounts SET expires_at = 1 WHERE id = ?", (stalled,))
            refunder = ExpiryRefunder(core.wallet, http=http, private_hosts=True, address_seconds=3)
            first, second = await asyncio.wait_for(refunder.round(), 120)  # a hang guard only
        assert (first.account_id, first.state) == (stalled, "failed")
        assert "gave no payable invoice within 3 s" in (first.error or "")
        assert (second.account_id, second.state) == (fine, "paid")
        account = await core.ledger.account(stalled)
        assert account is not None and account.balance_msat == 50_000  # kept, retried later
        record = await refund_record(core.ledger.db, stalled)
        assert record is not None and record["failures"] == 1
        await core.assert_books_balance()
    finally:
        await core.close()
