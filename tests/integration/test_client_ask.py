"""``ask`` over HTTP (the node's HTTP app) and Nostr (its DM listener); real mint and relay."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from nodeprov.client.ask import ask_http, ask_nostr, chat_body, client_keys
from nodeprov.client.pay import PayingClient
from nodeprov.client.provider import ProviderDown, announced, fetch_provider, resolve
from nodeprov.client.wallet import ClientWallet
from tests.support.fake_upstream import FakeUpstream, expected_text, expected_usage
from tests.support.http_node import Node, chat_cost, node_fixture  # noqa: F401  (fixtures)
from tests.support.http_node import upstream_fixture as upstream_fixture
from tests.support.nostr_client import MODELS, DmNode, start_dm_node
from tests.support.services import MintHandle, RelayHandle
from tests.support.tcp_proxy import dead_url

pytestmark = pytest.mark.integration


@pytest.fixture
async def wallet(tmp_path: Path) -> AsyncIterator[ClientWallet]:
    opened = await ClientWallet.open(tmp_path / "client")
    try:
        yield opened
        assert await opened.audit_ok()
    finally:
        await opened.close()


@pytest.fixture(scope="module")
def dm_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=MODELS) as up:
        yield up


@pytest.fixture
async def dm_node(
    tmp_path: Path, relay: RelayHandle, mint: MintHandle, dm_upstream: FakeUpstream
) -> AsyncIterator[DmNode]:
    started = await start_dm_node(tmp_path / "dm", [relay.url], [mint.url], dm_upstream)
    try:
        yield started
    finally:
        await started.close()


async def test_ask_over_http_keeps_exact_change(
    node: Node, wallet: ClientWallet, make_token
) -> None:
    await wallet.receive_token(await make_token(30_000, unit="msat"))
    body = chat_body("what is ecash", "fake-chat", max_tokens=6)
    async with httpx.AsyncClient(timeout=20) as http:
        provider = await resolve(node.url + "/v1", http)
        answer = await ask_http(PayingClient(wallet, provider, http), body)
    assert answer.text == expected_text(body)
    cost = chat_cost(expected_usage(body))
    assert answer.receipt.cost_msat == cost and answer.receipt.spent_msat == cost
    assert await wallet.balance_msat() == 30_000 - cost
    assert answer.problems == []


async def test_ask_over_nostr_with_the_dm_listener(
    tmp_path: Path, dm_node: DmNode, relay: RelayHandle, wallet: ClientWallet, make_token
) -> None:
    await dm_node.announcer().publish()
    await wallet.receive_token(await make_token(40_000, unit="msat"))
    provider = await announced(dm_node.keys.npub, [relay.url])
    assert "fake-chat" in provider.prices and provider.mints
    body = chat_body("hello over nostr", "fake-chat", max_tokens=5)
    keys = client_keys(tmp_path)
    async with httpx.AsyncClient(timeout=20) as http:
        answer = await ask_nostr(
            PayingClient(wallet, provider, http), body, keys, (relay.url,), wait=30
        )
    assert answer.text == expected_text(body)
    cost = chat_cost(expected_usage(body))
    assert answer.receipt.cost_msat == cost
    assert await wallet.balance_msat() == 40_000 - cost
    assert answer.problems == []
    assert client_keys(tmp_path) == keys  # the key is kept


async def test_ask_over_nostr_no_reply_takes_the_token_back(
    tmp_path: Path, relay: RelayHandle, wallet: ClientWallet, make_token, dm_node: DmNode
) -> None:
    await dm_node.announcer().publish()
    provider = await announced(dm_node.keys.npub, [relay.url])
    await dm_node.stop_listener(grace=0)
    await wallet.receive_token(await make_token(20_000, unit="msat"))
    async with httpx.AsyncClient(timeout=20) as http:
        payer = PayingClient(wallet, provider, http)
        with pytest.raises(ProviderDown, match="no reply"):
            await ask_nostr(payer, chat_body("anyone?", "fake-chat", 3), client_keys(tmp_path),
                            (relay.url,), wait=2)  # fmt: skip
    assert await wallet.balance_msat() == 20_000


async def test_down_provider_is_reported(wallet: ClientWallet) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        with pytest.raises(ProviderDown, match="unreachable"):
            await fetch_provider(dead_url(), http)
