"""Announcements read back from the real relay by a separate nostr-sdk client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType

import nostr_sdk as ns  # type: ignore[import-untyped]
import pytest

from nodeprov.config import ModelPrice
from nodeprov.core.identity import load_or_create_keys
from nodeprov.core.pricing import Pricer
from nodeprov.nostr.announcer import Announcer, build_listing
from nodeprov.protocol import announcements as ann
from nodeprov.protocol.nostr_event import Event
from tests.support.fake_upstream import FakeUpstream
from tests.support.nostr_client import (
    MODELS,
    DmNode,
    dm_upstream_fixture,  # noqa: F401  (fixtures)
    price,
    start_dm_node,
)
from tests.support.services import MintHandle, RelayHandle
from tests.support.waiting import until

pytestmark = pytest.mark.integration


@pytest.fixture
async def node(
    tmp_path: Path, relay: RelayHandle, mint: MintHandle, upstream: FakeUpstream
) -> AsyncIterator[DmNode]:
    started = await start_dm_node(tmp_path, [relay.url], [mint.url], upstream)
    try:
        yield started
        assert (await started.core.ledger.audit()).ok
    finally:
        await started.close()


async def fetch(relay: RelayHandle, author: str, kind: int) -> list[Event]:
    client = ns.Client()
    await client.add_relay(ns.RelayUrl.parse(relay.url))
    await client.connect()
    try:
        f = ns.Filter().kind(ns.Kind(kind)).author(ns.PublicKey.parse(author))
        events = await client.fetch_events(ns.ReqTarget.auto([f]), timeout=timedelta(seconds=3))
        return [Event.from_json(e.as_json()) for e in events]
    finally:
        await client.shutdown()


def prices_of(pricer: Pricer, model: str) -> dict[str, int]:
    return pricer.prices_msat(model)


async def test_announcements_read_back(node: DmNode, relay: RelayHandle) -> None:
    results = await node.announcer().publish()
    assert set(results) == {0, 10050, 38421, 31990}
    assert all(r.accepted == [relay.url] for r in results.values())
    me = node.keys.public_key
    (profile,) = await fetch(relay, me, 0)
    assert json.loads(profile.content)["name"] == "dm-node"
    (inbox,) = await fetch(relay, me, 10050)
    assert inbox.tag_values("relay") == [relay.url]
    (listing_event,) = await fetch(relay, me, 38421)
    listing = ann.parse_listing(listing_event)
    assert listing.identifier == node.keys.npub
    assert listing.mints == node.ctx.mints
    assert listing.http_url == "http://127.0.0.1:8000"
    assert {"openai_http", "x_cashu", "nip17_dm", "nip04_dm", "nip90:5050"} <= set(
        listing.capabilities
    )
    assert listing_event.tag_values("u") == ["http://127.0.0.1:8000"]
    assert listing_event.tag_values("version")
    assert {m.id: dict(m.prices) for m in listing.models} == {
        m: prices_of(node.core.pricer, m) for m in MODELS
    }
    assert dict(listing.models[0].prices)["request"] == 1000
    (handler,) = await fetch(relay, me, 31990)
    assert handler.tag_values("k") == ["14", "4", "5050"]
    assert {m.id for m in ann.parse_listing(handler).models} == set(MODELS)


async def test_price_change_replaces_the_listing(node: DmNode, relay: RelayHandle) -> None:
    pricer: list[Pricer] = [node.core.pricer]
    announcer = Announcer(
        node.pool,
        node.keys,
        lambda: build_listing(node.config, pricer[0], node.upstreams, node.keys),
    )
    await announcer.publish()
    assert not announcer.due()
    new: dict[str, ModelPrice] = {m: price(2500) for m in MODELS}
    pricer[0] = Pricer(MappingProxyType(new), Fraction(1), None)
    assert announcer.due()
    await announcer.publish()
    events = await fetch(relay, node.keys.public_key, 38421)
    assert len(events) == 1
    listing = ann.parse_listing(events[0])
    assert {dict(m.prices)["request"] for m in listing.models} == {2500}


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "nostr.key"
    keys = load_or_create_keys(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().startswith("nsec1")
    assert load_or_create_keys(path) == keys
    path.chmod(0o644)
    assert load_or_create_keys(path) == keys
    assert path.stat().st_mode & 0o777 == 0o600


async def test_daemon_service_announces_and_answers(
    tmp_path: Path, relay: RelayHandle, mint: MintHandle, upstream: FakeUpstream
) -> None:
    import asyncio
    from dataclasses import replace

    from nodeprov.config import NodeSection
    from nodeprov.core.node import build_core
    from nodeprov.nostr.service import nostr_service
    from tests.support.nostr_client import SdkClient, node_config

    config = node_config([relay.url], [mint.url], upstream)
    config = replace(config, node=replace(config.node, data_dir=tmp_path / "data"))
    assert isinstance(config.node, NodeSection)
    core = await build_core(config)
    stop = asyncio.Event()
    task = asyncio.create_task(nostr_service(core, stop))
    try:
        # Wait for the service's key: loading it before it exists would create a second one.
        await until(config.nostr_key_path.exists, what="the service created its key")
        keys = load_or_create_keys(config.nostr_key_path)
        peer = await SdkClient([relay.url], keys.public_key).connect()
        try:
            reply = await peer.ask('{"type": "balance", "id": "svc"}')
            assert reply.json == {"type": "balance", "id": "svc", "balance_msat": 0}
        finally:
            await peer.close()
        # The announcer runs alongside the listener: answering a DM does not mean the
        # listing is out yet, so wait for it.
        (listing,) = await until(
            lambda: fetch(relay, keys.public_key, 38421), what="the listing was announced"
        )
        assert {m.id for m in ann.parse_listing(listing).models} == set(MODELS)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        assert (await core.ledger.audit()).ok
        await core.close()
