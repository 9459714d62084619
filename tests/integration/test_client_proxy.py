"""The local proxy against the node's real HTTP app, the real mint and the official openai SDK."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType

import httpx
import openai
import pytest

from nodeprov.client.pay import PayingClient
from nodeprov.client.provider import Provider, fetch_provider
from nodeprov.client.proxy import run_proxy
from nodeprov.client.wallet import ClientWallet
from nodeprov.config import Rate
from tests.support.fake_upstream import expected_text, expected_usage
from tests.support.http_node import (  # noqa: F401  (fixtures)
    Node,
    chat_cost,
    node_fixture,
    upstream_fixture,
)
from tests.support.services import MintHandle

pytestmark = pytest.mark.integration

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hello proxy"}]}


@asynccontextmanager
async def proxy_for(payer: PayingClient) -> AsyncIterator[str]:
    """Run the proxy on a free port; yields its ``/v1`` base URL."""
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(run_proxy(payer, 0, ready=ready, stop=stop))
    port = await asyncio.wait_for(ready, 30)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop.set()
        await task


@asynccontextmanager
async def client_setup(
    tmp_path: Path, node_url: str, provider: Provider | None = None
) -> AsyncIterator[tuple[ClientWallet, PayingClient, str]]:
    wallet = await ClientWallet.open(tmp_path / "client")
    async with httpx.AsyncClient(timeout=20) as http:
        provider = provider or await fetch_provider(node_url, http)
        payer = PayingClient(wallet, provider, http)
        try:
            async with proxy_for(payer) as base:
                yield wallet, payer, base
        finally:
            assert await wallet.audit_ok()
            await wallet.close()


async def test_openai_sdk_through_proxy_pays_exact_costs(
    tmp_path: Path, node: Node, make_token
) -> None:
    async with client_setup(tmp_path, node.url) as (wallet, payer, base):
        await wallet.receive_token(await make_token(200_000, unit="msat"))
        start = await wallet.balance_msat()
        assert start == 200_000
        sdk = openai.AsyncOpenAI(base_url=base, api_key="sk-local-never-forwarded", max_retries=0)
        reply = await sdk.chat.completions.create(**CHAT, max_tokens=5)
        assert reply.choices[0].message.content == expected_text({**CHAT, "max_tokens": 5})
        cost1 = chat_cost(expected_usage({**CHAT, "max_tokens": 5}))
        assert await wallet.balance_msat() == start - cost1

        body = {**CHAT, "max_tokens": 8}
        words = []
        stream = await sdk.chat.completions.create(**body, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                words.append(chunk.choices[0].delta.content)
        assert "".join(words).split() == expected_text(body).split()
        cost2 = chat_cost(expected_usage(body))
        assert await wallet.balance_msat() == start - cost1 - cost2
        assert not payer.problems and payer.blocked is None
        status = (await httpx.AsyncClient().get(base.removesuffix("/v1") + "/proxy/status")).json()
        assert status["balance_msat"] == start - cost1 - cost2
    assert "sk-local" not in str(node.upstream.last_request.headers)


async def test_sync_sdk_and_sat_tokens_round_up_once(
    tmp_path: Path, node: Node, make_token
) -> None:
    async with client_setup(tmp_path, node.url) as (wallet, payer, base):
        await wallet.receive_token(await make_token(300, unit="sat"))
        sdk = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        body = {**CHAT, "max_tokens": 3}
        await asyncio.to_thread(lambda: sdk.chat.completions.create(**body))
        cost = chat_cost(expected_usage(body))
        assert await wallet.balance_msat() == 300_000 - -(-cost // 1000) * 1000
        assert not payer.problems


async def test_fund_from_mint_quote_and_402_paid_as_asked(
    tmp_path: Path, node: Node, mint: MintHandle
) -> None:
    async with httpx.AsyncClient() as http:
        real = await fetch_provider(node.url, http)
    # Without listed prices the proxy cannot quote: the node's 402 payment request is paid.
    blind = dataclasses.replace(real, prices=MappingProxyType({}), listed=MappingProxyType({}))
    async with client_setup(tmp_path, node.url, blind) as (wallet, payer, base):
        received = await wallet.fund_amount(mint.url, 50, "sat", wait=10)
        assert received.credited_msat == 50_000 == await wallet.balance_msat()
        sdk = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        body = {**CHAT, "max_tokens": 4}
        await sdk.chat.completions.create(**body)
        cost = chat_cost(expected_usage(body))
        assert await wallet.balance_msat() == 50_000 - -(-cost // 1000) * 1000
        assert not payer.problems


async def test_token_the_node_finds_too_small_comes_back_to_the_wallet(
    tmp_path: Path, node: Node, make_token
) -> None:
    """Prices listed lower than the node charges: the node answers 400 with a payment request
    and never swaps the token (NUT-24), the wallet takes its own token back, and the request
    that asks more than the listed prices allow is refused as an overcharge."""
    async with httpx.AsyncClient() as http:
        real = await fetch_provider(node.url, http)
    cheap = dataclasses.replace(real.prices["fake-chat"], request=Rate(Fraction(1), "msat"))
    low = dataclasses.replace(real, prices=MappingProxyType({**real.prices, "fake-chat": cheap}))
    async with client_setup(tmp_path, node.url, low) as (wallet, payer, base):
        await wallet.receive_token(await make_token(20, unit="sat"))
        sdk = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError, match="more than"):
            await sdk.chat.completions.create(**CHAT, max_tokens=4)
        assert await wallet.balance_msat() == 20_000
        assert payer.blocked is not None
    assert await node.operator_msat() == 0


async def test_quote_above_cap_is_refused_without_paying(
    tmp_path: Path, node: Node, make_token
) -> None:
    async with client_setup(tmp_path, node.url) as (wallet, payer, base):
        await wallet.receive_token(await make_token(20_000, unit="msat"))
        payer.cap_msat = 2_000
        sdk = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError, match="above the cap"):
            await sdk.chat.completions.create(**CHAT, max_tokens=500)
        assert await wallet.balance_msat() == 20_000


async def test_upstream_failure_refund_comes_back(tmp_path: Path, node: Node, make_token) -> None:
    async with client_setup(tmp_path, node.url) as (wallet, payer, base):
        await wallet.receive_token(await make_token(20_000, unit="msat"))
        sdk = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError):
            await sdk.chat.completions.create(**{**CHAT, "model": "fake-chat+fail-500"})
        assert await wallet.balance_msat() == 20_000
        assert not payer.problems


async def test_fee_mint_pays_provider_input_fee_on_top(
    tmp_path: Path, fee_mint: MintHandle, upstream, make_token
) -> None:
    from tests.support.http_node import start_node

    node = await start_node(tmp_path / "node", [fee_mint.url], upstream)
    try:
        async with client_setup(tmp_path, node.url) as (wallet, payer, base):
            await wallet.receive_token(await make_token(100, unit="sat", mint=fee_mint))
            start = await wallet.balance_msat()
            sdk = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
            await sdk.chat.completions.create(**CHAT, max_tokens=2)
            spent = start - await wallet.balance_msat()
            cost = -(-chat_cost(expected_usage({**CHAT, "max_tokens": 2})) // 1000) * 1000
            assert cost <= spent <= cost + 5_000  # mint input fees on top, a few sat
            assert not payer.problems
        await node.wait_idle()
        await node.core.assert_books_balance()
    finally:
        await node.stop()
