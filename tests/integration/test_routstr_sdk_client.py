"""Routstr's client SDK, as :mod:`tests.support.routstr_client` reproduces it, against the node.

The node and mint are real; the models are priced like the dev node's ``demo-chat`` (a chat
model: 100 msat a request, 1 msat a prompt token, 2 msat a completion token, 8192-token
context, 2048 output tokens), so ``sats_pricing`` has the shape the SDK's sizing expects.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx
import pytest

from nodeprov.config import ModelPrice, Rate
from tests.support.http_node import (  # noqa: F401  (fixtures)
    Node,
    start_node,
    upstream_fixture,
)
from tests.support.routstr_client import RoutstrStyleClient, required_sats
from tests.support.services import MintHandle

DEMO_PRICE = ModelPrice(
    request=Rate(Fraction(100), "msat"),
    input_per_1m=Rate(Fraction(1_000_000), "msat"),
    output_per_1m=Rate(Fraction(2_000_000), "msat"),
    context_tokens=8192,
    max_output_tokens=2048,
)
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex "


def chat(chars: int = 2, max_tokens: int = 100) -> dict[str, Any]:
    text = (WORDS * (chars // len(WORDS) + 1))[:chars]
    return {
        "model": "fake-chat",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
    }


@pytest.fixture(name="demo_node")
async def demo_node_fixture(tmp_path: Path, mint: MintHandle, upstream: Any) -> AsyncIterator[Node]:
    node = await start_node(tmp_path, [mint.url], upstream, price=DEMO_PRICE)
    try:
        yield node
        await node.wait_idle()
        await node.core.assert_books_balance()
    finally:
        await node.stop()


async def client_for(
    node: Node, http: httpx.AsyncClient, make_token, mode: str
) -> RoutstrStyleClient:
    client = RoutstrStyleClient(http, node.url, make_token, mode)
    await client.load_models()
    return client


def cost_sats(r: httpx.Response) -> int:
    return math.ceil(int(r.headers["x-cost-msat"]) / 1000)


async def test_xcashu_mode_pays_each_request_and_collects_its_change(
    demo_node: Node, make_token
) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        client = await client_for(demo_node, http, make_token, "xcashu")
        plain = await client.chat(chat(200))
        assert plain.ok, plain.body_text
        assert plain.sent_sats - plain.received_sats == cost_sats(plain.response)
        streamed = await client.chat(chat(200), stream=True)
        assert streamed.ok and "data: [DONE]" in streamed.body_text
        assert streamed.received_sats > 0  # the stream's change, from POST /v1/wallet/refund
    # Everything the client paid is either the node's revenue or came back as change.
    spent = client.sent_sats - client.received_sats
    await demo_node.wait_idle()
    revenue = await demo_node.operator_msat()
    assert spent * 1000 == revenue


async def test_xcashu_mode_drops_a_spent_token(demo_node: Node, make_token) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        client = await client_for(demo_node, http, make_token, "xcashu")
        token = await make_token(2)
        await make_token.redeem(token)  # spent elsewhere first
        r = await http.post(
            demo_node.base + "/chat/completions", json=chat(), headers={"X-Cashu": token}
        )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "token_already_spent"
    assert client.received_sats == 0


async def test_apikeys_mode_bootstraps_tops_up_on_402_and_refunds(
    demo_node: Node, make_token
) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        client = await client_for(demo_node, http, make_token, "apikeys")
        first = await client.chat(chat(2))
        assert first.ok, first.body_text
        bootstrap = client.api_key
        assert bootstrap is not None and bootstrap.startswith("cashu")  # info gave it back
        # A bigger request than the key holds: the node's 402 is the one the SDK tops up on.
        second = await client.chat(chat(1500))
        assert second.ok, (second.error, second.body_text)
        assert second.error == {} or second.error["code"] == "insufficient_balance"
        assert second.sent_sats > 0  # the top-up
        info = await client.info()
        left_msat = info["balance"]
        assert left_msat > 0 and info["reserved"] == 0
        refunded, _ = await client.refund_key()
        assert refunded
        client.api_key = bootstrap
        refunded, message = await client.refund_key()
    assert (refunded, message) == (False, "No balance to refund")
    assert client.api_key is None  # the SDK forgets a key with nothing on it


MEASURED_CHARS = (1_000, 2_000, 5_000, 10_000, 20_000)


@pytest.mark.parametrize("chars", MEASURED_CHARS)
async def test_sdk_sized_tokens_against_the_hold(demo_node: Node, make_token, chars: int) -> None:
    """A token the SDK sizes for a prompt of ``chars`` characters and max_tokens 100.

    The SDK sizes the prompt at about 3 characters a token; the node holds one token per
    UTF-8 byte (a bound, never an estimate), so past about 1,600 characters (at these prices)
    the SDK's token is refused and the client gets its value back. A token of the model's
    advertised ``max_cost`` is accepted at every size. The README records this table.
    """
    body = chat(chars)
    async with httpx.AsyncClient(timeout=30) as http:
        client = await client_for(demo_node, http, make_token, "xcashu")
        sdk_sats = math.ceil(required_sats(client.models["fake-chat"], body))
        hold_msat = demo_node.core.pricer.max_cost("fake-chat", body, "chat").total_msat
        outcome = await client.chat(body)
        accepted = outcome.ok
        assert accepted == (sdk_sats * 1000 >= hold_msat), (sdk_sats, hold_msat)
        assert accepted == (chars <= 1_000)  # the outcome the README documents
        if not accepted:
            assert outcome.response.status_code in (400, 402), outcome.body_text
            # The value comes back: the token unspent (NUT-24), else a refund token.
            if outcome.received_sats == 0:
                refund = outcome.response.json()["error"].get("refund")
                assert refund and await make_token.redeem(refund) > 0
        max_cost = int(client.models["fake-chat"]["sats_pricing"]["max_cost"])
        token = await make_token(max_cost)
        r = await http.post(
            demo_node.base + "/chat/completions", json=body, headers={"X-Cashu": token}
        )
        assert r.status_code == 200, r.text
        await make_token.redeem(r.headers["x-cashu"])
