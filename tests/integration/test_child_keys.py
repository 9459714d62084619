"""Child keys over HTTP: a parent key makes them, they spend from its balance up to a limit.

Against the real mint and the HTTP node; the child's requests go through the official openai
SDK. Every test ends with the books audited (the ``node`` fixture).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest

from nodeprov.core import accounts_admin
from nodeprov.core.payments import api_key_account
from tests.support.http_node import (  # noqa: F401  (fixtures)
    Node,
    node_fixture,
    upstream_fixture,
)

pytestmark = pytest.mark.usefixtures("ledger_backend")

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def hold_of(node: Node) -> int:
    """The most one :data:`CHAT` request may cost: what its hold reserves."""
    return node.core.pricer.max_cost("fake-chat", CHAT, "chat").total_msat


async def parent_key(node: Node, make_token: Any, sats: int = 100) -> str:
    key, _ = await node.core.payments.create_key(await make_token(sats))
    return key


async def make_child(http: httpx.AsyncClient, parent: str, **options: Any) -> dict[str, Any]:
    r = await http.post("/wallet/child-key", json=options, headers=auth(parent))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def sdk_chat(node: Node, key: str) -> Any:
    client = openai.OpenAI(base_url=node.base, api_key=key, max_retries=0)
    return client.chat.completions.with_raw_response.create(**CHAT)


async def test_a_child_key_pays_from_its_parent_through_the_openai_sdk(
    node: Node, make_token: Any
) -> None:
    parent = await parent_key(node, make_token)
    limit = 3 * hold_of(node)
    async with httpx.AsyncClient(base_url=node.base) as http:
        created = await make_child(http, parent, balance_limit=limit, label="ci runner")
        assert created["count"] == 1 and created["cost_msats"] == 0
        assert created["parent_balance"] == 100_000
        (child,) = created["api_keys"]
        assert child.startswith("sk-") and child != parent
        (entry,) = created["child_keys"]
        assert entry["api_key"] == child and entry["label"] == "ci runner"
        assert entry["balance_limit"] == limit and entry["total_spent"] == 0
        raw = await asyncio.to_thread(sdk_chat, node, child)
        assert raw.parse().choices[0].message.content
        cost = int(raw.headers["X-Cost-Msat"])
        assert int(raw.headers["X-Balance-Msat"]) == limit - cost  # the child's room, not more
        info = (await http.get("/wallet/balance", headers=auth(parent))).json()
    assert info["balance"] == 100_000 - cost and info["is_child"] is False
    (listed,) = info["child_keys"]
    assert listed["id"] == entry["id"] and listed["label"] == "ci runner"
    assert listed["balance_limit"] == limit and listed["total_spent"] == cost
    assert listed["revoked"] is False and listed["validity_date"] is None
    assert child not in str(info)  # the key itself is shown once, at creation
    parent_account = await node.account(parent)
    assert parent_account.total_spent_msat == cost and parent_account.reserved_msat == 0


async def test_a_child_is_refused_with_402_past_its_limit_and_the_parent_is_not_charged(
    node: Node, make_token: Any
) -> None:
    parent = await parent_key(node, make_token)
    hold = hold_of(node)
    async with httpx.AsyncClient(base_url=node.base) as http:
        created = await make_child(http, parent, balance_limit=hold + hold // 2)
        (child,) = created["api_keys"]
        first = await http.post("/chat/completions", json=CHAT, headers=auth(child))
        assert first.status_code == 200, first.text
        before = await node.account(parent)
        refused = await http.post("/chat/completions", json=CHAT, headers=auth(child))
        assert refused.status_code == 402
        error = refused.json()["error"]
        assert error["code"] == "insufficient_balance" and "limit" in error["message"]
        after = await node.account(parent)
        assert after.balance_msat == before.balance_msat and after.reserved_msat == 0
        # The parent itself still pays for its own requests.
        own = await http.post("/chat/completions", json=CHAT, headers=auth(parent))
        assert own.status_code == 200
        info = (await http.get("/wallet/balance", headers=auth(child))).json()
    assert info["is_child"] is True and info["id"] == created["child_keys"][0]["id"]
    assert info["total_spent"] == int(first.headers["X-Cost-Msat"])
    assert info["balance"] == hold + hold // 2 - info["total_spent"]


async def test_a_child_without_a_limit_spends_up_to_the_parents_balance(
    node: Node, make_token: Any
) -> None:
    parent = await parent_key(node, make_token, sats=2)
    async with httpx.AsyncClient(base_url=node.base) as http:
        (child,) = (await make_child(http, parent))["api_keys"]
        assert (await http.post("/chat/completions", json=CHAT, headers=auth(child))).is_success
        refused = await http.post("/chat/completions", json=CHAT, headers=auth(child))
    assert refused.status_code == 402  # 2 sat: room for one hold only
    assert "limit" not in refused.json()["error"]["message"]


async def test_a_child_cannot_move_money_out_or_make_children(node: Node, make_token: Any) -> None:
    parent = await parent_key(node, make_token)
    async with httpx.AsyncClient(base_url=node.base) as http:
        (child,) = (await make_child(http, parent))["api_keys"]
        token = await make_token(5)
        refusals = [
            await http.post("/wallet/withdraw", json={"amount": 1000}, headers=auth(child)),
            await http.post("/wallet/refund", headers=auth(child)),
            await http.post("/balance/refund", headers=auth(child)),
            await http.post("/wallet/topup", json={"cashu_token": token}, headers=auth(child)),
            await http.post("/wallet/child-key", json={}, headers=auth(child)),
            await http.post("/wallet/lightning", json={"amount": 10}, headers=auth(child)),
        ]
        for refused in refusals:
            assert refused.status_code == 403, (refused.request.url, refused.text)
            error = refused.json()["error"]
            assert error["code"] == "child_key_not_allowed" and "parent" in error["message"]
        assert await make_token.redeem(token) == 5  # the topup's token was never taken
    account = await node.account(parent)
    assert account.balance_msat == 100_000


async def test_a_parent_revokes_a_child_which_is_then_401(node: Node, make_token: Any) -> None:
    parent = await parent_key(node, make_token)
    other = await parent_key(node, make_token, sats=10)
    async with httpx.AsyncClient(base_url=node.base) as http:
        created = await make_child(http, parent, count=2)
        (gone, kept), (gone_id, _) = created["api_keys"], [c["id"] for c in created["child_keys"]]
        assert (await http.post("/chat/completions", json=CHAT, headers=auth(gone))).is_success
        # Only the parent may revoke its child: another key is told there is no such child.
        stranger = await http.delete(f"/wallet/child-key/{gone_id}", headers=auth(other))
        assert stranger.status_code == 404 and stranger.json()["error"]["code"]
        by_child = await http.delete(f"/wallet/child-key/{gone_id}", headers=auth(kept))
        assert by_child.status_code == 403
        r = await http.delete(f"/wallet/child-key/{gone_id}", headers=auth(parent))
        assert r.status_code == 200 and r.json()["revoked"] is True and r.json()["id"] == gone_id
        refused = await http.post("/chat/completions", json=CHAT, headers=auth(gone))
        assert refused.status_code == 401
        assert (await http.get("/wallet/balance", headers=auth(gone))).status_code == 401
        assert (await http.post("/chat/completions", json=CHAT, headers=auth(kept))).is_success
        again = await http.delete(f"/balance/child-key/{gone_id}", headers=auth(parent))
        assert again.status_code == 200 and again.json()["revoked"] is True
        info = (await http.get("/wallet/info", headers=auth(parent))).json()
    revoked = {c["id"]: c["revoked"] for c in info["child_keys"]}
    assert revoked == {gone_id: True, created["child_keys"][1]["id"]: False}


async def test_an_expired_child_is_401(node: Node, make_token: Any) -> None:
    parent = await parent_key(node, make_token)
    async with httpx.AsyncClient(base_url=node.base) as http:
        created = await make_child(http, parent, validity_date=int(time.time()) + 3600)
        (child,), (entry,) = created["api_keys"], created["child_keys"]
        assert entry["validity_date"] is not None
        assert (await http.post("/chat/completions", json=CHAT, headers=auth(child))).is_success
        async with node.core.ledger.db.write() as conn:  # its hour has passed
            await conn.execute(
                "UPDATE child_keys SET expires_at = ? WHERE id = ?",
                (int(time.time()) - 1, entry["id"]),
            )
        refused = await http.post("/chat/completions", json=CHAT, headers=auth(child))
        assert refused.status_code == 401 and "expired" in refused.json()["error"]["message"]
        assert (await http.get("/wallet/balance", headers=auth(child))).status_code == 401


async def test_the_children_of_a_revoked_parent_stop_too(node: Node, make_token: Any) -> None:
    parent = await parent_key(node, make_token)
    async with httpx.AsyncClient(base_url=node.base) as http:
        (child,) = (await make_child(http, parent))["api_keys"]
        assert (await http.post("/chat/completions", json=CHAT, headers=auth(child))).is_success
        await accounts_admin.revoke(node.core.ledger, api_key_account(parent))
        refused = await http.post("/chat/completions", json=CHAT, headers=auth(child))
        assert refused.status_code == 401
        assert (await http.get("/wallet/balance", headers=auth(child))).status_code == 401


async def test_a_token_used_as_a_key_cannot_make_children(node: Node, make_token: Any) -> None:
    token = await make_token(20)
    async with httpx.AsyncClient(base_url=node.base) as http:
        assert (await http.post("/chat/completions", json=CHAT, headers=auth(token))).is_success
        r = await http.post("/wallet/child-key", json={}, headers=auth(token))
    assert r.status_code == 403
    assert "/v1/wallet/create" in r.json()["error"]["message"]


async def test_bad_child_key_requests_are_400_and_make_nothing(node: Node, make_token: Any) -> None:
    parent = await parent_key(node, make_token)
    async with httpx.AsyncClient(base_url=node.base) as http:
        assert (await http.post("/wallet/child-key", json={})).status_code == 401
        unknown = await http.post("/wallet/child-key", json={}, headers=auth("sk-nobody"))
        assert unknown.status_code == 401
        for body in (
            {"balance_limit": -5},
            {"count": 0},
            {"validity_date": 1},
            {"balance_limit_reset": "daily"},
            {"label": "x" * 1000},
        ):
            r = await http.post("/wallet/child-key", json=body, headers=auth(parent))
            assert r.status_code == 400, body
            assert r.json()["error"]["type"] == "invalid_request_error"
        missing = await http.delete("/wallet/child-key/ck_nothing", headers=auth(parent))
        assert missing.status_code == 404
        info = (await http.get("/wallet/balance", headers=auth(parent))).json()
    assert info["child_keys"] == []


async def test_a_child_streams_with_the_async_openai_sdk_and_its_parent_pays(
    node: Node, make_token: Any
) -> None:
    parent = await parent_key(node, make_token)
    async with httpx.AsyncClient(base_url=node.base) as http:
        created = await make_child(http, parent, balance_limit=5 * hold_of(node))
    client = openai.AsyncOpenAI(base_url=node.base, api_key=created["api_keys"][0], max_retries=0)
    stream = await client.chat.completions.create(**CHAT, stream=True)
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    await client.close()
    await node.wait_idle()  # the stream's settle may trail its last chunk
    child = await node.core.payments.children.get(created["child_keys"][0]["id"])
    account = await node.account(parent)
    assert text and child is not None and child.spent_msat > 0 and child.reserved_msat == 0
    assert account.total_spent_msat == child.spent_msat
    assert account.balance_msat == 100_000 - child.spent_msat


async def test_many_concurrent_sdk_requests_by_a_parent_and_children_keep_every_bound(
    node: Node, make_token: Any
) -> None:
    parent = await parent_key(node, make_token, sats=20)
    hold = hold_of(node)
    async with httpx.AsyncClient(base_url=node.base) as http:
        created = await make_child(http, parent, count=3, balance_limit=3 * hold)
    keys = [parent, *created["api_keys"]]
    clients = [openai.AsyncOpenAI(base_url=node.base, api_key=k, max_retries=0) for k in keys]

    async def ask(client: openai.AsyncOpenAI) -> int:
        try:
            await client.chat.completions.create(**CHAT)
        except openai.APIStatusError as refused:
            return refused.status_code
        return 200

    statuses = await asyncio.gather(*(ask(clients[i % 4]) for i in range(48)))
    for client in clients:
        await client.close()
    await node.wait_idle()
    assert set(statuses) <= {200, 402} and 402 in statuses
    account = await node.account(parent)
    assert account.balance_msat >= 0 and account.reserved_msat == 0
    spent_by_children = 0
    for entry in created["child_keys"]:
        child = await node.core.payments.children.get(entry["id"])
        assert child is not None and child.spent_msat <= 3 * hold and child.reserved_msat == 0
        spent_by_children += child.spent_msat
    assert account.total_spent_msat >= spent_by_children
    assert account.balance_msat == 20_000 - account.total_spent_msat
