"""HTTP jobs through the charge lifecycle: slow readers, early usage, prompts over the context."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.fake_upstream import FakeUpstream, expected_usage
from tests.support.http_node import (  # noqa: F401  (fixtures)
    Node,
    chat_cost,
    node_fixture,
    start_node,
    upstream_fixture,
)
from tests.support.services import MintHandle

LEASE = 30
CHAT = {
    "model": "fake-chat",
    "messages": [{"role": "user", "content": "tell me"}],
    "max_tokens": 16,
}


class Clock:
    def __init__(self) -> None:
        self.t = int(time.time())

    def __call__(self) -> int:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def leased(
    tmp_path: Path, mint: MintHandle, upstream: FakeUpstream, clock: Clock
) -> AsyncIterator[Node]:
    """A node whose ledger runs on ``clock``; jobs renew their lease every 20 ms."""
    node = await start_node(
        tmp_path, [mint.url], upstream, lease_seconds=LEASE, clock=clock, renew_seconds=0.02
    )
    try:
        yield node
        await node.wait_idle()
        await node.core.assert_books_balance()
    finally:
        await node.stop()


async def new_key(node: Node, token: str) -> str:
    async with httpx.AsyncClient() as client:
        r = await client.post(node.base + "/wallet/create", json={"cashu_token": token})
    return str(r.json()["api_key"])


async def renewed_past(node: Node, at: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        row = await node.core.ledger.db.fetchone(
            "SELECT COUNT(*) FROM holds WHERE NOT (state = 'open' AND lease_expires_at > ?)",
            (at,),
        )
        if row is not None and row[0] == 0:
            return
        assert time.monotonic() < deadline, "the stream's job never renewed its lease"
        await asyncio.sleep(0.01)


async def test_slow_stream_reader_past_the_lease_still_pays(
    leased: Node, clock: Clock, make_token: Any
) -> None:
    """The issue's free job: a stream outlives the hold timeout, the client claims its change."""
    node = leased
    token = await make_token(30)
    body = {**CHAT, "model": "fake-chat+pause-2", "stream": True}
    node.upstream.arm_pause()
    try:
        async with (
            httpx.AsyncClient(timeout=60) as http,
            http.stream(
                "POST", node.base + "/chat/completions", json=body, headers={"X-Cashu": token}
            ) as r,
        ):
            assert r.status_code == 200
            lines = r.aiter_lines()
            datas = 0
            while datas < 2:
                datas += (await lines.__anext__()).startswith("data:")
            clock.t += 10 * LEASE  # the reader dawdles far past the lease
            await renewed_past(node, clock())
            assert await node.core.ledger.release_stale_holds() == 0
            early = await http.get(node.base + "/wallet/change", params={"token": token})
            assert early.json().get("tokens", []) == [], early.text
            node.upstream.resume_paused()
            rest = [line async for line in lines]
    finally:
        node.upstream.resume_paused()
    note = json.loads(next(x for x in rest if x.startswith(": nodeprov "))[len(": nodeprov ") :])
    cost = chat_cost(expected_usage(body))
    assert note["cost_msat"] == cost
    assert await make_token.redeem(note["change"]) == 30 - -(-cost // 1000)
    assert await node.operator_msat() == 1000 * -(-cost // 1000)


async def test_stream_that_reported_usage_early_is_charged_for_what_it_produced(
    node: Node, make_token: Any
) -> None:
    key = await new_key(node, await make_token(50))
    body = {**CHAT, "model": "fake-chat+earlyusage+drop-6"}
    client = openai.AsyncOpenAI(base_url=node.base, api_key=key, max_retries=0)
    words = 0
    with pytest.raises(openai.APIError):
        async for chunk in await client.chat.completions.create(**body, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                words += 1
    assert words == 4
    await node.wait_idle()
    reported = expected_usage(body)["prompt_tokens"]
    produced = 1000 + 2 * reported + 5 * words
    assert (await node.account(key)).balance_msat == 50_000 - produced


def too_long(model: str = "fake-chat") -> dict[str, Any]:
    """A prompt of more tokens (9003 by the fake's count) than the model's 8192 context."""
    return {"model": model, "messages": [{"role": "user", "content": "word " * 9_000}]}


@pytest.mark.parametrize("pay", ["api_key", "x_cashu", "none"])
async def test_prompt_larger_than_the_context_is_refused_before_anything_is_held(
    node: Node, make_token: Any, pay: str
) -> None:
    token = await make_token(50)
    headers: dict[str, str] = {}
    key = None
    if pay == "api_key":
        key = await new_key(node, token)
        headers["Authorization"] = f"Bearer {key}"
    elif pay == "x_cashu":
        headers["X-Cashu"] = token
    seen = len(node.upstream.requests)
    async with httpx.AsyncClient() as http:
        r = await http.post(node.base + "/chat/completions", json=too_long(), headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "x-cashu" not in r.headers
    assert len(node.upstream.requests) == seen
    if key is not None:
        account = await node.account(key)
        assert (account.balance_msat, account.reserved_msat) == (50_000, 0)
    else:
        assert await make_token.redeem(token) == 50  # the token was never taken
