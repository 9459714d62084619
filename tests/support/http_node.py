"""The HTTP channel on uvicorn at 127.0.0.1 (free port) over a test core and the fake upstream.

``start_node(tmp_path, mints, upstream)`` -> :class:`Node` (``url``, ``core``, ``base``); the
caller must ``await node.stop()``. Every priced model costs (fee 1) ``1000 msat`` per request +
``2 msat`` per prompt token + ``5 msat`` per completion token; see :func:`chat_cost`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import pytest

from nodeprov.config import (
    Config,
    HttpSection,
    ModelPrice,
    NodeSection,
    Rate,
    Upstream,
    WalletSection,
)
from nodeprov.core.lightning_funding import LightningFunding
from nodeprov.http import HttpContext, create_app
from nodeprov.http.app import bind, serve
from nodeprov.upstream import Upstreams
from tests.support.core import TEST_PRICE, Core, build_core
from tests.support.fake_upstream import FakeUpstream
from tests.support.services import MintHandle
from tests.support.waiting import until

UPSTREAM_KEY = "sk-upstream-secret-of-the-node"
MAX_BODY = 64 * 1024
PRICE = replace(
    TEST_PRICE,
    image=MappingProxyType(
        {"default": Rate(Fraction(50_000), "msat"), "1024x1024/hd": Rate(Fraction(80_000), "msat")}
    ),
    audio_per_second=Rate(Fraction(300), "msat"),
    speech_per_1m_chars=Rate(Fraction(1_000_000_000), "msat"),
)
SWITCHES = (
    "fail-500",
    "fail-429",
    "fail-400",
    "slow-3",
    "slow-30",  # far past the 2 s upstream timeout: the timeout wins on any machine
    "drop-4",
    "nousage",
    "drip-0.05",
    "stall-3",
    "stall-1",
    "pause-2",
    "earlyusage+drop-6",
)
BASE_MODELS = ("fake-chat", "fake-embed", "fake-image", "fake-whisper", "fake-tts")
MODELS = (*BASE_MODELS, *(f"fake-chat+{s}" for s in SWITCHES), "fake-whisper+jsononly")


def chat_cost(usage: Mapping[str, int]) -> int:
    """The msat cost of a chat/completions/embeddings usage at :data:`PRICE`."""
    return 1000 + 2 * usage["prompt_tokens"] + 5 * usage.get("completion_tokens", 0)


@dataclass
class Node:
    url: str
    core: Core
    upstream: FakeUpstream
    config: Config
    _stop: asyncio.Event
    _task: asyncio.Task[None]
    _upstreams: Upstreams

    @property
    def base(self) -> str:
        return self.url + "/v1"

    async def stop(self) -> None:
        self._stop.set()
        await self._task
        await self._upstreams.aclose()
        await self.core.close()

    async def account(self, api_key: str) -> Any:
        from nodeprov.core.payments import api_key_account

        return await self.core.ledger.account(api_key_account(api_key))

    async def operator_msat(self) -> int:
        account = await self.core.ledger.account("operator")
        assert account is not None
        return account.balance_msat

    async def wait_idle(self, seconds: float = 30.0) -> None:
        """Wait until no hold is open (a stream's settlement may trail the client)."""
        await until(self._idle, within=seconds, what="holds still open")  # type: ignore[arg-type]

    async def _idle(self) -> bool:
        return await self.holds() == 0

    async def holds(self) -> int:
        """Open holds, unpaid per-request balances and pending wallet ops: work in flight."""
        row = await self.core.ledger.db.fetchone(
            "SELECT (SELECT COUNT(*) FROM holds)"
            " + (SELECT COUNT(*) FROM accounts WHERE id LIKE 'req:%' AND balance_msat > 0)"
            " + (SELECT COUNT(*) FROM wallet_ops WHERE state = 'pending')"
        )
        return int(row[0]) if row else 0


async def start_node(
    tmp_path: Path,
    mints: Sequence[str],
    upstream: FakeUpstream,
    *,
    upstream_timeout: Decimal = Decimal(2),
    cors: tuple[str, ...] = ("https://app.example",),
    wallet_options: Mapping[str, Any] | None = None,
    price: ModelPrice = PRICE,
    upstream_options: Mapping[str, Any] | None = None,
    **core_options: Any,
) -> Node:
    """The node; ``core_options`` go to :func:`tests.support.core.build_core` (lease, clock),
    ``wallet_options`` to its ``[wallet]`` config section, ``upstream_options`` to its
    ``[[upstreams]]`` entry; ``price`` prices every model."""
    core = await build_core(
        tmp_path / "ledger.sqlite3", mints, models={m: price for m in MODELS}, **core_options
    )
    config = Config(
        node=NodeSection(name="test-node", http_url="http://127.0.0.1"),
        http=HttpSection(
            cors_origins=cors,
            max_body_bytes=MAX_BODY,
            header_timeout_seconds=1,
            body_idle_timeout_seconds=1,
        ),
        wallet=WalletSection(mints=tuple(mints), **(wallet_options or {})),
        upstreams=(
            Upstream(
                "fake",
                upstream.url,
                UPSTREAM_KEY,
                models=MODELS,
                timeout_seconds=upstream_timeout,
                **(upstream_options or {}),
            ),
        ),
        models=MappingProxyType({m: price for m in MODELS}),
    )
    upstreams = Upstreams.from_config(config)
    funding = LightningFunding(
        core.wallet,
        max_sat=config.wallet.lightning_max_sat,
        max_open=config.wallet.lightning_max_open_quotes,
    )
    ctx = HttpContext(config, core.payments, upstreams, funding=funding)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    task = asyncio.create_task(serve(create_app(ctx), sock, stop, config.http))
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                await client.get(url + "/v1/info")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.01)
    return Node(url, core, upstream, config, stop, task, upstreams)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session", name="upstream")
def upstream_fixture() -> Iterator[FakeUpstream]:
    """The fake upstream, shared by the session (switches travel in model names)."""
    with FakeUpstream(models=MODELS, api_key=UPSTREAM_KEY) as up:
        yield up


@pytest.fixture(name="node")
async def node_fixture(
    tmp_path: Path, mint: MintHandle, upstream: FakeUpstream
) -> AsyncIterator[Node]:
    """The HTTP node trusting ``mint``; the books must audit clean after the test."""
    started = await start_node(tmp_path, [mint.url], upstream)
    try:
        yield started
        await started.wait_idle()
        await started.core.assert_books_balance()
    finally:
        await started.stop()
