"""Wallet routes, models/info, CORS, request ids and concurrency on one key."""

from __future__ import annotations

import asyncio
import re

import httpx
import openai

from nodeprov.core.payments import api_key_account
from tests.support.http_node import Node, node_fixture, upstream_fixture  # noqa: F401  (fixtures)
from tests.support.waiting import expires_soon, until_past

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def test_key_lifecycle_create_balance_topup_withdraw_refund(node: Node, make_token) -> None:
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.post("/wallet/create", json={"cashu_token": await make_token(21)})
        assert r.status_code == 200
        created = r.json()
        key = created["api_key"]
        assert key.startswith("sk-") and created["balance"] == 21_000
        auth = {"Authorization": f"Bearer {key}"}
        info = (await http.get("/wallet/balance", headers=auth)).json()
        assert info["balance"] == 21_000 and info["reserved"] == 0
        assert info["total_deposited"] == 21_000 and info["total_spent"] == 0
        assert key not in str(info)
        r = await http.post(
            "/balance/topup", json={"cashu_token": await make_token(4)}, headers=auth
        )
        assert r.json()["msats"] == 4000 and r.json()["balance"] == 25_000
        r = await http.post("/wallet/withdraw", json={"amount": 5_000}, headers=auth)
        out = r.json()
        assert (
            out["amount"] == 5 and out["unit"] == "sat" and out["mint"] == node.core.wallet.mints[0]
        )
        assert await make_token.redeem(out["token"]) == 5
        r = await http.post("/wallet/withdraw", json={"amount": 10**9}, headers=auth)
        assert r.status_code == 402
        r = await http.post("/balance/refund", headers=auth)
        assert r.status_code == 200, r.text
        assert await make_token.redeem(r.json()["token"]) == 20
        info = (await http.get("/balance/info", headers=auth)).json()
        assert info["balance"] == 0
        assert (await http.get("/wallet/balance")).status_code == 401
        # Routstr's query-parameter form, by POST only (a GET never moves money).
        r = await http.post(
            "/balance/create", params={"initial_balance_token": await make_token(2)}
        )
        assert r.json()["balance"] == 2000


async def test_create_with_expiry_and_refund_address(node: Node, make_token) -> None:
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.post(
            "/wallet/create", json={"cashu_token": await make_token(3), "expires_at": 1}
        )
        assert r.status_code == 400
        token = await make_token(3)
        soon = expires_soon()  # after the token is made, with room for the request to arrive
        r = await http.post(
            "/wallet/create",
            json={"cashu_token": token, "expires_at": soon, "refund_address": "me@example.com"},
        )
        body = r.json()
        assert body["expires_at"] == soon
        account = await node.core.ledger.account(api_key_account(body["api_key"]))
        assert account is not None and account.refund_address == "me@example.com"
        await until_past(soon)
        r = await http.post(
            "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {body['api_key']}"}
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "account_expired"


async def test_models_and_info(node: Node) -> None:
    async with httpx.AsyncClient(base_url=node.base) as http:
        models = (await http.get("/models")).json()
        info = (await http.get("/info")).json()
    entry = next(m for m in models["data"] if m["id"] == "fake-chat")
    assert models["object"] == "list" and entry["object"] == "model"
    assert entry["pricing_msat"]["request"] == 1000
    assert entry["pricing_msat"]["input_per_1m"] == 2_000_000
    assert entry["sats_pricing"]["prompt"] == 0.002 and entry["sats_pricing"]["request"] == 1
    assert info["name"] == "test-node" and info["mints"] == list(node.core.wallet.mints)
    assert info["units"] == ["sat", "msat"] and info["npub"] is None
    # No relays configured: the HTTP ways to pay, no DM jobs.
    assert info["capabilities"] == [
        "openai_http", "api_keys", "token_as_key", "x_cashu", "lightning_topup", "nip98",
        "child_keys",
    ]  # fmt: skip
    sdk = openai.AsyncOpenAI(base_url=node.base, api_key="none")
    listed = [m.id async for m in sdk.models.list()]
    assert "fake-chat" in listed


