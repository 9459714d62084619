"""Money moves keyed by a reference find their earlier outcome instead of paying twice.

``POST /v1/wallet/create`` is keyed by its token (the key is derived from it), DM deposits
and withdrawals by ``dm:<event id>``.
"""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import httpx
import pytest

from nodeprov.core.key_secret import SECRET_FILE
from nodeprov.core.payments import api_key_account
from nodeprov.protocol.cashu_token import parse_token, serialize_token
from tests.conftest import TokenMaker
from tests.support.http_node import (  # noqa: F401  (fixtures)
    Node,
    node_fixture,
    upstream_fixture,
)

pytestmark = pytest.mark.usefixtures("ledger_backend")

CHAT_BODY = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def test_create_again_with_a_redeemed_token_returns_the_same_key(
    node: Node, make_token: TokenMaker, tmp_path: Path
) -> None:
    token = await make_token(30)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        first = await http.post("/wallet/create", json={"cashu_token": token})
        assert first.status_code == 200, first.text
        key = first.json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        r = await http.post("/chat/completions", json=CHAT_BODY, headers=auth)
        assert r.status_code == 200, r.text
        left = 30_000 - int(r.headers["x-cost-msat"])
        # The answer was lost: the same token, even in another encoding, names the same key.
        as_v3 = serialize_token(parse_token(token), version=3)
        again = await http.post("/wallet/create", json={"cashu_token": as_v3})
        assert again.status_code == 200, again.text
        assert again.json()["api_key"] == key
        assert again.json()["balance"] == left
        alias = await http.post("/balance/create", params={"initial_balance_token": token})
        assert alias.json()["api_key"] == key
    account = await node.account(key)
    assert account.balance_msat == left and account.total_deposited_msat == 30_000
    secret = tmp_path / SECRET_FILE  # next to the test node's ledger
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


async def test_concurrent_creates_with_one_token_fund_one_key_once(
    node: Node, make_token: TokenMaker
) -> None:
    token = await make_token(25)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        answers = await asyncio.gather(
            *(http.post("/wallet/create", json={"cashu_token": token}) for _ in range(8))
        )
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    keys = {r.json()["api_key"] for r in answers}
    assert len(keys) == 1
    assert {r.json()["balance"] for r in answers} == {25_000}
    assert (await node.account(keys.pop())).total_deposited_msat == 25_000


async def test_create_with_a_token_spent_another_way_is_refused(
    node: Node, make_token: TokenMaker
) -> None:
    token = await make_token(20)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        r = await http.post("/chat/completions", json=CHAT_BODY, headers={"X-Cashu": token})
        assert r.status_code == 200, r.text
        await make_token.redeem(r.headers["x-cashu"])
        r = await http.post("/wallet/create", json={"cashu_token": token})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "token_already_spent"
        other = await make_token(3)
        await make_token.redeem(other)
        r = await http.post("/wallet/create", json={"cashu_token": other})
        assert r.json()["error"]["code"] == "token_already_spent"


async def test_withdraw_with_a_ref_pays_once(node: Node, make_token: TokenMaker) -> None:
    payments = node.core.payments
    key, _ = await payments.create_key(await make_token(50))
    account_id = api_key_account(key)
    first = await payments.withdraw(account_id, 10_000, ref="dm:event-a")
    again = await payments.withdraw(account_id, 10_000, ref="dm:event-a")
    assert again == first
    assert (await node.account(key)).balance_msat == 40_000
    other = await payments.withdraw(account_id, 5_000, ref="dm:event-b")
    assert other.token != first.token
    assert (await node.account(key)).balance_msat == 35_000
    both = await asyncio.gather(
        *(payments.withdraw(account_id, 1_000, ref="dm:event-c") for _ in range(5))
    )
    assert len({sent.token for sent in both}) == 1
    assert (await node.account(key)).balance_msat == 34_000
    assert await make_token.redeem(first.token) == 10
    assert await make_token.redeem(other.token) == 5
    assert await make_token.redeem(both[0].token) == 1


async def test_deposit_with_a_ref_credits_once(node: Node, make_token: TokenMaker) -> None:
    payments = node.core.payments
    token = await make_token(12)
    first = await payments.deposit("npub:" + "ab" * 32, token, "dm:event-d")
    again = await payments.deposit("npub:" + "ab" * 32, token, "dm:event-d")
    assert again == first and first.credited_msat == 12_000
    assert await payments.balance("npub:" + "ab" * 32) == 12_000
    assert await payments.balance("npub:" + "cd" * 32) == 0
