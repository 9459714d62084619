"""Every OpenAI endpoint through the node with the openai SDK (sync, async), each payment mode."""

from __future__ import annotations

import asyncio
import io
import math
import struct

import httpx
import openai
import pytest

from tests.support.fake_upstream import FakeUpstream, expected_text, expected_usage
from tests.support.http_node import (  # noqa: F401  (fixtures)
    PRICE,
    UPSTREAM_KEY,
    Node,
    chat_cost,
    node_fixture,
    upstream_fixture,
)

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hello there node"}]}


async def new_key(node: Node, token: str) -> str:
    async with httpx.AsyncClient() as client:
        r = await client.post(node.base + "/wallet/create", json={"cashu_token": token})
    assert r.status_code == 200, r.text
    return str(r.json()["api_key"])


def sync_client(node: Node, key: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base, api_key=key, default_headers=headers, max_retries=0)


def async_client(node: Node, key: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=node.base, api_key=key, default_headers=headers, max_retries=0
    )


def wav(seconds: float) -> bytes:
    """16 kHz 16-bit mono PCM WAV (the fake upstream reports bytes / 32000 s)."""
    data = b"\0" * int(32000 * seconds)
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16) + b"data"
    return header + struct.pack("<I", len(data)) + data


async def test_chat_with_api_key_sync_and_async_exact_balance(
    node: Node, make_token, upstream: FakeUpstream
) -> None:
    key = await new_key(node, await make_token(100))
    raw = await asyncio.to_thread(
        lambda: sync_client(node, key).chat.completions.with_raw_response.create(**CHAT)
    )
    reply = raw.parse()
    usage = expected_usage(CHAT)
    assert reply.choices[0].message.content == expected_text(CHAT)
    assert int(raw.headers["x-cost-msat"]) == chat_cost(usage)
    assert int(raw.headers["x-cost-input-msat"]) == 2 * usage["prompt_tokens"]
    assert int(raw.headers["x-cost-output-msat"]) == 5 * usage["completion_tokens"]
    assert raw.headers["x-request-id"].startswith("req_")
    assert upstream.last_request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    second = await async_client(node, key).chat.completions.create(**CHAT, max_tokens=5)
    assert second.usage is not None and second.usage.completion_tokens == 5
    account = await node.account(key)
    spent = chat_cost(usage) + chat_cost(expected_usage({**CHAT, "max_tokens": 5}))
    assert account.balance_msat == 100_000 - spent
    assert account.total_spent_msat == spent
    assert await node.operator_msat() == spent


async def test_chat_stream_with_api_key_async(node: Node, make_token) -> None:
    key = await new_key(node, await make_token(50))
    stream = await async_client(node, key).chat.completions.create(**CHAT, stream=True)
    parts, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert " ".join(p.strip() for p in parts) == expected_text(CHAT)
    assert usage is not None
    await node.wait_idle()
    account = await node.account(key)
    assert account.balance_msat == 50_000 - chat_cost(expected_usage(CHAT))


async def test_token_as_key_redeems_once_then_debits(node: Node, make_token) -> None:
    token = await make_token(40)
    client = async_client(node, token)
    await client.chat.completions.create(**CHAT)
    await client.completions.create(model="fake-chat", prompt="one two three")
    async with httpx.AsyncClient() as http:
        r = await http.get(
            node.base + "/wallet/balance", headers={"Authorization": f"Bearer {token}"}
        )
    cost = chat_cost(expected_usage(CHAT)) + chat_cost(
        expected_usage({"prompt": "one two three"}, "completions")
    )
    assert r.status_code == 200
    assert r.json()["balance"] == 40_000 - cost


