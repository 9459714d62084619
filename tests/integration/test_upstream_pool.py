"""``[[upstreams]] max_connections`` and ``pool_wait_seconds`` through the node.

A request that finds every connection to the upstream busy waits for one; past the wait it
is a 503 ``upstream_busy`` with ``Retry-After`` and charges nothing. Busy connections are
streams stopped mid-answer by the fake upstream's ``pause-K`` switch, so no timing decides.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from tests.support.fake_upstream import FakeUpstream, expected_usage
from tests.support.http_node import Node, chat_cost, start_node, upstream_fixture  # noqa: F401  (fixture)
from tests.support.waiting import until

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "tell me"}]}
PAUSED = {**CHAT, "model": "fake-chat+pause-2", "stream": True}


@asynccontextmanager
async def node_with_pool(
    tmp_path: Path, mint: Any, upstream: FakeUpstream, **options: Any
) -> AsyncIterator[Node]:
    node = await start_node(tmp_path, [mint.url], upstream, upstream_options=options)
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


@asynccontextmanager
async def paused_stream(
    http: httpx.AsyncClient, node: Node, key: str
) -> AsyncIterator[AsyncIterator[str]]:
    """A stream that has its first word and then holds its upstream connection (paused)."""
    async with http.stream(
        "POST",
        node.base + "/chat/completions",
        json=PAUSED,
        headers={"Authorization": f"Bearer {key}"},
    ) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()
        while '"content"' not in await asyncio.wait_for(anext(lines), 30):
            pass
        yield lines


async def test_a_request_past_max_connections_waits_then_gets_503_busy_and_pays_nothing(
    tmp_path: Path, mint: Any, upstream: FakeUpstream, make_token: Any
) -> None:
    async with node_with_pool(
        tmp_path, mint, upstream, max_connections=2, pool_wait_seconds=Decimal("0.05")
    ) as node:
        key = await new_key(node, await make_token(50))
        headers = {"Authorization": f"Bearer {key}"}
        upstream.arm_pause()
        try:
            async with AsyncExitStack() as streams, httpx.AsyncClient(timeout=60) as http:
                held = [
                    await streams.enter_async_context(paused_stream(http, node, key))
                    for _ in range(2)
                ]
                for body in ({**CHAT, "stream": True}, CHAT):
                    busy = await http.post(
                        node.base + "/chat/completions", json=body, headers=headers
                    )
                    assert busy.status_code == 503, busy.text
                    assert busy.headers["retry-after"] == "1"
                    error = busy.json()["error"]
                    assert error["code"] == "upstream_busy"
                    assert "busy" in error["message"]
                upstream.resume_paused()
                for lines in held:
                    assert "data: [DONE]" in [line async for line in lines]
        finally:
            upstream.resume_paused()
        await node.wait_idle()
        # The two streams were charged (they produced output); the refused requests nothing.
        account = await node.account(key)
        assert account.balance_msat == 50_000 - 2 * chat_cost(expected_usage(PAUSED))


async def test_a_request_that_gets_a_connection_within_the_wait_succeeds(
    tmp_path: Path, mint: Any, upstream: FakeUpstream, make_token: Any
) -> None:
    async with node_with_pool(
        tmp_path, mint, upstream, max_connections=1, pool_wait_seconds=Decimal(120)
    ) as node:
        key = await new_key(node, await make_token(50))
        client = node._upstreams.route("fake-chat").client
        upstream.arm_pause()
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                async with paused_stream(http, node, key) as lines:
                    waiting = asyncio.create_task(
                        http.post(
                            node.base + "/chat/completions",
                            json=CHAT,
                            headers={"Authorization": f"Bearer {key}"},
                        )
                    )
                    await until(lambda: client.waiting == 1, what="the request waits for the pool")
                    upstream.resume_paused()
                    assert "data: [DONE]" in [line async for line in lines]
                answer = await waiting
        finally:
            upstream.resume_paused()
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"] == expected_usage(CHAT)
        assert client.connections == 1  # the stream's connection served the waiting request
        await node.wait_idle()
        expected = chat_cost(expected_usage(PAUSED)) + chat_cost(expected_usage(CHAT))
        assert (await node.account(key)).balance_msat == 50_000 - expected
