"""The wallet routes, error bodies and listings that Routstr's clients read, on the real node.

Routstr's client SDK collects an ``X-Cashu`` payment's change with ``POST /v1/wallet/refund``
and ``X-Cashu: <the token it paid with>``, reads a key's balance and full key from
``GET /v1/wallet/info``, tops up only on a 402 of ``type=insufficient_quota``,
``code=insufficient_balance``, and drops a token on ``type=token_already_spent``.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from tests.support.http_node import (  # noqa: F401  (fixtures)
    PRICE,
    Node,
    node_fixture,
    upstream_fixture,
)

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
ENVELOPE = {"message", "type", "param", "code"}


async def create_key(http: httpx.AsyncClient, token: str) -> str:
    r = await http.post("/wallet/create", json={"cashu_token": token})
    assert r.status_code == 200, r.text
    return str(r.json()["api_key"])


@pytest.mark.parametrize("path", ["/wallet/refund", "/balance/refund"])
async def test_refund_with_the_paying_token_returns_that_payments_change(
    node: Node, make_token, path: str
) -> None:
    token = await make_token(30)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        paid = await http.post("/chat/completions", json=CHAT, headers={"X-Cashu": token})
        assert paid.status_code == 200, paid.text
        change = paid.headers["x-cashu"]
        r = await http.post(path, headers={"X-Cashu": token, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["token"] == r.headers["x-cashu"] == change
    cost_sat = math.ceil(int(paid.headers["x-cost-msat"]) / 1000)
    assert r.json()["sats"] == str(30 - cost_sat)
    assert await make_token.redeem(r.json()["token"]) == 30 - cost_sat


async def test_refund_of_a_streamed_payment_returns_its_change(node: Node, make_token) -> None:
    token = await make_token(30)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        async with http.stream(
            "POST", "/chat/completions", json={**CHAT, "stream": True}, headers={"X-Cashu": token}
        ) as stream:
            assert stream.status_code == 200
            body = (await stream.aread()).decode()
        await node.wait_idle()
        r = await http.post("/wallet/refund", headers={"X-Cashu": token})
    assert r.status_code == 200, r.text
    assert r.json()["token"] in body  # the same change the stream's last event carried
    assert await make_token.redeem(r.json()["token"]) > 0


async def test_a_refund_while_the_paid_job_runs_is_425_then_the_change(
    node: Node, make_token
) -> None:
    token = await make_token(30)
    body = {**CHAT, "model": "fake-chat+pause-2", "stream": True}
    node.upstream.arm_pause()
    try:
        async with (
            httpx.AsyncClient(base_url=node.base, timeout=60) as http,
            http.stream("POST", "/chat/completions", json=body, headers={"X-Cashu": token}) as r,
        ):
            assert r.status_code == 200
            lines = r.aiter_lines()
            datas = 0
            while datas < 2:  # the upstream is paused mid-stream: the job holds its money
                datas += (await lines.__anext__()).startswith("data:")
            early = await http.post("/wallet/refund", headers={"X-Cashu": token})
            assert early.status_code == 425, early.text
            assert early.headers["retry-after"] == "2"
            assert early.json()["error"]["code"] == "refund_pending"
            node.upstream.resume_paused()
            _ = [line async for line in lines]
    finally:
        node.upstream.resume_paused()
    await node.wait_idle()
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        later = await http.post("/wallet/refund", headers={"X-Cashu": token})
    assert later.status_code == 200 and await make_token.redeem(later.json()["token"]) > 0


async def test_a_key_whose_balance_is_all_held_is_not_called_empty(node: Node, make_token) -> None:
    body = {**CHAT, "model": "fake-chat+pause-2", "stream": True}
    hold = node.core.pricer.max_cost("fake-chat+pause-2", body, "chat").total_msat
    async with httpx.AsyncClient(base_url=node.base, timeout=60) as http:
        key = await create_key(http, await make_token(math.ceil(hold / 1000)))
        auth = {"Authorization": f"Bearer {key}"}
        node.upstream.arm_pause()
        try:
            async with http.stream("POST", "/chat/completions", json=body, headers=auth) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                datas = 0
                while datas < 2:
                    datas += (await lines.__anext__()).startswith("data:")
                busy = await http.post("/wallet/refund", headers=auth)
                assert busy.status_code == 425, busy.text
                assert "ongoing requests" in busy.json()["error"]["message"]
                node.upstream.resume_paused()
                _ = [line async for line in lines]
        finally:
            node.upstream.resume_paused()
        await node.wait_idle()
        done = await http.post("/wallet/refund", headers=auth)
    assert done.status_code in (200, 400), done.text  # the change, or too little to pay out
    if done.status_code == 200:
        await make_token.redeem(done.json()["token"])


async def test_an_empty_refund_says_no_balance_to_refund(node: Node, make_token) -> None:
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        key = await create_key(http, await make_token(5))
        auth = {"Authorization": f"Bearer {key}"}
        first = await http.post("/wallet/refund", headers=auth)
        assert first.status_code == 200 and await make_token.redeem(first.json()["token"]) == 5
        again = await http.post("/wallet/refund", headers=auth)
    assert again.status_code == 400, again.text
    error = again.json()["error"]
    assert set(error) == ENVELOPE
    assert error["message"] == "No balance to refund" and error["code"] == "no_balance"


async def test_a_payment_that_left_no_change_has_no_balance_to_refund(
    node: Node, make_token
) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 200}]}
    hold = node.core.pricer.max_cost("fake-chat", body, "chat").total_msat
    token = await make_token(math.ceil(hold / 1000))
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        paid = await http.post(
            "/chat/completions",
            json={**body, "model": "fake-chat+nousage"},
            headers={"X-Cashu": token},
        )
        assert paid.status_code == 200 and "x-cashu" not in paid.headers  # charged the hold
        r = await http.post("/wallet/refund", headers={"X-Cashu": token})
    assert r.status_code == 400 and r.json()["error"]["message"] == "No balance to refund"


async def test_an_unknown_token_has_nothing_to_refund_and_is_not_taken(
    node: Node, make_token
) -> None:
    token = await make_token(3)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        r = await http.post("/wallet/refund", headers={"X-Cashu": token})
    assert r.status_code == 401 and set(r.json()["error"]) == ENVELOPE
    assert await make_token.redeem(token) == 3  # never swapped


async def test_insufficient_key_balance_is_the_402_routstr_clients_top_up_on(
    node: Node, make_token
) -> None:
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        key = await create_key(http, await make_token(1))
        auth = {"Authorization": f"Bearer {key}"}
        r = await http.post("/chat/completions", json=CHAT, headers=auth)
        assert r.status_code == 402
        error = r.json()["error"]
        assert set(error) == ENVELOPE and error["param"] is None
        assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_balance")
        r = await http.post(
            "/wallet/topup", json={"cashu_token": await make_token(9)}, headers=auth
        )
        assert r.status_code == 200, r.text
        r = await http.post("/chat/completions", json=CHAT, headers=auth)
    assert r.status_code == 200, r.text


async def test_a_spent_token_carries_type_token_already_spent(node: Node, make_token) -> None:
    token = await make_token(5)
    await make_token.redeem(token)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        for headers in ({"X-Cashu": token}, {"Authorization": f"Bearer {token}"}):
            r = await http.post("/chat/completions", json=CHAT, headers=headers)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert set(error) == ENVELOPE and error["type"] == "token_already_spent"


async def test_every_error_body_has_the_openai_envelope(node: Node) -> None:
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        answers = [
            await http.get("/no/such/route"),
            await http.get("/wallet/refund"),
            await http.post("/chat/completions", json={**CHAT, "model": "nope"}),
            await http.get("/wallet/info"),
        ]
    for r in answers:
        assert r.status_code >= 400 and set(r.json()["error"]) == ENVELOPE, r.text


async def test_wallet_info_and_the_balance_root_return_the_full_key(node: Node, make_token) -> None:
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        key = await create_key(http, await make_token(7))
        auth = {"Authorization": f"Bearer {key}"}
        for path in ("/wallet/info", "/balance/info", "/balance/", "/wallet/"):
            r = await http.get(path, headers=auth)
            assert r.status_code == 200, (path, r.text)
            assert r.json()["api_key"] == key and r.json()["balance"] == 7000
            assert r.json()["reserved"] == 0
        token = await make_token(4)
        r = await http.get("/wallet/info", headers={"Authorization": f"Bearer {token}"})
        assert r.json()["api_key"] == token and r.json()["balance"] == 4000
        # The balance route keeps showing a masked key (for screens and logs).
        r = await http.get("/wallet/balance", headers=auth)
        assert key not in r.text and r.json()["available"] == 7000
        refund = await http.post("/wallet/refund", headers={"Authorization": f"Bearer {token}"})
        assert await make_token.redeem(refund.json()["token"]) == 4


async def test_every_listed_model_has_a_name(node: Node) -> None:
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        models = (await http.get("/models")).json()["data"]
    assert models and all(m["name"] == m["id"] for m in models)


def _largest_chat(max_tokens: int) -> dict[str, Any]:
    # A prompt whose byte bound is past the context: the hold counts the whole context.
    text = "y" * (PRICE.context_tokens * 2)
    return {
        "model": "fake-chat",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": text},
        ],
        "max_tokens": max_tokens,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("/chat/completions", _largest_chat(PRICE.max_output_tokens)),
        ("/chat/completions", {**CHAT, "max_tokens": PRICE.max_output_tokens}),
        ("/completions", {"model": "fake-chat", "prompt": "z" * 20_000}),
        ("/embeddings", {"model": "fake-embed", "input": "w" * 30_000}),
        (
            "/images/generations",
            {"model": "fake-image", "prompt": "a cat", "size": "1024x1024", "quality": "hd"},
        ),
    ],
)
async def test_a_token_of_the_advertised_max_cost_pays_any_request_within_limits(
    node: Node, make_token, endpoint: str, body: dict[str, Any]
) -> None:
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        models = {m["id"]: m for m in (await http.get("/models")).json()["data"]}
        max_cost = models[body["model"]]["sats_pricing"]["max_cost"]
        assert max_cost == int(max_cost)
        token = await make_token(int(max_cost))
        r = await http.post(endpoint, json=body, headers={"X-Cashu": token})
    assert r.status_code == 200, r.text
    if "x-cashu" in r.headers:
        await make_token.redeem(r.headers["x-cashu"])