@pytest.mark.parametrize("unit", ["sat", "msat"])
async def test_x_cashu_change_in_header(node: Node, make_token, unit: str) -> None:
    amount = 30 if unit == "sat" else 30_000
    token = await make_token(amount, unit=unit)
    client = sync_client(node, "not-a-key", **{"X-Cashu": token})
    raw = await asyncio.to_thread(lambda: client.chat.completions.with_raw_response.create(**CHAT))
    cost = chat_cost(expected_usage(CHAT))
    assert int(raw.headers["x-cost-msat"]) == cost
    change = raw.headers["x-cashu"]
    paid = math.ceil(cost / 1000) if unit == "sat" else cost
    assert await make_token.redeem(change) == amount - paid
    assert await node.operator_msat() == paid * (1000 if unit == "sat" else 1)
    async with httpx.AsyncClient() as http:
        r = await http.get(node.base + "/wallet/change", params={"token": token})
    assert r.json() == {"tokens": [change]}


async def test_x_cashu_stream_sync_sdk_ignores_the_settlement_and_change_is_claimable(
    node: Node, make_token
) -> None:
    token = await make_token(30)
    client = sync_client(node, "x", **{"X-Cashu": token})

    def run() -> list[str]:
        out = []
        for chunk in client.chat.completions.create(**CHAT, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                out.append(chunk.choices[0].delta.content.strip())
        return out

    assert " ".join(await asyncio.to_thread(run)) == expected_text(CHAT)
    await node.wait_idle()
    async with httpx.AsyncClient() as http:
        r = await http.get(node.base + "/wallet/change", headers={"X-Cashu": token})
    [change] = r.json()["tokens"]
    assert await make_token.redeem(change) == 30 - math.ceil(chat_cost(expected_usage(CHAT)) / 1000)


async def test_x_cashu_stream_raw_carries_cost_and_change_before_done(
    node: Node, make_token
) -> None:
    token = await make_token(30)
    body = {**CHAT, "stream": True}
    async with (
        httpx.AsyncClient() as http,
        http.stream(
            "POST", node.base + "/chat/completions", json=body, headers={"X-Cashu": token}
        ) as r,
    ):
        text = (await r.aread()).decode()
    assert r.status_code == 200
    comment = next(line for line in text.splitlines() if line.startswith(": nodeprov "))
    import json

    info = json.loads(comment[len(": nodeprov ") :])
    assert info["cost_msat"] == chat_cost(expected_usage(CHAT))
    assert text.index(": nodeprov ") < text.index("data: [DONE]") < text.index("event: nodeprov")
    assert await make_token.redeem(info["change"]) == 30 - math.ceil(info["cost_msat"] / 1000)


async def test_completions_embeddings_images_speech_with_key(node: Node, make_token) -> None:
    key = await new_key(node, await make_token(500))
    client = async_client(node, key)
    completion = await client.completions.create(model="fake-chat", prompt="a b c", max_tokens=4)
    assert completion.choices[0].text == expected_text({"max_tokens": 4})
    emb = await client.embeddings.with_raw_response.create(model="fake-embed", input=["x y", "z"])
    assert len(emb.parse().data) == 2
    assert int(emb.headers["x-cost-msat"]) == 1000 + 2 * 3
    images = await client.images.with_raw_response.generate(
        model="fake-image", prompt="cat", n=2, size="1024x1024", quality="hd"
    )
    assert len(images.parse().data) == 2
    assert int(images.headers["x-cost-msat"]) == 1000 + 2 * 80_000
    speech = await client.audio.speech.with_raw_response.create(
        model="fake-tts", voice="alloy", input="hello world"
    )
    assert len(speech.content) > 0
    assert int(speech.headers["x-cost-msat"]) == 1000 + 1000 * len("hello world")
    spent = (
        chat_cost(expected_usage({"prompt": "a b c", "max_tokens": 4}, "completions"))
        + 1006
        + 161_000
        + 12_000
    )
    assert (await node.account(key)).balance_msat == 500_000 - spent


async def test_transcription_and_translation_per_second(node: Node, make_token) -> None:
    key = await new_key(node, await make_token(50))
    audio = wav(1.5)

    def run() -> tuple[str, int, str]:
        client = sync_client(node, key)
        t = client.audio.transcriptions.with_raw_response.create(
            model="fake-whisper", file=("a.wav", io.BytesIO(audio), "audio/wav")
        )
        tr = client.audio.translations.create(
            model="fake-whisper", file=("a.wav", io.BytesIO(audio), "audio/wav")
        )
        return t.parse().text, int(t.headers["x-cost-msat"]), tr.text

    text, cost, translated = await asyncio.to_thread(run)
    assert "transcribe" in text and "translate" in translated
    seconds = math.ceil(len(audio) / 32000)
    assert cost == 1000 + 300 * seconds
    assert (await node.account(key)).balance_msat == 50_000 - 2 * cost
    assert PRICE.audio_per_second is not None


async def test_fee_mint_x_cashu_books_exact(tmp_path, fee_mint, make_token, upstream) -> None:
    from tests.support.http_node import start_node

    fee_node = await start_node(tmp_path, [fee_mint.url], upstream)
    try:
        token = await make_token(64, mint=fee_mint)
        client = async_client(fee_node, "x", **{"X-Cashu": token})
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
        cost = chat_cost(expected_usage(CHAT))
        assert int(raw.headers["x-cost-msat"]) == cost
        change = raw.headers["x-cashu"]
        got = await make_token.redeem(change)
        assert 0 < got < 64 - math.ceil(cost / 1000)
        assert await fee_node.operator_msat() == math.ceil(cost / 1000) * 1000
        key_token = await make_token(100, mint=fee_mint)
        key = await new_key(fee_node, key_token)
        account = await fee_node.account(key)
        assert account.balance_msat % 1000 == 0 and 98_000 <= account.balance_msat < 100_000
        await fee_node.core.assert_books_balance()
    finally:
        await fee_node.stop()


async def test_change_claim_for_a_token_the_node_never_redeemed_says_so(
    node: Node, make_token
) -> None:
    """Found by the soak: a per-request token the node refused (here: already spent) left an
    empty account behind, and claiming its change answered 200 with no tokens, as if the
    node had taken it and owed nothing back. The token is the client's: 401, unknown."""
    token = await make_token(30)
    await make_token.redeem(token)
    async with httpx.AsyncClient() as http:
        paid = await http.post(
            node.base + "/chat/completions", json=CHAT, headers={"X-Cashu": token}
        )
        assert paid.status_code == 400, paid.text
        claim = await http.get(node.base + "/wallet/change", headers={"X-Cashu": token})
    assert claim.status_code == 401, claim.text
    assert "No payment with this token" in claim.json()["error"]["message"]


async def test_a_body_naming_the_upstream_model_goes_upstream_byte_for_byte(
    node: Node, make_token, upstream: FakeUpstream
) -> None:
    """Forwarded unchanged when nothing is changed; encoded again when something is (usage
    asked for on a stream), or when a key is named twice (parsers may read it apart)."""
    key = await new_key(node, await make_token(100))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    url = node.base + "/chat/completions"
    messages = b'"messages": [ {"role": "user", "content": "hi"} ]'
    plain = b'{ "model" : "fake-chat", ' + messages + b"}"
    usage_on = b'{"model":"fake-chat","stream":true,"stream_options":{"include_usage":true},'
    usage_on += messages + b"}"
    usage_off = b'{"model":"fake-chat","stream":true,' + messages + b"}"
    twice = b'{"model":"fake-embed","model":"fake-chat",' + messages + b"}"
    escaped = b'{"mod\\u0065l":"fake-embed","model":"fake-chat",' + messages + b"}"
    limits = b'{"model":"fake-chat","max_tokens":9,"max_tokens":2,' + messages + b"}"
    cases = [(plain, True), (usage_on, True), (usage_off, False)]
    cases += [(twice, False), (escaped, False), (limits, False)]
    async with httpx.AsyncClient(timeout=30) as http:
        for raw, unchanged in cases:
            r = await http.post(url, content=raw, headers=headers)
            assert r.status_code == 200, r.text
            seen = upstream.last_request
            assert (seen.body == raw) is unchanged
            assert seen.json["model"] == "fake-chat"
            assert seen.body.count(b'"model"') == 1
            if seen.json.get("stream"):
                assert seen.json["stream_options"]["include_usage"] is True
    await node.wait_idle()
