"""nodeprov.upstream against the real fake upstream server (HTTP, SSE, errors, latency)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest
import pytest_asyncio

from nodeprov.config import Upstream
from nodeprov.errors import (
    InvalidRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from nodeprov.upstream import Upstreams, iter_stream
from nodeprov.upstream_http import Response
from tests.support.fake_openai import (
    PNG,
    REPLY_WORDS,
    expected_duration,
    expected_text,
    expected_usage,
)
from tests.support.fake_upstream import FakeUpstream
from tests.support.tcp_proxy import dead_url

KEY = "sk-upstream-secret"
CHAT = "chat/completions"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    """One fake upstream for the module; tests pick behaviour through model-name switches."""
    with FakeUpstream(api_key=KEY) as server:
        yield server


def _upstreams(url: str, *models: str, timeout: str = "30", **kw: Any) -> Upstreams:
    up = Upstream(
        name="fake",
        base_url=url,
        api_key=KEY,
        models=models,
        timeout_seconds=Decimal(timeout),
        **kw,
    )
    return Upstreams([up], lambda _model: True)


@pytest_asyncio.fixture
async def ups(fake: FakeUpstream) -> AsyncIterator[Upstreams]:
    models = ("fake-chat", "fake-embed", "fake-image", "fake-whisper", "fake-tts")
    upstreams = _upstreams(fake.url, *models, aliases={"chat": "fake-chat"})
    async with upstreams:
        yield upstreams


def _chat(model: str, text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def _switch(ups: Upstreams, model: str, body: dict[str, Any], **kw: Any) -> Response:
    """Send ``body`` to a route whose upstream model name carries fake-server switches."""
    route = ups.route("fake-chat")
    route = type(route)(route.upstream, model, route.client)
    return await ups.send(route, "POST", CHAT, json=body, **kw)


# ----------------------------------------------------------------------------- happy paths


async def test_chat_non_stream_uses_upstream_model_and_reports_usage(
    ups: Upstreams, fake: FakeUpstream
) -> None:
    body = _chat("chat", "one two three", max_tokens=5)
    response = await ups.send(ups.route("chat"), "POST", CHAT, json=body)
    doc = response.json()
    assert fake.last_request.json["model"] == "fake-chat"
    assert doc["choices"][0]["message"]["content"] == expected_text(body)
    assert (
        doc["usage"]
        == expected_usage(body)
        == {
            "prompt_tokens": 6,
            "completion_tokens": 5,
            "total_tokens": 11,
        }
    )


async def test_stream_passes_chunks_through_as_they_arrive(
    ups: Upstreams, fake: FakeUpstream
) -> None:
    """The first words reach us while the upstream is stopped mid-stream (pause-3): nothing
    waits for the whole answer. (Proven by order, not by a stopwatch.)"""
    body = _chat("x", stream=True, max_tokens=4, stream_options={"include_usage": True})
    fake.arm_pause()
    chunks: list[bytes] = []
    try:
        response = await _switch(ups, "fake-chat+pause-3", body, stream=True)
        stream = iter_stream(response, "fake")
        try:
            # role chunk, "This", " is": then the upstream waits for us before " a"
            while b'"content":" is"' not in b"".join(chunks):
                chunks.append(await asyncio.wait_for(anext(stream), 30))
            assert fake.last_request.finished_at is None  # the upstream is still at work
            fake.resume_paused()
            chunks.extend([chunk async for chunk in stream])
        finally:
            await response.aclose()
    finally:
        fake.resume_paused()
    assert fake.last_request.finished_at is not None
    text = b"".join(chunks).decode()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"] == expected_usage(body)
    words = [
        json.loads(e)["choices"][0]["delta"].get("content", "")
        for e in events[:-2]
        if json.loads(e)["choices"]
    ]
    assert "".join(words) == expected_text(body)


async def test_stream_without_usage_when_not_requested(ups: Upstreams) -> None:
    response = await _switch(ups, "fake-chat", _chat("x", stream=True), stream=True)
    try:
        text = b"".join([c async for c in iter_stream(response)]).decode()
    finally:
        await response.aclose()
    assert '"usage":{' not in text
    assert text.rstrip().endswith("data: [DONE]")


async def test_other_endpoints(ups: Upstreams, fake: FakeUpstream) -> None:
    emb = {"model": "fake-embed", "input": ["a b", "c"], "dimensions": 4}
    doc = (await ups.send(ups.route("fake-embed"), "POST", "embeddings", json=emb)).json()
    assert [len(d["embedding"]) for d in doc["data"]] == [4, 4]
    assert (
        doc["usage"]
        == expected_usage(emb, "embeddings")
        == {
            "prompt_tokens": 3,
            "total_tokens": 3,
        }
    )

    img = {"model": "fake-image", "prompt": "a cat", "n": 2, "response_format": "b64_json"}
    doc = (await ups.send(ups.route("fake-image"), "POST", "images/generations", json=img)).json()
    assert [base64.b64decode(d["b64_json"]) for d in doc["data"]] == [PNG, PNG]

    audio = bytes(range(256)) * 250  # 64000 bytes = 2 s
    response = await ups.send(
        ups.route("fake-whisper"),
        "POST",
        "audio/transcriptions",
        data={"model": "fake-whisper", "response_format": "verbose_json"},
        files={"file": ("a.wav", audio, "audio/wav")},
    )
    assert response.json()["duration"] == expected_duration(audio) == 2.0
    assert fake.last_request.files["file"] == ("a.wav", audio)

    speech = {"model": "fake-tts", "input": "say this", "voice": "alloy"}
    response = await ups.send(ups.route("fake-tts"), "POST", "audio/speech", json=speech)
    assert response.headers["content-type"] == "audio/mpeg"
    assert response.content.startswith(b"ID3")


# ------------------------------------------------------------------------------- headers


async def test_only_the_upstream_key_reaches_the_upstream(
    ups: Upstreams, fake: FakeUpstream
) -> None:
    client_headers = {
        "Authorization": "Bearer sk-client-own-key",
        "X-Cashu": "cashuBclienttoken",
        "Accept": "application/json",
    }
    await ups.send(ups.route("chat"), "POST", CHAT, json=_chat("chat"), headers=client_headers)
    seen = fake.last_request
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert "x-cashu" not in seen.headers
    assert b"cashuB" not in seen.body and b"sk-client" not in seen.body
    assert not any("sk-client" in v or "cashuB" in v for v in seen.headers.values())


async def test_refused_upstream_key_is_a_502_without_the_upstream_message(
    fake: FakeUpstream,
) -> None:
    up = Upstream(name="fake", base_url=fake.url, api_key="sk-wrong", models=("fake-chat",))
    async with Upstreams([up], lambda _m: True) as ups:
        with pytest.raises(UpstreamError) as info:
            await ups.send(ups.route("fake-chat"), "POST", CHAT, json=_chat("fake-chat"))
    assert info.value.status == 502
    assert "401" in info.value.message and "Incorrect" not in info.value.message


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_500_is_a_502(ups: Upstreams, stream: bool) -> None:
    with pytest.raises(UpstreamError) as info:
        await _switch(ups, "fail-500", _chat("x", stream=stream), stream=stream)
    assert type(info.value) is UpstreamError
    assert info.value.status == 502
    assert "500" in info.value.message and "server had an error" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_429_is_rate_limited_with_retry_hint(ups: Upstreams, stream: bool) -> None:
    with pytest.raises(UpstreamRateLimited) as info:
        await _switch(ups, "fail-429", _chat("x", stream=stream), stream=stream)
    assert info.value.status == 429 and info.value.retryable
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.details["retry_after"] == 1.0
    assert "retry after 1 s" in info.value.message


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_4xx_passes_its_message_on_as_400(ups: Upstreams, stream: bool) -> None:
    with pytest.raises(InvalidRequest) as info:
        await _switch(ups, "fail-422", _chat("x", stream=stream), stream=stream)
    assert info.value.status == 400
    assert info.value.message == "Invalid request (fake upstream, fail-422)"
    body = {"model": "x", "stream": stream}  # no messages: the upstream's own validation
    with pytest.raises(InvalidRequest) as info:
        await _switch(ups, "fake-chat", body, stream=stream)
    assert info.value.message == "Missing required parameter: 'messages'."
    assert info.value.to_openai()["error"]["type"] == "invalid_request_error"


async def test_hanging_upstream_times_out(fake: FakeUpstream) -> None:
    async with _upstreams(fake.url, "hang", "fake-chat+stall-2", timeout="0.5") as ups:
        # No stopwatch: a "hang" upstream never answers, so an UpstreamTimeout is the proof.
        with pytest.raises(UpstreamTimeout) as info:
            await ups.send(ups.route("hang"), "POST", CHAT, json=_chat("hang"))
        assert info.value.status == 504

        route = ups.route("fake-chat+stall-2")
        response = await ups.send(route, "POST", CHAT, json=_chat("x", stream=True), stream=True)
        chunks: list[bytes] = []
        with pytest.raises(UpstreamTimeout):
            async for chunk in iter_stream(response, "fake"):
                chunks.append(chunk)
        await response.aclose()
        assert b'"role":"assistant"' in b"".join(chunks)


async def test_connection_refused_is_unavailable() -> None:
    async with _upstreams(dead_url() + "/v1", "fake-chat") as ups:
        with pytest.raises(UpstreamUnavailable) as info:
            await ups.send(ups.route("fake-chat"), "POST", CHAT, json=_chat("fake-chat"))
    assert info.value.status == 503
    assert "unreachable" in info.value.message


async def test_disconnect_mid_stream_raises_while_iterating(ups: Upstreams) -> None:
    response = await _switch(ups, "fake-chat+drop-3", _chat("x", stream=True), stream=True)
    chunks: list[bytes] = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in iter_stream(response, "fake"):
            chunks.append(chunk)
    await response.aclose()
    assert info.value.status == 502 and "broke the connection" in info.value.message
    assert b'"content":"This"' in b"".join(chunks)


# ----------------------------------------------------------------------------- discovery


async def test_discovery_adds_priced_models_only(fake: FakeUpstream) -> None:
    up = Upstream(name="fake", base_url=fake.url, api_key=KEY, discover_models=True)
    priced = {"fake-chat", "fake-embed", "not-at-upstream"}
    ups = Upstreams([up], priced.__contains__)
    assert ups.models() == []
    async with ups:
        assert ups.models() == ["fake-chat", "fake-embed"]
        assert ups.route("fake-embed").model == "fake-embed"
    assert fake.last_request.path == "/v1/models"


async def test_discovery_failure_is_not_fatal(fake: FakeUpstream) -> None:
    dead = Upstream(name="dead", base_url=dead_url(), discover_models=True, models=("m",))
    live = Upstream(name="fake", base_url=fake.url, api_key=KEY, discover_models=True)
    async with Upstreams([dead, live], lambda _m: True) as ups:
        assert ups.models() == [
            "fake-chat",
            "fake-embed",
            "fake-image",
            "fake-tts",
            "fake-whisper",
            "m",
        ]
        assert ups.route("m").upstream == "dead"


# ------------------------------------------------- the fake speaks the real wire format


def test_openai_sdk_sync_talks_to_the_fake(fake: FakeUpstream) -> None:
    client = openai.OpenAI(base_url=fake.url, api_key=KEY, max_retries=0)
    with client:
        body = _chat("fake-chat", "a b c", max_tokens=3)
        done = client.chat.completions.create(**body)
        assert done.choices[0].message.content == expected_text(body)
        assert done.usage is not None
        assert done.usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == {
            k: v for k, v in expected_usage(body).items() if k != "total_tokens"
        }
        stream = client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected_text(body)
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 9
        emb = client.embeddings.create(model="fake-embed", input="x y")
        assert emb.usage.prompt_tokens == 2
        tr = client.audio.transcriptions.create(
            model="fake-whisper", file=("a.wav", b"\0" * 32000), response_format="verbose_json"
        )
        assert tr.duration == 1.0
        assert client.audio.speech.create(model="fake-tts", input="hi", voice="alloy").content
        assert [m.id for m in client.models.list()][:1] == ["fake-chat"]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(**_chat("fail-429"))
        with pytest.raises(openai.BadRequestError, match="Missing required parameter"):
            client.completions.create(model="fake-chat", prompt=None)


async def test_openai_sdk_async_talks_to_the_fake(fake: FakeUpstream) -> None:
    async with openai.AsyncOpenAI(base_url=fake.url, api_key=KEY, max_retries=0) as client:
        body: dict[str, Any] = {"model": "fake-chat", "prompt": "one two", "max_tokens": 2}
        done = await client.completions.create(model="fake-chat", prompt="one two", max_tokens=2)
        assert done.choices[0].text == expected_text(body)
        assert done.usage is not None and done.usage.total_tokens == 4
        stream = await client.chat.completions.create(
            **_chat("fake-chat+drip-0.01"), stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            " ".join(REPLY_WORDS)
        )
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.prompt_tokens == expected_usage(_chat("x"))["prompt_tokens"]
        cstream = await client.completions.create(
            model="fake-chat", prompt="one two", max_tokens=2, stream=True
        )
        assert "".join([c.choices[0].text async for c in cstream]) == expected_text(body)
        img = await client.images.generate(model="fake-image", prompt="p", n=1)
        assert img.data and img.data[0].url and img.data[0].url.startswith(fake.url)
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(**_chat("fail-500"))


async def test_health_check_per_upstream(ups: Upstreams) -> None:
    assert await ups.check() == {"fake": {"ok": True, "status": 200}}
    async with _upstreams(dead_url() + "/v1", "fake-chat") as down:
        report = await down.check()
    assert report["fake"]["ok"] is False and "ConnectError" in report["fake"]["error"]
