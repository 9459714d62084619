"""Bad input and upstream failures: right status, OpenAI-shaped error, exact (usually no) charge."""

from __future__ import annotations

import math
from typing import Any

import httpx
import openai
import pytest

from nodeprov.protocol.payment_request import decode_payment_request
from tests.support.fake_upstream import expected_usage
from tests.support.http_node import (  # noqa: F401  (fixtures)
    MAX_BODY,
    Node,
    chat_cost,
    node_fixture,
    upstream_fixture,
)

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def post(node: Node, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(node.base + path, **kwargs)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"type", "code", "message"}
    if code is not None:
        assert error["code"] == code
    return dict(error)


async def new_key(node: Node, token: str) -> str:
    r = await post(node, "/wallet/create", json={"cashu_token": token})
    return str(r.json()["api_key"])


async def test_no_payment_is_402_with_a_nut18_request(node: Node) -> None:
    r = await post(node, "/chat/completions", json=CHAT)
    error = assert_error(r, 402, "insufficient_balance")
    assert error["type"] == "insufficient_quota"
    max_msat = node.core.pricer.max_cost("fake-chat", CHAT, "chat").total_msat
    assert error["message"] == (
        f"Insufficient balance. Current: 0 sats, Required: {math.ceil(max_msat / 1000)} sats "
        f"(0 msat available, {max_msat} msat required)"
    )
    request = decode_payment_request(r.headers["x-cashu"])
    assert request.amount == math.ceil(max_msat / 1000) and request.unit == "sat"
    assert request.mints == node.core.wallet.mints and request.single_use is True


async def test_insufficient_key_balance_is_402_and_charges_nothing(node: Node, make_token) -> None:
    key = await new_key(node, await make_token(1))
    r = await post(node, "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
    assert_error(r, 402, "insufficient_balance")
    assert r.headers["x-cashu"].startswith("creqA")
    assert r.json()["error"]["message"].startswith("Insufficient balance. Current: 1 sats")
    assert (await node.account(key)).balance_msat == 1000


async def test_small_x_cashu_token_is_400_and_not_taken(node: Node, make_token) -> None:
    """NUT-24: a token too small for the request's maximum cost is refused, not swapped."""
    token = await make_token(1)
    r = await post(node, "/chat/completions", json=CHAT, headers={"X-Cashu": token})
    error = assert_error(r, 400, "token_too_small")
    assert "refund" not in error
    assert r.headers["x-cashu"].startswith("creqA")
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}
    assert await make_token.redeem(token) == 1
    assert await node.operator_msat() == 0


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Authorization": "Basic abc"}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer garbage"}, 401, "invalid_api_key"),
        ({"Authorization": "Bearer sk-unknown"}, 401, "invalid_api_key"),
        ({"X-Cashu": "cashuBgarbage"}, 400, "invalid_token"),
        ({"X-Cashu": "not-a-token"}, 400, "invalid_token"),
    ],
)
async def test_bad_credentials(node: Node, headers: dict[str, str], status: int, code: str) -> None:
    assert_error(await post(node, "/chat/completions", json=CHAT, headers=headers), status, code)


async def test_spent_and_foreign_mint_tokens(node: Node, make_token, fee_mint) -> None:
    token = await make_token(5)
    await make_token.redeem(token)
    r = await post(node, "/chat/completions", json=CHAT, headers={"X-Cashu": token})
    assert_error(r, 400, "token_already_spent")
    foreign = await make_token(5, mint=fee_mint)
    r = await post(node, "/chat/completions", json=CHAT, headers={"X-Cashu": foreign})
    assert_error(r, 400, "untrusted_mint")
    r = await post(node, "/wallet/create", json={"cashu_token": foreign})
    assert_error(r, 400, "untrusted_mint")


async def test_bad_requests_never_charge(node: Node, make_token) -> None:
    key = await new_key(node, await make_token(20))
    auth = {"Authorization": f"Bearer {key}"}
    r = await post(node, "/chat/completions", json={**CHAT, "model": "nope"}, headers=auth)
    assert_error(r, 404, "model_not_found")
    r = await post(node, "/chat/completions", content=b"{not json", headers=auth)
    assert_error(r, 400)
    r = await post(
        node,
        "/chat/completions",
        content=b"model=x",
        headers={**auth, "Content-Type": "text/plain"},
    )
    assert_error(r, 415)
    r = await post(node, "/chat/completions", json={**CHAT, "max_tokens": 10**9}, headers=auth)
    assert_error(r, 400, "invalid_request")
    r = await post(node, "/chat/completions", json={**CHAT, "messages": []}, headers=auth)
    assert_error(r, 400)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (MAX_BODY + 1)}]}
    r = await post(node, "/chat/completions", json=big, headers=auth)
    assert_error(r, 413, "request_too_large")

    async def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    r = await post(
        node,
        "/chat/completions",
        content=chunks(),
        headers={**auth, "Content-Type": "application/json"},
    )
    assert_error(r, 413, "request_too_large")
    r = await post(node, "/nowhere", json={})
    assert_error(r, 404)
    assert (await node.account(key)).balance_msat == 20_000


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("fake-chat+fail-500", 502, "upstream_error"),
        ("fake-chat+fail-429", 429, "rate_limit_exceeded"),
        ("fake-chat+fail-400", 400, "invalid_request"),
        # 30 s, not 3 s, against the 2 s timeout: a stalled test process must not let the
        # answer arrive before the timeout fires.
        ("fake-chat+slow-30", 504, "upstream_timeout"),
    ],
)
async def test_upstream_failures_charge_nothing_and_refund_x_cashu(
    node: Node, make_token, model: str, status: int, code: str
) -> None:
    key = await new_key(node, await make_token(20))
    for stream in (False, True):
        r = await post(
            node,
            "/chat/completions",
            json={**CHAT, "model": model, "stream": stream},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert_error(r, status, code)
    token = await make_token(20)
    r = await post(
        node, "/chat/completions", json={**CHAT, "model": model}, headers={"X-Cashu": token}
    )
    assert_error(r, status, code)
    assert await make_token.redeem(r.headers["x-cashu"]) == 20
    assert (await node.account(key)).balance_msat == 20_000
    assert await node.operator_msat() == 0


async def test_sdk_sees_openai_errors(node: Node, make_token) -> None:
    client = openai.AsyncOpenAI(base_url=node.base, api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(**CHAT)
    key = await new_key(node, await make_token(20))
    client = openai.AsyncOpenAI(base_url=node.base, api_key=key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(**{**CHAT, "model": "missing"})
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(**{**CHAT, "model": "fake-chat+fail-500"})
    assert (await node.account(key)).balance_msat == 20_000
    usage = expected_usage(CHAT)
    await client.chat.completions.create(**CHAT)
    assert (await node.account(key)).balance_msat == 20_000 - chat_cost(usage)
