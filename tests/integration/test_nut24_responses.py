"""NUT-24 payment responses: a token that cannot pay gets 400 and is never swapped.

The node decides from what the token itself says (its mint, its unit, its amount less the
mint's input fee for its own proofs) before any swap, so the sender keeps a spendable token:
every test here checks the proofs are still UNSPENT at the mint afterwards and redeems them.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from nodeprov.protocol.cashu_token import parse_token
from nodeprov.protocol.payment_request import decode_payment_request
from tests.conftest import TokenMaker
from tests.support.fake_upstream import FakeUpstream
from tests.support.http_node import (  # noqa: F401  (fixtures)
    Node,
    node_fixture,
    start_node,
    upstream_fixture,
)
from tests.support.nostr_client import MODELS as DM_MODELS
from tests.support.nostr_client import DmNode, SdkClient, start_dm_node
from tests.support.services import MintHandle, RelayHandle

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
FEE_PPK = 100  # the fee_mint fixture's input fee per proof


def max_cost_msat(node: Node, body: dict[str, Any] = CHAT) -> int:
    return node.core.pricer.max_cost(str(body["model"]), body, "chat").total_msat


def input_fee(token: str, ppk: int = FEE_PPK) -> int:
    return -(-len(parse_token(token).proofs) * ppk // 1000)


async def post(node: Node, body: dict[str, Any], token: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(
            node.base + "/chat/completions", json=body, headers={"X-Cashu": token}
        )


async def assert_unspent_and_still_yours(make_token: TokenMaker, token: str, value: int) -> None:
    """The mint says every proof is unspent, and the sender can still redeem all of it."""
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}
    assert await make_token.redeem(token) == value


async def nothing_taken(node: Node) -> None:
    row = await node.core.ledger.db.fetchone(
        "SELECT (SELECT COUNT(*) FROM wallet_ops) + (SELECT COUNT(*) FROM accounts "
        "WHERE id LIKE 'req:%')"
    )
    assert row is not None and row[0] == 0
    assert await node.operator_msat() == 0


@pytest.mark.parametrize("unit", ["sat", "msat"])
async def test_x_cashu_token_below_the_max_cost_is_400_and_stays_unspent(
    node: Node, make_token: TokenMaker, unit: str
) -> None:
    need = max_cost_msat(node)
    amount = math.ceil(need / 1000) - 1 if unit == "sat" else need - 1
    token = await make_token(amount, unit=unit)
    r = await post(node, CHAT, token)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "token_too_small" and error["type"] == "invalid_request_error"
    assert f"Required: {math.ceil(need / 1000)} sats" in error["message"]
    assert "refund" not in error
    # The answer still says what would pay: a NUT-18 request for the whole maximum cost.
    request = decode_payment_request(r.headers["x-cashu"])
    assert request.amount == math.ceil(need / 1000) and request.unit == "sat"
    assert request.mints == node.core.wallet.mints
    await nothing_taken(node)
    await assert_unspent_and_still_yours(make_token, token, amount)


async def test_openai_sdk_gets_bad_request_for_a_small_token_and_keeps_it(
    node: Node, make_token: TokenMaker
) -> None:
    token = await make_token(1)
    client = openai.AsyncOpenAI(base_url=node.base, api_key="unused", max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                **CHAT, stream=stream, extra_headers={"X-Cashu": token}
            )
        assert info.value.status_code == 400 and info.value.code == "token_too_small"
    await nothing_taken(node)
    await assert_unspent_and_still_yours(make_token, token, 1)


async def test_mint_input_fee_is_counted_before_any_swap(
    tmp_path: Path, fee_mint: MintHandle, upstream: FakeUpstream, make_token: TokenMaker
) -> None:
    """A token whose face value covers the maximum cost but whose value after the mint's
    input fee (from its own proofs and the keyset's fee) does not: 400, not swapped."""
    node = await start_node(tmp_path, [fee_mint.url], upstream)
    try:
        required = math.ceil(max_cost_msat(node) / 1000)
        token = await make_token(required, mint=fee_mint)
        assert input_fee(token) >= 1
        r = await post(node, CHAT, token)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "token_too_small"
        assert "input fee" in r.json()["error"]["message"]
        await nothing_taken(node)
        assert set(await make_token.proof_states(token)) == {"UNSPENT"}
        # Enough once the fee is counted: the same check lets it through and the job runs.
        bigger = await make_token(required + 3, mint=fee_mint)
        assert required + 3 - input_fee(bigger) >= required
        r = await post(node, CHAT, bigger)
        assert r.status_code == 200, r.text
        assert set(await make_token.proof_states(bigger)) == {"SPENT"}
        await node.wait_idle()
        await node.core.assert_books_balance()
    finally:
        await node.stop()
    assert await make_token.redeem(token) == required - input_fee(token)


async def test_token_of_a_mint_not_offered_is_400_and_stays_unspent(
    node: Node, make_token: TokenMaker, fee_mint: MintHandle
) -> None:
    token = await make_token(50, mint=fee_mint)
    r = await post(node, CHAT, token)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "untrusted_mint"
    await nothing_taken(node)
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}
    assert await make_token.redeem(token) == 50 - input_fee(token)


async def test_token_of_a_unit_not_offered_is_400_and_stays_unspent(
    tmp_path: Path, mint: MintHandle, upstream: FakeUpstream, make_token: TokenMaker
) -> None:
    node = await start_node(
        tmp_path, [mint.url], upstream, units=("sat",), wallet_options={"units": ("sat",)}
    )
    try:
        token = await make_token(50_000, unit="msat")
        r = await post(node, CHAT, token)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "unsupported_unit"
        await nothing_taken(node)
    finally:
        await node.stop()
    await assert_unspent_and_still_yours(make_token, token, 50_000)


async def test_no_payment_at_all_is_still_402_with_a_payment_request(node: Node) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(node.base + "/chat/completions", json=CHAT)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_balance"
    assert r.headers["x-cashu"].startswith("creqA")


# --- the same rule for a DM job paying with its own token ----------------------------------


@pytest.fixture
async def dm_node(
    tmp_path: Path, relay: RelayHandle, mint: MintHandle
) -> AsyncIterator[tuple[DmNode, SdkClient]]:
    with FakeUpstream(models=DM_MODELS) as upstream:
        node = await start_dm_node(tmp_path, [relay.url], [mint.url], upstream)
        peer = await SdkClient([relay.url], node.keys.public_key).connect()
        try:
            yield node, peer
        finally:
            await peer.close()
            await node.close()


async def test_dm_job_with_a_token_that_cannot_pay_gets_an_error_and_keeps_the_token(
    dm_node: tuple[DmNode, SdkClient], make_token: TokenMaker
) -> None:
    node, peer = dm_node
    body = {**CHAT, "model": "fake-chat"}
    need = node.core.pricer.max_cost("fake-chat", body, "chat").total_msat
    token = await make_token(1)
    msg = {"type": "request", "id": "small", "endpoint": "/v1/chat/completions", "body": body}
    reply = (await peer.ask(json.dumps({**msg, "cashu": token}))).json
    assert reply["type"] == "error" and reply["id"] == "small", reply
    assert reply["error"]["code"] == "token_too_small"
    assert reply["refund"] is None  # nothing was taken, so nothing comes back
    request = decode_payment_request(reply["payment_request"])
    assert request.amount == math.ceil(need / 1000)
    row = await node.core.ledger.db.fetchone("SELECT COUNT(*) FROM wallet_ops")
    assert row is not None and row[0] == 0
    await node.core.assert_books_balance()
    await assert_unspent_and_still_yours(make_token, token, 1)
