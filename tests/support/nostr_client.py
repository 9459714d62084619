"""Test peers for the Nostr channel.

- :class:`SdkClient`: a DM client on ``nostr-sdk`` (rust-nostr, an independent implementation):
  sends NIP-17 or NIP-04 DMs, collects the node's replies (joining ``part`` messages).
- :func:`start_dm_node`: the node side (pool + DM listener + announcer) over a test core and
  the fake upstream; ``await node.restart_listener()`` stops and starts the listener.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

import nostr_sdk as ns  # type: ignore[import-untyped]
import pytest

from nodeprov.config import Config, ModelPrice, NodeSection, NostrSection, Upstream, WalletSection
from nodeprov.nostr.announcer import Announcer, build_listing
from nodeprov.nostr.dm_handlers import DmContext
from nodeprov.nostr.dm_listener import DmListener
from nodeprov.nostr.dm_store import DmStore
from nodeprov.nostr.dm_transport import DmTransport
from nodeprov.nostr.relay_pool import RelayPool
from nodeprov.nostr.service import signer
from nodeprov.protocol.dm_jobs import join_parts, parse_part
from nodeprov.protocol.nostr_event import Keys
from nodeprov.upstream import Upstreams
from tests.support.core import TEST_PRICE, Core, build_core
from tests.support.fake_upstream import FakeUpstream
from tests.support.services import MintHandle, RelayHandle
from tests.support.waiting import until

FAST_POOL: dict[str, Any] = {"backoff_base": 0.05, "backoff_cap": 0.5, "connect_timeout": 5.0}
CHAT_MODEL = "fake-chat"
SLOW_MODEL = "fake-chat+slow-2"
# Waits inside the upstream call while the fake upstream's gate is closed (no timing involved).
HELD_MODEL = "fake-chat+held"
MODELS = (CHAT_MODEL, SLOW_MODEL, HELD_MODEL, "fake-embed")
# TEST_PRICE with room for prompts of a few hundred KB (the DM size tests).
LONG_CONTEXT = dataclasses.replace(TEST_PRICE, context_tokens=1_000_000)


def chat_cost(usage: dict[str, int]) -> int:
    """msat at TEST_PRICE: 1000 per request + 2 per prompt token + 5 per completion token."""
    return 1000 + 2 * usage["prompt_tokens"] + 5 * usage.get("completion_tokens", 0)


# ---------------------------------------------------------------------------- client side


@dataclass
class Reply:
    """One reply as the client saw it: NIP, text (parts joined), and the raw texts."""

    nip: str
    text: str
    raw: list[str] = field(default_factory=list)

    @property
    def json(self) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self.text)
        return obj


class SdkClient:
    """A nostr-sdk client with its own key; talks to ``node_pubkey`` over ``relays``."""

    def __init__(self, relays: list[str], node_pubkey: str) -> None:
        self.keys = ns.Keys.generate()
        self.relays = relays
        self.node = ns.PublicKey.parse(node_pubkey)
        self.client = ns.Client()
        self.seen: set[str] = set()
        self.since = int(time.time()) - 5

    @property
    def pubkey(self) -> str:
        return str(self.keys.public_key().to_hex())

    async def connect(self) -> SdkClient:
        for url in self.relays:
            await self.client.add_relay(ns.RelayUrl.parse(url))
        await self.client.connect()
        await self.client.try_connect(timedelta(seconds=5))
        return self

    async def close(self) -> None:
        await self.client.shutdown()

    async def publish(self, event: ns.Event) -> str:
        await self.client.send_event(event)
        return str(event.id().to_hex())

    def nip17(self, text: str) -> ns.Event:
        """A NIP-17 gift wrap to the node (not sent)."""
        return ns.nip17_make_private_msg(self.keys, self.node, text)

    def nip04(self, text: str) -> ns.Event:
        content = ns.nip04_encrypt(self.keys.secret_key(), self.node, text)
        tag = ns.Tag.parse(["p", self.node.to_hex()])
        return ns.EventBuilder(ns.Kind(4), content).tags([tag]).finalize(self.keys)

    async def send(self, text: str, nip: str = "nip17") -> str:
        return await self.publish(self.nip17(text) if nip == "nip17" else self.nip04(text))

    async def publish_dm_relays(self, relays: list[str]) -> None:
        tags = [ns.Tag.parse(["relay", r]) for r in relays]
        await self.publish(ns.EventBuilder(ns.Kind(10050), "").tags(tags).finalize(self.keys))

    async def _fetch(self) -> list[tuple[str, str]]:
        me = self.keys.public_key()
        f17 = ns.Filter().kind(ns.Kind(1059)).pubkey(me)
        f04 = ns.Filter().kind(ns.Kind(4)).pubkey(me).author(self.node)
        events = await self.client.fetch_events(
            ns.ReqTarget.auto([f17, f04]), timeout=timedelta(seconds=2)
        )
        out: list[tuple[str, str]] = []
        for event in events:
            eid = event.id().to_hex()
            if eid in self.seen:
                continue
            self.seen.add(eid)
            if event.kind().as_u16() == 4:
                out.append(("nip04", ns.nip04_decrypt(self.keys.secret_key(), self.node,
                                                      event.content())))  # fmt: skip
                continue
            gift = ns.UnwrappedGift.from_gift_wrap(self.keys, event)
            assert gift.sender().to_hex() == self.node.to_hex()
            out.append(("nip17", gift.rumor().content()))
        return out

    async def replies(self, n: int = 1, within: float = 20.0) -> list[Reply]:
        """Wait for ``n`` complete replies (``part`` messages are joined into one)."""
        done: list[Reply] = []
        parts: dict[str, list[str]] = {}
        deadline = time.monotonic() + within
        while len(done) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"got {len(done)} of {n} replies: {done}")
            for nip, text in await self._fetch():
                part = parse_part(text)
                if part is None:
                    done.append(Reply(nip, text, [text]))
                    continue
                got = parts.setdefault(part.id, [])
                got.append(text)
                if len(got) == part.of:
                    done.append(Reply(nip, join_parts(got), got))
            if len(done) < n:
                await asyncio.sleep(0.2)
        return done

    async def ask(self, text: str, nip: str = "nip17", within: float = 20.0) -> Reply:
        await self.send(text, nip)
        return (await self.replies(1, within))[0]

    async def quiet(self, seconds: float = 1.5) -> list[tuple[str, str]]:
        """Whatever arrives within ``seconds`` (expected: nothing)."""
        await asyncio.sleep(seconds)
        return await self._fetch()


# ------------------------------------------------------------------------------ node side


@dataclass
class DmNode:
    """The Nostr side of a node over a test core; the listener can be restarted."""

    core: Core
    config: Config
    keys: Keys
    pool: RelayPool
    upstreams: Upstreams
    store: DmStore
    listener: DmListener
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def ctx(self) -> DmContext:
        return self.listener.ctx

    async def stop_listener(self, grace: float = 5.0) -> None:
        """Stop the listener (in-flight jobs get ``grace`` s, then are cancelled) and its pool."""
        await self.listener.close(grace)
        self.stop.set()
        await self.task
        await self.pool.close()

    async def start_listener(self) -> None:
        self.pool = RelayPool(self.config.nostr.relays, sign=signer(self.keys), **FAST_POOL)
        transport = DmTransport(self.pool, self.keys)
        self.listener = DmListener(self.ctx, self.pool, transport)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.listener.run(self.stop))
        await asyncio.sleep(0.5)

    def announcer(self) -> Announcer:
        return Announcer(
            self.pool, self.keys,
            lambda: build_listing(self.config, self.core.pricer, self.upstreams, self.keys),
        )  # fmt: skip

    async def close(self) -> None:
        if not self.stop.is_set():
            await self.stop_listener()
        await self.upstreams.aclose()
        await self.core.close()


def node_config(
    relays: list[str],
    mints: list[str],
    upstream: FakeUpstream,
    upstream_options: Mapping[str, Any] | None = None,
    **nostr: Any,
) -> Config:
    prices: dict[str, ModelPrice] = {m: TEST_PRICE for m in MODELS}
    return Config(
        node=NodeSection(name="dm-node", http_url="http://127.0.0.1:8000"),
        nostr=NostrSection(relays=tuple(relays), default_model=CHAT_MODEL, **nostr),
        wallet=WalletSection(mints=tuple(mints)),
        upstreams=(Upstream("fake", upstream.url, models=MODELS, **(upstream_options or {})),),
        models=MappingProxyType(prices),
    )


async def start_dm_node(
    tmp_path: Path,
    relays: list[str],
    mints: list[str],
    upstream: FakeUpstream,
    prices: dict[str, ModelPrice] | None = None,
    upstream_options: Mapping[str, Any] | None = None,
    **nostr: Any,
) -> DmNode:
    config = node_config(relays, mints, upstream, upstream_options, **nostr)
    models = prices or dict(config.models)
    core = await build_core(tmp_path / "ledger.sqlite3", mints, models=models)
    keys = Keys.generate()
    upstreams = Upstreams.from_config(config)
    store = DmStore(core.ledger.db)
    pool = RelayPool(relays, sign=signer(keys), **FAST_POOL)
    ctx = DmContext(config, core.payments, upstreams, keys, store)
    listener = DmListener(ctx, pool, DmTransport(pool, keys))
    stop = asyncio.Event()
    node = DmNode(core, config, keys, pool, upstreams, store, listener, stop,
                  asyncio.create_task(listener.run(stop)))  # fmt: skip
    await asyncio.sleep(0.5)
    return node


def price(request_msat: int) -> ModelPrice:
    """TEST_PRICE with another per-request price (for the announcement tests)."""
    from dataclasses import replace

    from nodeprov.config import Rate

    return replace(TEST_PRICE, request=Rate(Fraction(request_msat), "msat"))


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", name="upstream")
def dm_upstream_fixture() -> Iterator[FakeUpstream]:
    """The fake upstream of a module of DM tests (serving :data:`MODELS`)."""
    with FakeUpstream(models=MODELS) as up:
        yield up


@pytest.fixture(name="client")
async def sdk_client_fixture(node: DmNode, relay: RelayHandle) -> AsyncIterator[SdkClient]:
    """A nostr-sdk peer talking to the module's ``node`` over ``relay``."""
    peer = await SdkClient([relay.url], node.keys.public_key).connect()
    try:
        yield peer
    finally:
        await peer.close()


async def npub_balance(node: DmNode, pubkey: str) -> int:
    """What the npub account of ``pubkey`` (hex) may spend now; 0 when it has none."""
    account = await node.core.ledger.account("npub:" + pubkey)
    return account.available_msat if account else 0


async def wait_idle(node: DmNode) -> None:
    """Until no hold and no wallet operation at a mint is left in flight."""

    async def nothing_in_flight() -> bool:
        row = await node.core.ledger.db.fetchone(
            "SELECT (SELECT COUNT(*) FROM holds) + (SELECT COUNT(*) FROM wallet_ops"
            " WHERE state = 'pending')"
        )
        return row is not None and row[0] == 0

    await until(nothing_in_flight, what="work still in flight")


@pytest.fixture(name="node")
async def dm_node_fixture(
    tmp_path: Path, relay: RelayHandle, mint: MintHandle, upstream: FakeUpstream
) -> AsyncIterator[DmNode]:
    """A DM node on ``relay`` trusting ``mint``; idle and its books balanced at the end."""
    started = await start_dm_node(tmp_path, [relay.url], [mint.url], upstream)
    try:
        yield started
        await wait_idle(started)
        await started.core.assert_books_balance()
    finally:
        await started.close()
