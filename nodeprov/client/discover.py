"""``discover``: providers announced on relays (kinds 38421, 31990), checked over HTTP.

Each announced endpoint is asked for ``/v1/info`` and ``/v1/models``; a provider whose live
prices exceed its announced ones is flagged. Providers are listed cheapest first by a
reference request (1000 prompt + 1000 completion tokens) of the cheapest model, or of
``--model``; unreachable ones come last.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import httpx

from nodeprov.client.provider import (
    Provider,
    fetch_provider,
    from_listing,
    newest_listings,
    query_events,
)
from nodeprov.core.money import ceil_msat
from nodeprov.errors import NodeprovError
from nodeprov.protocol.announcements import HANDLER_KIND, LISTING_KIND

REFERENCE_TOKENS = 1000


def reference_msat(prices: Mapping[str, int]) -> int:
    """msat of one request with 1000 prompt and 1000 completion tokens at ``prices``."""
    per_token = Fraction(prices.get("input_per_1m", 0) + prices.get("output_per_1m", 0), 10**6)
    return int(ceil_msat(prices.get("request", 0) + per_token * REFERENCE_TOKENS))


@dataclass
class Found:
    """One discovered provider: what it announced and what its endpoint says."""

    npub: str
    name: str
    url: str | None
    reachable: bool
    models: dict[str, dict[str, int]]
    mints: tuple[str, ...]
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    def cost(self, model: str | None) -> int | None:
        if model is not None:
            prices = self.models.get(model)
            return reference_msat(prices) if prices is not None else None
        costs = [reference_msat(p) for p in self.models.values()]
        return min(costs) if costs else None

    def to_json(self, model: str | None = None) -> dict[str, Any]:
        return {
            "npub": self.npub,
            "name": self.name,
            "url": self.url,
            "reachable": self.reachable,
            "reference_msat": self.cost(model),
            "mints": list(self.mints),
            "models": self.models,
            "error": self.error,
            "warnings": self.warnings,
        }


def _compare(announced: Provider, live: Provider) -> list[str]:
    warnings = []
    for model, prices in live.listed.items():
        told = announced.listed.get(model)
        if told is None:
            continue
        dearer = [k for k, v in prices.items() if v > told.get(k, v)]
        if dearer:
            warnings.append(f"{model}: live prices above the announcement ({', '.join(dearer)})")
    return warnings


async def _check(announced: Provider, http: httpx.AsyncClient) -> Found:
    npub = announced.npub or ""
    found = Found(npub, announced.name, announced.base_url or None, False,
                  {k: dict(v) for k, v in announced.listed.items()}, announced.mints)  # fmt: skip
    if not announced.base_url:
        found.error = "announces no HTTP endpoint"
        return found
    try:
        live = await fetch_provider(announced.base_url, http, npub=npub)
    except NodeprovError as exc:
        found.error = exc.message
        return found
    found.reachable = True
    found.name = live.name or found.name
    found.models = {k: dict(v) for k, v in live.listed.items()}
    found.mints = live.mints or found.mints
    found.warnings = _compare(announced, live)
    return found


async def discover(
    relays: Sequence[str],
    *,
    model: str | None = None,
    wait: float = 5.0,
    http: httpx.AsyncClient | None = None,
) -> list[Found]:
    """Announced providers (offering ``model``, if given), cheapest first."""
    filters = [{"kinds": [LISTING_KIND, HANDLER_KIND]}]
    listings = newest_listings(await query_events(relays, filters, wait))
    announced = [from_listing(pk, listing, relays) for pk, (_, listing) in listings.items()]
    own = http is None
    client = http or httpx.AsyncClient(timeout=wait)
    try:
        found = list(await asyncio.gather(*(_check(a, client) for a in announced)))
    finally:
        if own:
            await client.aclose()
    if model is not None:
        found = [f for f in found if model in f.models]

    def key(f: Found) -> tuple[bool, int, str]:
        cost = f.cost(model)
        return (not f.reachable, cost if cost is not None else 1 << 62, f.name)

    return sorted(found, key=key)
