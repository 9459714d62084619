"""Build the node's core (ledger, wallet, pricing, payments) on a real SQLite file."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx

from nodeprov.config import ModelPrice, Rate
from nodeprov.core.key_secret import SECRET_FILE, load_or_create_secret
from nodeprov.core.ledger import Ledger, open_ledger
from nodeprov.core.overlap import SwapOverlap
from nodeprov.core.payments import Payments
from nodeprov.core.pricing import Pricer
from nodeprov.core.wallet import Wallet
from tests.support.ledger_backends import ledger_target

# A model priced in whole msat so expected costs are easy to compute in tests:
# 1000 msat per request, 2000 msat per 1M input tokens... scaled up: 2 msat/token in,
# 5 msat/token out.
TEST_MODEL = "test-model"
TEST_PRICE = ModelPrice(
    request=Rate(Fraction(1000), "msat"),
    input_per_1m=Rate(Fraction(2_000_000), "msat"),
    output_per_1m=Rate(Fraction(5_000_000), "msat"),
    context_tokens=8192,
    max_output_tokens=1024,
)


class Rerouting(httpx.AsyncBaseTransport):
    """Sends requests for one base URL to another (a proxy in front of the mint).

    The node keeps the mint's real URL as its identity; only the bytes take the detour.
    """

    def __init__(self, routes: Mapping[str, str]) -> None:
        self._routes = dict(routes)
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        for source, target in self._routes.items():
            if url.startswith(source):
                request.url = httpx.URL(target + url[len(source) :])
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Core:
    ledger: Ledger
    wallet: Wallet
    pricer: Pricer
    payments: Payments
    client: httpx.AsyncClient

    async def close(self) -> None:
        await self.client.aclose()
        await self.ledger.db.close()

    async def assert_books_balance(self) -> None:
        report = await self.ledger.audit()
        assert report.ok, report
        held = await self.wallet.balances()
        for line in report.lines:
            factor = 1000 if line.unit == "sat" else 1
            assert held.get((line.mint_url, line.unit), 0) * factor == line.proofs_msat


async def build_core(
    path: Path,
    mints: Sequence[str],
    units: Sequence[str] = ("sat", "msat"),
    mint_timeout: float = 10.0,
    routes: Mapping[str, str] | None = None,
    models: Mapping[str, ModelPrice] | None = None,
    *,
    lease_seconds: int = 900,
    clock: Callable[[], int] | None = None,
    renew_seconds: float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    overlap_swap: bool = True,
    overlap_per_client: int = 2,
) -> Core:
    """The core for ``mints``; ``routes`` sends a mint's traffic through another address.

    ``models`` replaces the default price list (``TEST_MODEL`` only). ``lease_seconds``,
    ``clock`` and ``renew_seconds`` set the holds' lease, the ledger's clock and how often a
    running job renews its lease (tests move a fake clock instead of waiting). ``transport``
    carries the node's mint traffic (a link a test can break), instead of ``routes``.
    ``overlap_swap``/``overlap_per_client``: the ``[payments]`` settings.
    """
    options: dict[str, Any] = {"clock": clock} if clock is not None else {}
    ledger = await open_ledger(ledger_target(path), hold_timeout_seconds=lease_seconds, **options)
    if transport is None and routes:
        transport = Rerouting(routes)
    client = httpx.AsyncClient(timeout=mint_timeout, transport=transport)
    wallet = Wallet(ledger, mints, units, client)
    await wallet.start()
    prices = MappingProxyType(dict(models) if models else {TEST_MODEL: TEST_PRICE})
    pricer = Pricer(prices, Fraction(1), None)
    # Next to the ledger, like the data dir's: a core reopened on ``path`` derives the same keys.
    secret = load_or_create_secret(path.parent / SECRET_FILE)
    overlap = SwapOverlap(enabled=overlap_swap, per_client=overlap_per_client)
    payments = Payments(
        ledger, wallet, pricer, renew_seconds=renew_seconds, key_secret=secret, overlap=overlap
    )
    return Core(ledger, wallet, pricer, payments, client)
