"""Misbehaving providers (small real HTTP servers) and ``discover`` over the real relay.

Each bad provider takes the client's token and then lies: charges more than its prices,
returns no change, or returns a spent change token. The proxy reports each clearly and
the client wallet's balance stays exactly what it holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nodeprov.client.discover import discover
from nodeprov.client.pay import PayingClient
from nodeprov.client.provider import fetch_provider
from nodeprov.client.wallet import ClientWallet
from nodeprov.http.app import bind, serve
from nodeprov.nostr.relay_pool import RelayPool
from nodeprov.protocol.announcements import ModelListing, NodeListing, listing_event
from nodeprov.protocol.nostr_event import Keys, sign_event
from tests.integration.test_client_proxy import proxy_for
from tests.support.http_node import Node, node_fixture, upstream_fixture  # noqa: F401
from tests.support.services import MintHandle, RelayHandle
from tests.support.tcp_proxy import dead_url

pytestmark = pytest.mark.integration

PRICES = {"request": 1000, "input_per_1m": 2_000_000, "output_per_1m": 5_000_000}
CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
REPLY = {
    "id": "x", "object": "chat.completion", "created": 0, "model": "fake-chat",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
}  # fmt: skip


class BadProvider:
    """A provider that lists ``PRICES`` and misbehaves as ``mode`` says."""

    def __init__(self, mint_url: str, mode: str, prices: dict[str, int] | None = None) -> None:
        self.mint_url, self.mode, self.prices = mint_url, mode, prices or PRICES
        self.tokens: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.spent_change: str | None = None
        self.url = ""

    def app(self) -> Starlette:
        async def info(request: Request) -> Response:
            return JSONResponse({"name": f"bad-{self.mode}", "mints": [self.mint_url],
                                 "units": ["sat", "msat"], "npub": None, "relays": []})  # fmt: skip

        async def models(request: Request) -> Response:
            entry = {"id": "fake-chat", "pricing_msat": self.prices, "context_length": 8192,
                     "max_output_tokens": 1024}  # fmt: skip
            return JSONResponse({"object": "list", "data": [entry]})

        async def chat(request: Request) -> Response:
            self.headers.append(dict(request.headers))
            self.tokens.append(request.headers["x-cashu"])
            headers = {"x-cost-msat": "1050"}
            if self.mode == "overcharge":
                headers["x-cost-msat"] = "900000"
            if self.mode == "spent" and self.spent_change:
                headers["x-cashu"] = self.spent_change
            return JSONResponse(REPLY, headers=headers)

        async def change(request: Request) -> Response:
            return JSONResponse({"tokens": []})

        return Starlette(routes=[
            Route("/v1/info", info), Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/wallet/change", change),
        ])  # fmt: skip


@asynccontextmanager
async def serving(bad: BadProvider) -> AsyncIterator[BadProvider]:
    sock = bind("127.0.0.1", 0)
    bad.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop = asyncio.Event()
    task = asyncio.create_task(serve(bad.app(), sock, stop))
    await asyncio.sleep(0.1)
    try:
        yield bad
    finally:
        stop.set()
        await task


@asynccontextmanager
async def proxied(
    tmp_path: Path, url: str, funds: str
) -> AsyncIterator[tuple[ClientWallet, PayingClient, openai.AsyncOpenAI]]:
    wallet = await ClientWallet.open(tmp_path / "client")
    await wallet.receive_token(funds)
    async with httpx.AsyncClient(timeout=10) as http:
        payer = PayingClient(wallet, await fetch_provider(url, http), http)
        async with proxy_for(payer) as base:
            yield wallet, payer, openai.AsyncOpenAI(base_url=base, api_key="sk-mine", max_retries=0)
    assert await wallet.audit_ok()
    await wallet.close()


def quote() -> int:
    return 1000 + 2 * (8 * 2 + len("user") + len("hi") + len("role") + len("content")) + 5 * 4


async def test_overcharging_provider_is_reported_and_refused(
    tmp_path: Path, mint: MintHandle, make_token
) -> None:
    async with (
        serving(BadProvider(mint.url, "overcharge")) as bad,
        proxied(tmp_path, bad.url, await make_token(50_000, unit="msat")) as (wallet, payer, sdk),
    ):
        raw = await sdk.chat.completions.with_raw_response.create(**CHAT)
        assert "more than the quoted maximum" in raw.headers["x-nodeprov-warning"]
        paid = int(raw.headers["x-nodeprov-paid-msat"])
        assert paid == payer.quote("/chat/completions", CHAT) == quote()
        assert await wallet.balance_msat() == 50_000 - paid  # never more than the quote
        with pytest.raises(openai.APIStatusError, match="overcharged") as refused:
            await sdk.chat.completions.create(**CHAT)
        assert refused.value.status_code == 402
        assert await wallet.balance_msat() == 50_000 - paid and len(bad.tokens) == 1
        assert "sk-mine" not in str(bad.headers) and "authorization" not in bad.headers[0]


async def test_provider_without_change_is_reported(
    tmp_path: Path, mint: MintHandle, make_token
) -> None:
    async with (
        serving(BadProvider(mint.url, "nochange")) as bad,
        proxied(tmp_path, bad.url, await make_token(50_000, unit="msat")) as (wallet, payer, sdk),
    ):
        raw = await sdk.chat.completions.with_raw_response.create(**CHAT)
        owed = quote() - 1050
        assert f"returned no change ({owed} msat owed)" in raw.headers["x-nodeprov-warning"]
        assert await wallet.balance_msat() == 50_000 - quote()
        assert payer.problems and payer.blocked is None


async def test_spent_change_token_is_reported(tmp_path: Path, mint: MintHandle, make_token) -> None:
    spent = await make_token(300, unit="msat")
    await make_token.redeem(spent)
    bad = BadProvider(mint.url, "spent")
    bad.spent_change = spent
    async with (
        serving(bad),
        proxied(tmp_path, bad.url, await make_token(50_000, unit="msat")) as (wallet, _payer, sdk),
    ):
        raw = await sdk.chat.completions.with_raw_response.create(**CHAT)
        assert "change token is spent" in raw.headers["x-nodeprov-warning"]
        assert "300 msat lost" in raw.headers["x-nodeprov-warning"]
        assert await wallet.balance_msat() == 50_000 - quote()


async def test_provider_going_down_keeps_the_token(
    tmp_path: Path, mint: MintHandle, make_token
) -> None:
    bad = BadProvider(mint.url, "nochange")
    async with serving(bad):
        wallet = await ClientWallet.open(tmp_path / "client")
        await wallet.receive_token(await make_token(10_000, unit="msat"))
        http = httpx.AsyncClient(timeout=5)
        payer = PayingClient(wallet, await fetch_provider(bad.url, http), http)
    async with proxy_for(payer) as base:
        sdk = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError, match="unreachable") as down:
            await sdk.chat.completions.create(**CHAT)
        assert down.value.status_code == 503
    assert await wallet.balance_msat() == 10_000 and await wallet.audit_ok()
    await http.aclose()
    await wallet.close()


# ------------------------------------------------------------------------------ discover


async def announce(relay_url: str, listing: NodeListing) -> Keys:
    keys = Keys.generate()
    event = sign_event(listing_event(listing, keys.npub), keys.secret_key, int(time.time()))
    async with RelayPool([relay_url]) as pool:
        assert (await pool.publish(event.to_dict(), timeout=10)).ok
    return keys


def listing_of(name: str, url: str, mint: str, prices: dict[str, int]) -> NodeListing:
    model = ModelListing("fake-chat", prices, {"context_length": 8192})
    return NodeListing(name=name, about="", version="1", http_url=url, mints=(mint,),
                       units=("sat", "msat"), models=(model,))  # fmt: skip


async def test_discover_finds_the_node_and_a_second_provider_cheapest_first(
    node: Node, relay: RelayHandle, mint: MintHandle
) -> None:
    cheap = {**PRICES, "request": 10}
    async with serving(BadProvider(mint.url, "honest", cheap)) as second:
        node_keys = await announce(relay.url, listing_of("the-node", node.url, mint.url, PRICES))
        # Announced cheaper than it really is (its /v1/models says PRICES): flagged.
        liar_keys = await announce(relay.url, listing_of("liar", second.url, mint.url, {
            **PRICES, "request": 1}))  # fmt: skip
        gone = await announce(relay.url, listing_of("gone", dead_url(), mint.url, cheap))
        found = await discover([relay.url], model="fake-chat", wait=5)
    mine = {f.npub: f for f in found}
    ours = [f.npub for f in found if f.npub in (node_keys.npub, liar_keys.npub, gone.npub)]
    assert ours == [liar_keys.npub, node_keys.npub, gone.npub]  # cheapest first, down last
    live = mine[node_keys.npub].models["fake-chat"]
    assert mine[node_keys.npub].reachable and {k: live[k] for k in PRICES} == PRICES
    liar = mine[liar_keys.npub]
    assert liar.warnings and "above the announcement" in liar.warnings[0]
    assert not mine[gone.npub].reachable and "unreachable" in (mine[gone.npub].error or "")
    as_json: dict[str, Any] = mine[node_keys.npub].to_json("fake-chat")
    assert as_json["reference_msat"] == 1000 + (2 + 5) * 1000  # 1000 tokens each way
