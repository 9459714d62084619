"""The node's core, built once: everything both channels and the daemon's services share.

No channel is imported here: the HTTP and Nostr channels, payouts and the daemon import
:class:`Core` from this module, never the other way round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from nodeprov.config import Config
from nodeprov.core.identity import node_keys
from nodeprov.core.key_secret import node_secret
from nodeprov.core.ledger import Ledger, open_ledger
from nodeprov.core.metrics import Metrics
from nodeprov.core.overlap import SwapOverlap
from nodeprov.core.payments import Payments
from nodeprov.core.pricing import Pricer
from nodeprov.core.rates import ExchangeRates
from nodeprov.core.wallet import Wallet
from nodeprov.upstream import Upstreams, nodelay_transport


@dataclass
class Core:
    """Everything both channels share: one ledger, one wallet, one pricer, one pipeline."""

    config: Config
    ledger: Ledger
    wallet: Wallet
    pricer: Pricer
    payments: Payments
    client: httpx.AsyncClient
    rates: ExchangeRates | None
    upstreams: Upstreams
    metrics: Metrics = field(default_factory=Metrics)
    npub: str | None = None
    # Set by the Nostr service while its relay pool runs, for /health.
    relay_status: Callable[[], Mapping[str, Any]] | None = None

    async def close(self) -> None:
        await self.upstreams.aclose()
        await self.client.aclose()
        await self.ledger.db.close()


Service = Callable[[Core, asyncio.Event], Coroutine[Any, Any, None]]


def needs_rates(config: Config) -> bool:
    """Whether any model has a USD price (and so needs the BTC/USD rate)."""
    return any(r.currency == "usd" for p in config.models.values() for r in p.rates())


async def open_books(config: Config) -> tuple[Ledger, Wallet, httpx.AsyncClient]:
    """The ledger and an offline wallet over it, for commands that only read the books."""
    ledger = await open_ledger(
        config.ledger_url,
        pool_size=config.ledger.pool_size,
        hold_timeout_seconds=config.ledger.hold_timeout_seconds,
    )
    client = httpx.AsyncClient(
        timeout=float(config.wallet.mint_timeout_seconds),
        transport=nodelay_transport(httpx.Limits(max_connections=50)),
    )
    return ledger, Wallet(ledger, config.wallet.mints, config.wallet.units, client), client


async def build_core(config: Config) -> Core:
    """Open the ledger, start the wallet (loading mint keysets) and wire up payments."""
    ledger, wallet, client = await open_books(config)
    upstreams = Upstreams.from_config(config)
    try:
        await wallet.start()
        await upstreams.start()
        rates = ExchangeRates(config.pricing, client) if needs_rates(config) else None
        pricer = Pricer(config.models, config.pricing.fee_multiplier, rates)
        secret = node_secret(config.node.api_key_secret, config.api_key_secret_path)
        overlap = SwapOverlap(
            enabled=config.payments.overlap_swap,
            per_client=config.payments.overlap_per_client,
        )
        payments = Payments(ledger, wallet, pricer, key_secret=secret, overlap=overlap)
    except BaseException:
        await upstreams.aclose()
        await client.aclose()
        await ledger.db.close()
        raise
    metrics = Metrics(models=config.models)
    npub = node_keys(config).npub if config.nostr.relays else None
    return Core(config, ledger, wallet, pricer, payments, client, rates, upstreams, metrics, npub)
