"""DM jobs from nostr-tools (JavaScript): a second Nostr implementation nobody here wrote.

The peer (tests/support/nostr_tools/peer.mjs, driven by tests/support/nostr_tools_peer.py)
encrypts, signs, publishes and decrypts with nostr-tools; the node runs with its default
``max_content_bytes`` against the real relay and mint. nostr-tools seals a NIP-17 rumor over
~40 KB with NIP-44's extended length prefix, which the node must open; its replies use the
standard encoding, in parts when long. Change goes back into the nutshell wallet.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TokenMaker
from tests.support.fake_upstream import FakeUpstream, expected_usage
from tests.support.nostr_client import (
    CHAT_MODEL,
    LONG_CONTEXT,
    MODELS,
    DmNode,
    chat_cost,
    dm_upstream_fixture,  # noqa: F401  (fixtures)
    start_dm_node,
)
from tests.support.nostr_tools_peer import ToolsPeer, Unavailable, ensure_installed, node_required
from tests.support.services import MintHandle, RelayHandle, start_relay

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("node_bin")]


def sat_change(paid_sat: int, cost_msat: int) -> int:
    return paid_sat - -(-cost_msat // 1000)


def request(endpoint: str, body: dict[str, Any], ident: str, cashu: str | None) -> str:
    msg: dict[str, Any] = {"type": "request", "id": ident, "endpoint": endpoint, "body": body}
    if cashu is not None:
        msg["cashu"] = cashu
    return json.dumps(msg)


@pytest.fixture(scope="module")
def node_bin() -> str:
    try:
        return ensure_installed()
    except Unavailable as exc:
        if node_required():
            pytest.fail(f"the nostr-tools peer must run here: {exc}")
        pytest.skip(f"nostr-tools peer unavailable: {exc}")


@pytest.fixture(scope="module")
def big_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayHandle]:
    """A relay that takes the ~440 KB gift wrap of a 200 KB job (the shared one stops at 256 KB)."""
    with start_relay(workdir=tmp_path_factory.mktemp("big-relay"), max_event_size=2**20) as r:
        yield r


@pytest.fixture
async def node(
    tmp_path: Path, big_relay: RelayHandle, mint: MintHandle, upstream: FakeUpstream
) -> AsyncIterator[DmNode]:
    prices = dict.fromkeys(MODELS, LONG_CONTEXT)
    started = await start_dm_node(tmp_path, [big_relay.url], [mint.url], upstream, prices)
    try:
        yield started
        await started.core.assert_books_balance()
    finally:
        await started.close()


@pytest.fixture
async def peer(node_bin: str, node: DmNode, big_relay: RelayHandle) -> AsyncIterator[ToolsPeer]:
    started = await ToolsPeer.start(node_bin, big_relay.url, node.keys.public_key)
    try:
        yield started
    finally:
        await started.close()


async def test_nostr_tools_nip17_job_of_50_kb_is_answered_with_change(
    node: DmNode, peer: ToolsPeer, make_token: TokenMaker
) -> None:
    token = await make_token(200)
    body = {"model": CHAT_MODEL, "max_tokens": 8,
            "messages": [{"role": "user", "content": "fifty " * 8_500}]}  # fmt: skip
    message = request("/v1/chat/completions", body, "j50", token)
    assert len(message) > 50_000
    reply = await peer.ask(message)
    assert reply.nip == "nip17"
    data = reply.json
    assert data["type"] == "response" and data["id"] == "j50", data
    assert data["body"]["choices"][0]["message"]["content"]
    cost = chat_cost(expected_usage(body))
    assert data["cost_msat"] == cost
    assert await make_token.redeem(data["change"]) == sat_change(200, cost)


async def test_nostr_tools_nip17_job_of_200_kb_gets_its_reply_in_parts(
    node: DmNode, peer: ToolsPeer, make_token: TokenMaker
) -> None:
    token = await make_token(500)
    inputs = [f"input {i} " + "lorem ipsum " * 14 for i in range(1_100)]
    body = {"model": "fake-embed", "input": inputs, "dimensions": 16}
    message = request("/v1/embeddings", body, "j200", token)
    assert len(message) > 200_000
    reply = await peer.ask(message)
    assert reply.nip == "nip17"
    assert len(reply.raw) > 1  # the reply came in parts, each a standard-size DM
    data = reply.json
    assert data["type"] == "response" and data["id"] == "j200", data
    assert len(data["body"]["data"]) == len(inputs)
    usage = expected_usage(body, "embeddings")
    cost = 1000 + 2 * usage["prompt_tokens"]
    assert data["cost_msat"] == cost
    assert await make_token.redeem(data["change"]) == sat_change(500, cost)


async def test_nostr_tools_nip04_job_is_answered_with_change(
    node: DmNode, peer: ToolsPeer, make_token: TokenMaker
) -> None:
    token = await make_token(100)
    body = {"model": CHAT_MODEL, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hello over nip04"}]}  # fmt: skip
    reply = await peer.ask(request("/v1/chat/completions", body, "n4", token), "nip04")
    assert reply.nip == "nip04"
    data = reply.json
    assert data["type"] == "response" and data["id"] == "n4", data
    cost = chat_cost(expected_usage(body))
    assert data["cost_msat"] == cost
    assert await make_token.redeem(data["change"]) == sat_change(100, cost)


async def test_nostr_tools_plain_text_chat_with_pasted_token(
    node: DmNode, peer: ToolsPeer, make_token: TokenMaker
) -> None:
    token = await make_token(40)
    reply = await peer.ask(f"Hello node, here is money {token}")
    assert reply.nip == "nip17"
    assert "cost" in reply.text and "balance" in reply.text, reply.text
    body = {"model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "Hello node, here is money"}]}  # fmt: skip
    left = 40_000 - chat_cost(expected_usage(body))
    out = (await peer.ask(json.dumps({"type": "withdraw", "id": "w"}))).json
    assert out["type"] == "withdrawal", out
    assert out["amount_msat"] == left // 1000 * 1000
    assert await make_token.redeem(out["cashu"]) == left // 1000