async def test_cors_and_request_ids(node: Node) -> None:
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.options(
            "/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-cashu,authorization",
            },
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = await http.get("/info", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        ids = {(await http.get("/info")).headers["x-request-id"] for _ in range(3)}
        assert len(ids) == 3


async def test_100_concurrent_requests_on_a_key_funded_for_50(node: Node, make_token) -> None:
    body = {**CHAT, "model": "fake-chat+nousage"}  # settles at the hold: each costs the max
    hold = node.core.pricer.max_cost(body["model"], body, "chat").total_msat
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.post(
            "/wallet/create", json={"cashu_token": await make_token(50 * hold, unit="msat")}
        )
        key = r.json()["api_key"]
    client = openai.AsyncOpenAI(base_url=node.base, api_key=key, max_retries=0)
    low = []

    async def one() -> bool:
        try:
            await client.chat.completions.create(**body)
            return True
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
            return False

    async def watch() -> None:
        while True:
            account = await node.account(key)
            low.append(account.available_msat)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(one() for _ in range(100)))
    watcher.cancel()
    assert sum(results) == 50
    account = await node.account(key)
    assert account.balance_msat == 0 and account.total_spent_msat == 50 * hold
    assert min(low) >= 0


async def test_a_withdraw_repeated_with_its_idempotency_key_returns_the_same_token(
    node: Node, make_token
) -> None:
    """A client that lost a withdraw's answer asks again with the same ``Idempotency-Key``
    and gets the token it was debited for; nothing is debited twice."""
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        key = await http.post("/wallet/create", json={"cashu_token": await make_token(20)})
        auth = {"Authorization": f"Bearer {key.json()['api_key']}"}
        once = {**auth, "Idempotency-Key": "withdraw-1"}
        first = await http.post("/wallet/withdraw", json={"amount": 5_000}, headers=once)
        assert first.status_code == 200, first.text
        again = await http.post("/wallet/withdraw", json={"amount": 5_000}, headers=once)
        assert again.status_code == 200, again.text
        assert again.json() == first.json()
        other = {**auth, "Idempotency-Key": "withdraw-2"}
        second = await http.post("/wallet/withdraw", json={"amount": 5_000}, headers=other)
        assert second.json()["token"] != first.json()["token"]
        balance = (await http.get("/wallet/balance", headers=auth)).json()["balance"]
        bad = {**auth, "Idempotency-Key": "x" * 300}
        refused = await http.post("/wallet/withdraw", json={"amount": 1_000}, headers=bad)
    assert balance == 10_000
    assert refused.status_code == 400
    assert await make_token.redeem(first.json()["token"]) == 5
    assert await make_token.redeem(second.json()["token"]) == 5


async def test_a_withdrawal_in_a_unit_the_node_holds_too_little_of_says_so(
    node: Node, make_token
) -> None:
    """Found by the soak: a key funded in sat asking for msat got 502 `mint_error` "no single
    mint holds enough", as if the mint had failed. It is the node's own holdings: 400, and
    the message says how much it can pay in that unit, with nothing debited."""
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        key = await http.post("/wallet/create", json={"cashu_token": await make_token(20)})
        auth = {"Authorization": f"Bearer {key.json()['api_key']}"}
        asked = await http.post(
            "/wallet/withdraw", json={"amount": 5_000, "unit": "msat"}, headers=auth
        )
        balance = (await http.get("/wallet/balance", headers=auth)).json()["balance"]
    assert asked.status_code == 400, asked.text
    error = asked.json()["error"]
    assert error["code"] == "withdrawal_too_large"
    assert re.search(r"at most \d+ msat in msat", error["message"]), error["message"]
    assert balance == 20_000


async def test_balance_keeps_the_masked_key_the_operator_finds_the_key_by(
    node: Node, make_token
) -> None:
    from nodeprov.core.accounts_admin import find_account

    async with httpx.AsyncClient(base_url=node.base) as http:
        key = (await http.post("/wallet/create", json={"cashu_token": await make_token(3)})).json()[
            "api_key"
        ]
        # A key from before masked forms were kept (or funded over Lightning) has none yet.
        async with node.core.ledger.db.write() as conn:
            await conn.execute("UPDATE accounts SET key_hint = NULL")
        shown = await http.get("/wallet/balance", headers={"Authorization": f"Bearer {key}"})
    masked = shown.json()["api_key"]
    assert masked == key[:7] + "…" + key[-4:]
    found = await find_account(node.core.ledger, masked)
    assert found.id == api_key_account(key) and found.key_hint == masked
