"""Funding keys over Lightning (NUT-04 mint quotes) through the HTTP API and the core.

The FakeWallet mint marks its invoices paid at once, so a quote is paid by the first poll.
Run as ``python -m tests.integration.test_lightning_funding DB MINT_URL PROXY_URL`` it is
the worker that the kill -9 test stops in the middle of minting.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from nodeprov.core.lightning_funding import LightningFunding, poll_lightning_funding
from nodeprov.core.mint_api import MintApi
from nodeprov.core.payments import api_key_account
from nodeprov.http import lightning_routes
from tests.integration.test_crash_recovery import Worker, wait_until
from tests.support import http_node
from tests.support.core import build_core
from tests.support.fake_upstream import FakeUpstream
from tests.support.http_node import Node, start_node, upstream_fixture  # noqa: F401  (fixture)
from tests.support.ledger_backends import env_for, query, use_from_env
from tests.support.services import MintHandle, start_mint
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import expires_soon, until, until_past

pytestmark = pytest.mark.usefixtures("ledger_backend")

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def with_lightning_routes(create: Any) -> Any:
    """``create_app`` plus the Lightning routes, unless app.py already mounts them."""

    def make(ctx: Any) -> Any:
        app = create(ctx)
        paths = {getattr(r, "path", None) for r in app.routes}
        for route in lightning_routes.ROUTES:
            if route.path not in paths:
                app.router.routes.insert(0, route)
        return app

    return make


@pytest.fixture(name="node")
async def lightning_node(
    tmp_path: Path, mint: MintHandle, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Node]:
    """The HTTP node with the Lightning routes; the books must audit clean after the test."""
    monkeypatch.setattr(http_node, "create_app", with_lightning_routes(http_node.create_app))
    started = await start_node(tmp_path, [mint.url], upstream)
    try:
        yield started
        await started.wait_idle()
        await started.core.assert_books_balance()
    finally:
        await started.stop()


async def pay(node: Node, http: httpx.AsyncClient, quote_id: str) -> dict[str, Any]:
    """Poll a quote until it is paid (the FakeWallet mint pays at once)."""

    async def paid() -> dict[str, Any] | None:
        body: dict[str, Any] = (await http.get(f"/wallet/lightning/{quote_id}")).json()
        return body if body["state"] == "paid" else None

    result: dict[str, Any] = await until(paid, what=f"quote {quote_id} paid")
    return result


async def test_new_key_funded_over_lightning_and_shown_once(node: Node) -> None:
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.post("/wallet/lightning", json={"amount": 100})
        assert r.status_code == 200, r.text
        quote = r.json()
        assert quote["invoice"].startswith("lnbc") and quote["amount"] == 100
        assert quote["amount_msat"] == 100_000 and quote["mint"] == node.core.wallet.mints[0]
        assert quote["quote_id"].startswith("lnq_") and quote["expires_at"] > time.time()
        key = quote["api_key"]
        assert key.startswith("sk-")
        paid = await pay(node, http, quote["quote_id"])
        assert paid["balance"] == 100_000 and paid["new_key"] and "api_key" not in paid
        again = (await http.get(f"/wallet/lightning/{quote['quote_id']}")).json()
        assert again["state"] == "paid" and "api_key" not in again
        assert again["balance"] == 100_000
        auth = {"Authorization": f"Bearer {key}"}
        info = (await http.get("/wallet/balance", headers=auth)).json()
        assert info["balance"] == 100_000 and info["total_deposited"] == 100_000
    client = openai.AsyncOpenAI(base_url=node.base, api_key=key, max_retries=0)
    await client.chat.completions.create(**CHAT)
    account = await node.account(key)
    assert 0 < account.total_spent_msat < 100_000
    # The key's text was never stored: only its hash (the account id) is.
    rows = await node.core.ledger.db.fetchall("SELECT api_key FROM lightning_funding")
    assert [r[0] for r in rows] == [None]
    if node.core.ledger.db.backend != "sqlite":
        return  # the bytes on disk are the server's; the query above showed what is stored
    (database,) = [r[2] for r in await node.core.ledger.db.fetchall("PRAGMA database_list")]
    files = list(Path(database).parent.glob(Path(database).name + "*"))  # -wal, -shm too
    assert len(files) >= 2
    for path in files:
        assert key.encode() not in path.read_bytes(), path


async def test_existing_key_is_topped_up(node: Node, make_token) -> None:
    async with httpx.AsyncClient(base_url=node.base) as http:
        key = (
            await http.post("/wallet/create", json={"cashu_token": await make_token(21)})
        ).json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        r = await http.post("/wallet/lightning", json={"amount": 50}, headers=auth)
        paid = await pay(node, http, r.json()["quote_id"])
        assert "api_key" not in paid and not paid["new_key"] and paid["balance"] == 71_000
        r = await http.post("/wallet/lightning", json={"amount": 9, "api_key": key})
        assert (await pay(node, http, r.json()["quote_id"]))["balance"] == 80_000
        r = await http.post("/wallet/withdraw", json={"amount": 80_000}, headers=auth)
        assert await make_token.redeem(r.json()["token"]) == 80


async def test_new_key_with_expiry_and_refund_address(node: Node) -> None:
    soon = int(time.time()) + 3600
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.post(
            "/wallet/lightning",
            json={"amount": 5, "expires_at": soon, "refund_address": "me@example.com"},
        )
        await pay(node, http, r.json()["quote_id"])
    account = await node.account(r.json()["api_key"])
    assert account.expires_at == soon and account.refund_address == "me@example.com"
    assert account.kind == "api_key" and account.balance_msat == 5000


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "invalid_request"),
        ({"amount": 0}, 400, "invalid_request"),
        ({"amount": -5}, 400, "invalid_request"),
        ({"amount": 1.5}, 400, "invalid_request"),
        ({"amount": "lots"}, 400, "invalid_request"),
        ({"amount": 5, "api_key": "sk-nope"}, 401, "invalid_api_key"),
        ({"amount": 5, "api_key": 7}, 400, "invalid_request"),
        ({"amount": 5, "expires_at": 1}, 400, "invalid_request"),
        ({"amount": 5, "refund_address": "not an address"}, 400, "invalid_request"),
        ({"amount": 5, "mint": "https://other.example"}, 400, "invalid_request"),
    ],
)
async def test_bad_requests_get_openai_errors(
    node: Node, body: dict[str, Any], status: int, code: str
) -> None:
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.post("/wallet/lightning", json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["code"] == code and error["message"] and error["type"]


@pytest.mark.parametrize("amount", [1_000_001, 2**62])
async def test_amount_over_the_configured_maximum_is_refused(node: Node, amount: int) -> None:
    assert node.config.wallet.lightning_max_sat == 1_000_000  # the default
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.post("/wallet/lightning", json={"amount": amount})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert "at most 1000000 sat" in r.json()["error"]["message"]
    assert await node.core.ledger.db.fetchall("SELECT id FROM wallet_ops") == []


async def test_malformed_requests_and_unknown_quote(node: Node, make_token) -> None:
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.post(
            "/wallet/lightning", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
        r = await http.post(
            "/wallet/lightning", content=b"amount=5", headers={"content-type": "text/plain"}
        )
        assert r.status_code == 415
        r = await http.get("/wallet/lightning/lnq_unknown")
        assert r.status_code == 404 and r.json()["error"]["code"] == "quote_not_found"
        # Expiry options belong to new keys only.
        key = (await http.post("/wallet/create", json={"cashu_token": await make_token(2)})).json()[
            "api_key"
        ]
        r = await http.post(
            "/wallet/lightning",
            json={"amount": 5, "api_key": key, "refund_address": "me@example.com"},
        )
        assert r.status_code == 400


async def test_expired_key_cannot_be_funded(node: Node, make_token) -> None:
    async with httpx.AsyncClient(base_url=node.base) as http:
        token = await make_token(2)
        soon = expires_soon()
        r = await http.post("/wallet/create", json={"cashu_token": token, "expires_at": soon})
        key = r.json()["api_key"]
        await until_past(soon)
        r = await http.post("/wallet/lightning", json={"amount": 5, "api_key": key})
        assert r.status_code == 401 and r.json()["error"]["code"] == "account_expired"


async def test_concurrent_polls_credit_once_and_show_the_key_once(node: Node) -> None:
    async with httpx.AsyncClient(base_url=node.base) as http:
        quote = (await http.post("/wallet/lightning", json={"amount": 64})).json()
        answers = await asyncio.gather(
            *(http.get(f"/wallet/lightning/{quote['quote_id']}") for _ in range(12))
        )
        bodies = [a.json() for a in answers]
        assert all(a.status_code == 200 for a in answers), bodies
        assert not any("api_key" in b for b in bodies)  # the key came with the quote only
        await pay(node, http, quote["quote_id"])
    account = await node.account(quote["api_key"])
    assert account.balance_msat == 64_000 and account.total_deposited_msat == 64_000
    deposits = await node.core.ledger.transactions(account.id)
    assert [t["kind"] for t in deposits] == ["deposit"]


async def test_unpolled_paid_quote_is_minted_by_recovery(node: Node) -> None:
    funding = LightningFunding(node.core.wallet)
    quote = await funding.create(33)
    # Nobody polls; the background recovery finds the paid quote and credits the key.
    assert await funding.recover() == {"done": 1}
    assert await funding.recover() == {}
    status = await funding.status(quote.id)
    assert status.state == "paid" and status.balance_msat == 33_000 and quote.api_key
    account = await node.core.ledger.account(api_key_account(quote.api_key))
    assert account is not None and account.balance_msat == 33_000


async def test_poll_service_mints_paid_quotes_and_stops(node: Node) -> None:
    funding = LightningFunding(node.core.wallet)
    quote = await funding.create(21)
    stop = asyncio.Event()
    task = asyncio.create_task(poll_lightning_funding(node.core, stop, interval=0.05))
    for _ in range(200):
        op = await funding._op_by_public_id(quote.id)
        if op is not None and op.state == "done":
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    status = await funding.status(quote.id)
    assert status.state == "paid" and status.balance_msat == 21_000 and status.api_key is None


async def test_unpaid_quote_stays_unpaid_then_expires(tmp_path: Path) -> None:
    # A mint whose FakeWallet leaves invoices unpaid; start_mint retries if its port was taken.
    handle = start_mint(workdir=tmp_path / "mint", extra_env={"FAKEWALLET_BRR": "false"})
    core = await build_core(tmp_path / "ledger.sqlite3", [handle.url])
    try:
        funding = LightningFunding(core.wallet)
        quote = await funding.create(8)
        status = await funding.status(quote.id)
        assert status.state == "unpaid" and status.api_key is None and status.balance_msat is None
        assert await funding.recover() == {}
        async with core.ledger.db.write() as conn:  # as if the invoice had lapsed long ago
            await conn.execute(
                "UPDATE lightning_funding SET expires_at = 1 WHERE id = ?", (quote.id,)
            )
        assert await funding.recover() == {"expired": 1}
        status = await funding.status(quote.id)
        assert status.state == "expired" and status.api_key is None
        assert await core.ledger.accounts("api_key") == []  # no key was ever created
        await core.assert_books_balance()
    finally:
        await core.close()
        handle.close()


# ----------------------------------------------------------------- kill -9 while minting


def pending_mint_ops(db: Path) -> int:
    rows = query(db, "SELECT COUNT(*) FROM wallet_ops WHERE kind = 'mint' AND state = 'pending'")
    return int(rows[0][0])


async def quote_state(mint: MintHandle, db: Path) -> str:
    ((quote,),) = query(db, "SELECT quote FROM wallet_ops WHERE kind = 'mint'")
    async with httpx.AsyncClient() as client:
        return str((await MintApi(mint.url, client).mint_quote_state(quote))["state"])


def spawn_worker(args: list[str]) -> Worker:
    """This module as the worker process (it prints ``ready`` once its quote exists)."""
    worker = Worker.__new__(Worker)
    worker.proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_lightning_funding", *args],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env_for(Path(args[0])),
    )
    assert worker.proc.stdout is not None
    assert worker.proc.stdout.readline().strip() == "ready"
    return worker


@pytest.mark.parametrize("step", ["journalled", "at_mint", "committed"])
async def test_minting_survives_kill_at_each_step(
    tmp_path: Path, mint: MintHandle, tcp_proxy, step: str
) -> None:
    db = tmp_path / "ledger.sqlite3"
    await (await build_core(db, [mint.url])).close()
    proxy: TcpProxy = tcp_proxy(mint.url)
    worker = spawn_worker([str(db), mint.url, proxy.url])
    try:
        if step == "journalled":
            proxy.pause()
            proxy.drop_connections()
        elif step == "at_mint":
            proxy.response_delay = 60.0
        worker.go()
        if step == "committed":
            await asyncio.to_thread(worker.wait_done)
        else:
            wait_until(lambda: pending_mint_ops(db) == 1)
            if step == "at_mint":
                for _ in range(200):
                    if await quote_state(mint, db) == "ISSUED":
                        break
                    await asyncio.sleep(0.05)
                assert await quote_state(mint, db) == "ISSUED"
            else:
                await asyncio.sleep(0.3)
                assert await quote_state(mint, db) == "PAID"
        worker.kill()
    finally:
        worker.close()
        proxy.drop_connections()
        proxy.resume()

    core = await build_core(db, [mint.url])
    try:
        funding = LightningFunding(core.wallet)
        expected = {"journalled": {"done": 1}, "at_mint": {"done": 1}, "committed": {}}
        assert await funding.recover() == expected[step]
        assert await funding.recover() == {}
        assert pending_mint_ops(db) == 0
        assert await quote_state(mint, db) == "ISSUED"
        (public_id,) = (await core.ledger.db.fetchone("SELECT id FROM lightning_funding")) or ()
        status = await funding.status(public_id)
        assert status.state == "paid" and status.balance_msat == 100_000
        op = await funding._op_by_public_id(public_id)
        assert op is not None and op.account_id is not None and op.account_id.startswith("key:")
        account = await core.ledger.account(op.account_id)
        assert account is not None and account.balance_msat == 100_000
        await core.assert_books_balance()
        # The minted proofs are good: the whole balance pays out as a token.
        sent = await core.wallet.send(account.id, 100_000, mint_url=mint.url, unit="sat")
        assert sent.amount == 100
        await core.assert_books_balance()
    finally:
        await core.close()


async def _worker(argv: list[str]) -> None:
    """Create a quote, see it paid (directly at the mint), then mint through the proxy."""
    db, mint_url, proxy_url = argv
    use_from_env()
    core = await build_core(Path(db), [mint_url], mint_timeout=60.0, routes={mint_url: proxy_url})
    funding = LightningFunding(core.wallet)
    quote = await funding.create(100)
    async with httpx.AsyncClient() as direct:
        api = core.wallet.api(mint_url)
        # Polling the quote is not the crash window: it goes to the mint directly.
        api.mint_quote_state = MintApi(mint_url, direct).mint_quote_state  # type: ignore[method-assign]
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        op = await funding._op_by_public_id(quote.id)
        assert op is not None
        await funding.check(op)
    print("done", flush=True)
    await core.close()


if __name__ == "__main__":
    asyncio.run(_worker(sys.argv[1:]))


async def test_open_unpaid_quotes_are_capped_with_a_clear_error(
    tmp_path: Path, mint: MintHandle, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone may open a quote without a key; the node keeps at most the configured number
    unpaid at once (each costs a mint call per poll), and says so in an OpenAI error."""
    monkeypatch.setattr(http_node, "create_app", with_lightning_routes(http_node.create_app))
    node = await start_node(
        tmp_path, [mint.url], upstream, wallet_options={"lightning_max_open_quotes": 3}
    )
    try:
        async with httpx.AsyncClient(base_url=node.base) as http:
            opened = [await http.post("/wallet/lightning", json={"amount": 10}) for _ in range(3)]
            assert [r.status_code for r in opened] == [200, 200, 200]
            over = await http.post("/wallet/lightning", json={"amount": 10})
            assert over.status_code == 503, over.text
            error = over.json()["error"]
            assert error["code"] == "too_many_open_quotes" and error["type"] == "server_error"
            assert "3 unpaid Lightning invoices" in error["message"]
            ops = await node.core.ledger.db.fetchall("SELECT id FROM wallet_ops")
            assert len(ops) == 3  # the refused one was never stored
            await pay(node, http, opened[0].json()["quote_id"])  # one paid: room for one more
            assert (await http.post("/wallet/lightning", json={"amount": 10})).status_code == 200
        await node.wait_idle()
        await node.core.assert_books_balance()
    finally:
        await node.stop()
