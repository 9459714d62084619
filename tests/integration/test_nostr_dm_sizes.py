"""DM jobs of every size: extended NIP-44 payloads in, standard payloads out, too large answered.

A sender whose NIP-17 rumor is over ~40 KB seals it with NIP-44's extended length prefix
(nostr-tools does); the node opens it and replies in parts a standard decoder (nostr-sdk) reads.
Anything over ``nostr.max_content_bytes`` gets ``request_too_large``, never silence.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nostr_sdk as ns  # type: ignore[import-untyped]
import pytest

from nodeprov.protocol import nip04, nip44, nip59
from nodeprov.protocol.nostr_event import Event, Keys
from tests.conftest import TokenMaker
from tests.support.fake_upstream import FakeUpstream, expected_usage
from tests.support.nostr_client import (  # noqa: F401  (fixtures)
    CHAT_MODEL,
    LONG_CONTEXT,
    MODELS,
    DmNode,
    SdkClient,
    chat_cost,
    dm_upstream_fixture,
    sdk_client_fixture,
    start_dm_node,
)
from tests.support.services import MintHandle, RelayHandle

pytestmark = pytest.mark.integration

LIMIT = 70_000  # over 65535, so both NIP-44 encodings lie under it


@pytest.fixture
async def node(
    tmp_path: Path, relay: RelayHandle, mint: MintHandle, upstream: FakeUpstream
) -> AsyncIterator[DmNode]:
    prices = dict.fromkeys(MODELS, LONG_CONTEXT)
    started = await start_dm_node(
        tmp_path, [relay.url], [mint.url], upstream, prices, max_content_bytes=LIMIT
    )
    try:
        yield started
        await started.core.assert_books_balance()
    finally:
        await started.close()


def our_keys(client: SdkClient) -> Keys:
    return Keys(client.keys.secret_key().to_hex())


async def send_extended(client: SdkClient, node: DmNode, text: str) -> Event:
    """A NIP-17 DM from the client's key, sealed by our code (extended prefix when needed)."""
    (wrap,) = nip59.build_dm(
        our_keys(client), node.keys.public_key, text, self_copy=False,
        max_plaintext=nip44.MAX_EXTENDED_PLAINTEXT,
    )  # fmt: skip
    await client.publish(ns.Event.from_json(wrap.to_json()))
    return wrap


def seal_plaintext_bytes(wrap: Event, node: DmNode) -> int:
    """Bytes of the rumor JSON inside the seal: over 65535 means the extended prefix."""
    ext = nip44.MAX_EXTENDED_PLAINTEXT
    key = nip44.get_conversation_key(node.keys.secret_key, wrap.pubkey)
    sealed = Event.from_json(nip44.decrypt(wrap.content, key, max_plaintext=ext))
    key = nip44.get_conversation_key(node.keys.secret_key, sealed.pubkey)
    return len(nip44.decrypt(sealed.content, key, max_plaintext=ext).encode())


def job(text: str, token: str | None, ident: str = "big") -> tuple[str, dict[str, Any]]:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    msg: dict[str, Any] = {"type": "request", "id": ident, "endpoint": "/v1/chat/completions",
                           "body": body}  # fmt: skip
    if token is not None:
        msg["cashu"] = token
    return json.dumps(msg), body


async def test_a_job_sealed_with_the_extended_prefix_is_answered_with_change(
    node: DmNode, client: SdkClient, make_token: TokenMaker
) -> None:
    token = await make_token(200)
    message, body = job("word " * 13_000, token)  # 65 KB of prompt, under LIMIT
    wrap = await send_extended(client, node, message)
    assert seal_plaintext_bytes(wrap, node) > nip44.MAX_STANDARD_PLAINTEXT
    reply = (await client.replies(1, within=30.0))[0]
    data = reply.json
    assert data["type"] == "response" and data["id"] == "big", data
    cost = chat_cost(expected_usage(body))
    assert data["cost_msat"] == cost
    assert await make_token.redeem(data["change"]) == 200 - -(-cost // 1000)


@pytest.mark.parametrize("shape", ["json", "plain"])
async def test_a_request_over_the_limit_gets_request_too_large(
    node: DmNode, client: SdkClient, make_token: TokenMaker, shape: str
) -> None:
    token = await make_token(50)
    if shape == "json":
        message, _ = job("x" * (LIMIT + 100), token, ident="huge")
    else:
        message = "x" * (LIMIT + 100) + " " + token
    await send_extended(client, node, message)
    reply = (await client.replies(1, within=30.0))[0]
    if shape == "json":
        data = reply.json
        assert data["type"] == "error" and data["id"] == "huge", data
        assert data["error"]["code"] == "request_too_large"
    else:
        assert "larger than" in reply.text and str(LIMIT) in reply.text, reply.text
    # Nothing was read from the message: the token is still the sender's.
    assert await make_token.redeem(token) == 50


async def test_a_nip04_request_over_the_limit_gets_request_too_large(
    node: DmNode, client: SdkClient
) -> None:
    message, _ = job("y" * (LIMIT + 100), None, ident="n4")
    keys = our_keys(client)
    event = nip04.build_dm(keys, node.keys.public_key, message)
    await client.publish(ns.Event.from_json(event.to_json()))
    data = (await client.replies(1, within=30.0))[0].json
    assert data["type"] == "error" and data["id"] == "n4", data
    assert data["error"]["code"] == "request_too_large"


async def test_a_dm_far_over_the_limit_is_answered_not_dropped(
    node: DmNode, client: SdkClient
) -> None:
    """A 1.2 MB job (a 3.3 MB gift wrap; handed over directly, past the test relay's limit)."""
    message, _ = job("z" * 1_200_000, None, ident="vast")
    (wrap,) = nip59.build_dm(our_keys(client), node.keys.public_key, message, self_copy=False)
    await node.listener.process(wrap.to_dict())
    data = (await client.replies(1, within=30.0))[0].json
    assert data["type"] == "error" and data["id"] == "vast", data
    assert data["error"]["code"] == "request_too_large"
