"""Model -> upstream routing and request building of :mod:`nodeprov.upstream` (no network)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
import pytest_asyncio

from nodeprov.config import Config, ModelPrice, Upstream
from nodeprov.errors import UnknownModel
from nodeprov.upstream import Route, Upstreams
from nodeprov.upstream_http import Timeouts

PRICED = {"gpt-4o-mini", "text-embedding-3-small", "llama-3.1-8b", "whisper-1"}


def _upstreams() -> Upstreams:
    return Upstreams(
        [
            Upstream(
                name="openai",
                base_url="https://api.example.com/v1",
                api_key="sk-upstream",
                models=("gpt-4o-mini", "text-embedding-3-small", "whisper-1", "unpriced"),
                aliases={"gpt-mini": "gpt-4o-mini"},
                timeout_seconds=Decimal("7.5"),
            ),
            Upstream(
                name="local",
                base_url="http://127.0.0.1:9/v1/",
                models=("llama-3.1-8b", "gpt-4o-mini"),
                aliases={"llama": "llama-3.1-8b"},
            ),
        ],
        PRICED.__contains__,
    )


@pytest_asyncio.fixture
async def ups() -> AsyncIterator[Upstreams]:
    upstreams = _upstreams()
    try:
        yield upstreams
    finally:
        await upstreams.aclose()


async def test_routes_listed_models_to_their_upstream(ups: Upstreams) -> None:
    assert ups.route("gpt-4o-mini") == Route("openai", "gpt-4o-mini", ups.route("gpt-mini").client)
    assert ups.route("llama-3.1-8b").upstream == "local"
    assert ups.route("llama-3.1-8b").model == "llama-3.1-8b"


async def test_first_upstream_listing_a_model_wins(ups: Upstreams) -> None:
    assert ups.route("gpt-4o-mini").upstream == "openai"


async def test_alias_resolves_to_the_upstream_model_name(ups: Upstreams) -> None:
    assert ups.route("gpt-mini") == Route("openai", "gpt-4o-mini", ups.route("gpt-4o-mini").client)
    assert ups.route("llama").model == "llama-3.1-8b"
    assert ups.route("llama").upstream == "local"


async def test_unknown_and_unpriced_models_are_not_offered(ups: Upstreams) -> None:
    for name in ("gpt-5", "unpriced", ""):
        with pytest.raises(UnknownModel) as info:
            ups.route(name)
        assert info.value.status == 404
        assert info.value.message == f"model {name!r} is not offered here"


async def test_models_lists_every_routable_public_name(ups: Upstreams) -> None:
    assert ups.models() == [
        "gpt-4o-mini",
        "gpt-mini",
        "llama",
        "llama-3.1-8b",
        "text-embedding-3-small",
        "whisper-1",
    ]


async def test_one_client_per_upstream_with_base_url_key_limits_and_timeouts(
    ups: Upstreams,
) -> None:
    client = ups.route("gpt-4o-mini").client
    assert client is ups.route("text-embedding-3-small").client
    assert client is not ups.route("llama").client
    assert str(client.base_url) == "https://api.example.com/v1/"
    assert str(ups.route("llama").client.base_url) == "http://127.0.0.1:9/v1/"
    assert client.headers["authorization"] == "Bearer sk-upstream"
    assert "authorization" not in ups.route("llama").client.headers  # no key configured
    assert client.timeouts == Timeouts(connect=10.0, read=7.5, write=30.0, pool=5.0)


async def test_build_puts_the_upstream_model_in_the_json_body(ups: Upstreams) -> None:
    body = {"model": "gpt-mini", "messages": [{"role": "user", "content": "hi"}]}
    request = ups.build(ups.route("gpt-mini"), "POST", "chat/completions", json=body)
    assert str(request.url) == "https://api.example.com/v1/chat/completions"
    assert json.loads(request.content) == {**body, "model": "gpt-4o-mini"}
    assert body["model"] == "gpt-mini"  # the caller's body is not changed


async def test_build_puts_the_upstream_model_in_multipart_form_data(ups: Upstreams) -> None:
    route = ups.route("whisper-1")
    request = ups.build(
        route,
        "POST",
        "/audio/transcriptions",
        data={"model": "whisper-1", "response_format": "json"},
        files={"file": ("a.wav", b"RIFF....")},
    )
    payload = request.content
    assert str(request.url) == "https://api.example.com/v1/audio/transcriptions"
    assert b'name="model"\r\n\r\nwhisper-1\r\n' in payload
    assert b'filename="a.wav"' in payload


async def test_build_forwards_only_safe_client_headers(ups: Upstreams) -> None:
    client_headers = {
        "Authorization": "Bearer sk-client-key",
        "X-Cashu": "cashuBclienttoken",
        "Cookie": "session=1",
        "User-Agent": "client-fingerprint/1.0",
        "Content-Type": "text/plain",
        "Accept": "text/event-stream",
        "OpenAI-Beta": "assistants=v2",
    }
    request = ups.build(
        ups.route("gpt-4o-mini"), "POST", "chat/completions", json={}, headers=client_headers
    )
    assert request.headers["authorization"] == "Bearer sk-upstream"
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["openai-beta"] == "assistants=v2"
    assert request.headers["content-type"] == "application/json"
    assert "x-cashu" not in request.headers
    assert "cookie" not in request.headers
    assert "client-fingerprint" not in request.headers["user-agent"]
    assert b"sk-client-key" not in request.content


async def test_build_keeps_the_content_type_of_a_raw_body(ups: Upstreams) -> None:
    request = ups.build(
        ups.route("whisper-1"),
        "POST",
        "audio/transcriptions",
        content=b"--b\r\n...",
        headers={"Content-Type": "multipart/form-data; boundary=b", "X-Cashu": "cashuB"},
    )
    assert request.headers["content-type"] == "multipart/form-data; boundary=b"
    assert "x-cashu" not in request.headers


async def test_from_config_routes_only_priced_models() -> None:
    cfg = Config(
        upstreams=(Upstream(name="a", base_url="http://127.0.0.1:9/v1", models=("m", "x")),),
        models={"m": ModelPrice()},
    )
    ups = Upstreams.from_config(cfg)
    try:
        assert ups.models() == ["m"]
    finally:
        await ups.aclose()
