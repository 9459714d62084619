"""Edges of the OpenAI SDK surface: ``models.retrieve``, an upstream 429 as the SDK's
RateLimitError, and keep-alive connections that outlive common client pools' idle time."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.http_node import (  # noqa: F401  (fixtures)
    Node,
    node_fixture,
    upstream_fixture,
)

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
LIMITED = {**CHAT, "model": "fake-chat+fail-429"}


async def new_key(node: Node, token: str) -> str:
    async with httpx.AsyncClient() as client:
        r = await client.post(node.base + "/wallet/create", json={"cashu_token": token})
    assert r.status_code == 200, r.text
    return str(r.json()["api_key"])


# --- GET /v1/models/{id} -------------------------------------------------------------------


async def test_models_retrieve_returns_the_listed_model(node: Node) -> None:
    client = openai.AsyncOpenAI(base_url=node.base, api_key="unused", max_retries=0)
    listed = {m.id: m for m in (await client.models.list()).data}
    for name in ("fake-chat", "fake-chat+fail-429", "fake-embed"):
        model = await client.models.retrieve(name)
        assert model.id == name and model.object == "model"
        assert model.model_dump() == listed[name].model_dump()
        extra = model.model_extra or {}
        assert extra["pricing_msat"]["input_per_1m"] > 0 and "sats_pricing" in extra


async def test_models_retrieve_of_an_unknown_id_is_404_in_openai_shape(node: Node) -> None:
    client = openai.AsyncOpenAI(base_url=node.base, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        await client.models.retrieve("no-such-model")
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    async with httpx.AsyncClient() as http:
        for path in ("no-such-model", "org/no-such-model"):
            r = await http.get(f"{node.base}/models/{path}")
            assert r.status_code == 404
            error = r.json()["error"]
            assert error["code"] == "model_not_found"
            assert error["type"] == "invalid_request_error"
            assert path in error["message"]


# --- upstream 429 ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_429_is_429_with_retry_after_and_charges_nothing(
    node: Node, make_token, stream: bool
) -> None:
    key = await new_key(node, await make_token(20))
    body = {**LIMITED, "stream": stream}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(
            node.base + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"  # the upstream's own hint, passed on
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        # A per-request token comes back whole, as on every upstream failure.
        token = await make_token(20)
        r = await http.post(node.base + "/chat/completions", json=body, headers={"X-Cashu": token})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert await make_token.redeem(r.headers["x-cashu"]) == 20
    assert (await node.account(key)).balance_msat == 20_000
    assert await node.operator_msat() == 0


async def test_openai_sdk_raises_rate_limit_error_after_backing_off(
    node: Node, make_token, upstream: FakeUpstream
) -> None:
    key = await new_key(node, await make_token(20))
    before = len(upstream.requests)
    # One retry allowed: the SDK waits the Retry-After and tries again (429 is retryable),
    # then gives up with RateLimitError. No stopwatch: the upstream saw both attempts.
    client = openai.AsyncOpenAI(base_url=node.base, api_key=key, max_retries=1)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(**LIMITED)
    assert info.value.status_code == 429
    assert len(upstream.requests) - before == 2
    sync = openai.OpenAI(base_url=node.base, api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await asyncio.to_thread(lambda: sync.chat.completions.create(**LIMITED))
    assert (await node.account(key)).balance_msat == 20_000


# --- keep-alive ------------------------------------------------------------------------------


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /v1/info HTTP/1.1\r\nHost: node\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return head.split(b"\r\n", 1)[0]


async def test_an_idle_keep_alive_connection_outlives_common_client_pools(node: Node) -> None:
    """A client pool reuses a connection idle for a few seconds (Node's fetch keeps them 4 s,
    httpx 5 s): the server must not close it first, or the reuse fails ("other side closed").
    uvicorn's own default closes after 5 s; the node's default keeps it 75 s."""
    assert node.config.http.keepalive_timeout_seconds == 75
    host, port = node.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        assert await _get(reader, writer) == b"HTTP/1.1 200 OK"
        await asyncio.sleep(6)  # idle past uvicorn's default, short of the node's
        assert await _get(reader, writer) == b"HTTP/1.1 200 OK"
    finally:
        writer.close()
