"""One balance for HTTP and DMs: NIP-98 requests and Nostr DM jobs draw on the same npub account.

A node serving both channels over one core (real relay, real mint); the peer is a nostr-sdk
client whose key signs its DMs and its NIP-98 headers alike.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nodeprov.core.lightning_funding import LightningFunding
from nodeprov.http import HttpContext, create_app
from nodeprov.http.app import bind, serve
from tests.conftest import TokenMaker
from tests.support.fake_upstream import FakeUpstream, expected_usage
from tests.support.nip98_client import Nip98Client
from tests.support.nostr_client import (  # noqa: F401  (fixtures)
    CHAT_MODEL,
    DmNode,
    SdkClient,
    chat_cost,
    dm_upstream_fixture,
    sdk_client_fixture,
    start_dm_node,
)
from tests.support.services import MintHandle, RelayHandle

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ledger_backend")]


def chat(text: str) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16}


@pytest.fixture
async def node(
    tmp_path: Path, relay: RelayHandle, mint: MintHandle, upstream: FakeUpstream
) -> AsyncIterator[DmNode]:
    started = await start_dm_node(tmp_path, [relay.url], [mint.url], upstream)
    try:
        yield started
        await started.core.assert_books_balance()
    finally:
        await started.close()


@pytest.fixture
async def base(node: DmNode) -> AsyncIterator[str]:
    """The HTTP channel of ``node``: the same core, config and upstreams as its DMs."""
    funding = LightningFunding(node.core.wallet, max_sat=1000, max_open=10)
    ctx = HttpContext(node.config, node.core.payments, node.upstreams, funding=funding)
    sock = bind("127.0.0.1", 0)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(create_app(ctx), sock, stop, node.config.http))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with httpx.AsyncClient() as http:
        for _ in range(200):
            try:
                await http.get(url + "/v1/info")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.01)
    try:
        yield url + "/v1"
    finally:
        stop.set()
        await task


async def test_a_dm_deposit_pays_an_http_request_signed_with_nip98(
    base: str, client: SdkClient, make_token: TokenMaker
) -> None:
    deposit = {"type": "deposit", "id": "d", "cashu": await make_token(20)}
    assert (await client.ask(json.dumps(deposit))).json["balance_msat"] == 20_000
    async with httpx.AsyncClient() as http:
        signer = Nip98Client(http, client.keys)
        assert signer.pubkey == client.pubkey
        assert await signer.balance(base) == 20_000
        body = chat("paid over http")
        r = await signer.post(base + "/chat/completions", body)
        assert r.status_code == 200, r.text
        cost = chat_cost(expected_usage(body))
        assert int(r.headers["X-Cost-Msat"]) == cost
    balance = (await client.ask(json.dumps({"type": "balance", "id": "b"}))).json
    assert balance["balance_msat"] == 20_000 - cost


async def test_a_nip98_topup_pays_a_dm_job(
    node: DmNode, base: str, client: SdkClient, make_token: TokenMaker
) -> None:
    async with httpx.AsyncClient() as http:
        signer = Nip98Client(http, client.keys)
        r = await signer.post(base + "/wallet/topup", {"cashu_token": await make_token(15)})
        assert r.status_code == 200, r.text
        assert r.json()["msats"] == 15_000 and r.json()["balance"] == 15_000
        body = chat("paid over nostr")
        job = {"type": "request", "id": "q", "endpoint": "/v1/chat/completions", "body": body}
        reply = (await client.ask(json.dumps(job))).json
        assert reply["type"] == "response", reply
        cost = chat_cost(expected_usage(body))
        assert reply["cost_msat"] == cost and reply["change"] is None
        assert reply["balance_msat"] == 15_000 - cost
        assert await signer.balance(base) == 15_000 - cost
    rows = await node.core.ledger.db.fetchall(
        "SELECT channel FROM transactions WHERE account_id = ? AND kind = 'charge'",
        ("npub:" + client.pubkey,),
    )
    assert [row[0] for row in rows] == ["nostr"]
