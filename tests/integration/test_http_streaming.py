"""Streams that end badly: upstream drop, no usage, client gone; the documented charge rules."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.support.fake_upstream import expected_text, expected_usage
from tests.support.http_node import Node, chat_cost, node_fixture, upstream_fixture  # noqa: F401  (fixtures)

CHAT = {
    "model": "fake-chat",
    "messages": [{"role": "user", "content": "tell me"}],
    "max_tokens": 16,
}


async def new_key(node: Node, token: str) -> str:
    async with httpx.AsyncClient() as client:
        r = await client.post(node.base + "/wallet/create", json={"cashu_token": token})
    return str(r.json()["api_key"])


def produced(node: Node, body: dict, chunks: int) -> int:
    """The disconnect rule: request fee + prompt bound + one token per output chunk seen."""
    bounds = node.core.pricer.token_bounds(body["model"], body, "chat")
    return 1000 + 2 * bounds.prompt_tokens + 5 * chunks


async def test_upstream_drop_mid_stream_charges_what_was_produced(node: Node, make_token) -> None:
    key = await new_key(node, await make_token(50))
    body = {**CHAT, "model": "fake-chat+drop-4"}
    client = openai.AsyncOpenAI(base_url=node.base, api_key=key, max_retries=0)
    seen = []
    with pytest.raises(openai.APIError):
        async for chunk in await client.chat.completions.create(**body, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append(chunk)
    assert len(seen) == 3
    await node.wait_idle()
    assert (await node.account(key)).balance_msat == 50_000 - produced(node, body, 3)


async def test_stream_without_usage_settles_at_the_hold(node: Node, make_token) -> None:
    key = await new_key(node, await make_token(50))
    body = {**CHAT, "model": "fake-chat+nousage"}
    client = openai.AsyncOpenAI(base_url=node.base, api_key=key, max_retries=0)
    async for _ in await client.chat.completions.create(**body, stream=True):
        pass
    await node.wait_idle()
    hold = node.core.pricer.max_cost(body["model"], body, "chat").total_msat
    assert (await node.account(key)).balance_msat == 50_000 - hold


@pytest.mark.parametrize(("model", "chunks"), [("fake-chat+stall-3", 2), ("fake-chat+stall-1", 0)])
async def test_client_disconnect_mid_stream(
    node: Node, make_token, model: str, chunks: int
) -> None:
    key = await new_key(node, await make_token(50))
    body = {**CHAT, "model": model, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient() as http,
        http.stream("POST", node.base + "/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        lines = r.aiter_lines()
        datas = 0
        while datas < chunks + 1:
            if (await lines.__anext__()).startswith("data:"):
                datas += 1
        # leaving the block closes the connection mid-stream
    await node.wait_idle()
    expected = produced(node, body, chunks) if chunks else 0
    assert (await node.account(key)).balance_msat == 50_000 - expected


async def test_client_disconnect_with_x_cashu_keeps_change_claimable(
    node: Node, make_token
) -> None:
    token = await make_token(30)
    body = {**CHAT, "model": "fake-chat+stall-3", "stream": True}
    async with (
        httpx.AsyncClient() as http,
        http.stream(
            "POST", node.base + "/chat/completions", json=body, headers={"X-Cashu": token}
        ) as r,
    ):
        datas = 0
        async for line in r.aiter_lines():
            datas += line.startswith("data:")
            if datas == 3:
                break
    await node.wait_idle()
    async with httpx.AsyncClient() as http:
        claimed = (await http.get(node.base + "/wallet/change", params={"token": token})).json()
    assert "tokens" in claimed, claimed
    [change] = claimed["tokens"]
    cost = produced(node, body, 2)
    assert await make_token.redeem(change) == 30 - -(-cost // 1000)


async def test_chunks_arrive_as_they_are_produced(node: Node, make_token) -> None:
    """A word reaches the client while the upstream is stopped mid-stream (pause-2), so the
    node passes chunks through instead of buffering. Proven by order, not a stopwatch."""
    key = await new_key(node, await make_token(50))
    body = {**CHAT, "model": "fake-chat+pause-2", "stream": True}
    upstream = node.upstream
    words: list[str] = []

    def add(line: str) -> None:
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            choices = json.loads(line[5:]).get("choices")  # the last event is the settlement
            if choices and choices[0]["delta"].get("content"):
                words.append(choices[0]["delta"]["content"])

    upstream.arm_pause()
    try:
        async with (
            httpx.AsyncClient() as http,
            http.stream(
                "POST",
                node.base + "/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            ) as r,
        ):
            lines = r.aiter_lines()
            while not words:  # the role chunk, then one word; the second waits for us
                add(await asyncio.wait_for(anext(lines), 30))
            assert upstream.last_request.finished_at is None  # the upstream is still at work
            upstream.resume_paused()
            async for line in lines:
                add(line)
    finally:
        upstream.resume_paused()
    assert "".join(words) == expected_text(body)
    await node.wait_idle()
    assert (await node.account(key)).balance_msat == 50_000 - chat_cost(expected_usage(body))


def test_settlement_note_is_json() -> None:
    note = {"cost_msat": 1, "cost_input_msat": 0, "cost_output_msat": 0, "change": None}
    assert json.loads(json.dumps(note)) == note
