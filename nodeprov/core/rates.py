"""The BTC/USD exchange rate, for prices configured in USD.

Rates are fetched from configured HTTP JSON sources, parsed as ``Decimal`` (never float),
combined by median and kept as an exact ``Fraction``. A rate too old is refused, not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

import httpx

from nodeprov.config import PricingSection, RateSource
from nodeprov.core.money import MSAT_PER_BTC
from nodeprov.errors import PriceUnavailable

log = logging.getLogger(__name__)

# A source that hangs must not hold up the others or the refresh loop.
SOURCE_TIMEOUT_SECONDS = 10.0


class ExchangeRates:
    """BTC/USD from the configured sources, with the staleness rule of :meth:`btc_usd`."""

    def __init__(
        self,
        pricing: PricingSection,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sources = pricing.btc_usd_sources
        self._fallback = Fraction(pricing.btc_usd_fallback)
        self._max_age = pricing.btc_usd_max_age_seconds
        self._refresh_every = pricing.btc_usd_refresh_seconds
        self._client = client
        self._clock = clock
        self._started = clock()
        self._rate: Fraction | None = None
        self._fetched_at: float | None = None

    @property
    def last_rate(self) -> Fraction | None:
        """The newest fetched BTC/USD (possibly stale), for status pages; never for pricing."""
        return self._rate

    def btc_usd(self) -> Fraction:
        """The BTC/USD rate to price with now, or :class:`PriceUnavailable`.

        Rule: the newest fetched rate is used while younger than ``btc_usd_max_age_seconds``.
        Before the first successful fetch, the configured fallback (if > 0) is used, but only
        for ``btc_usd_max_age_seconds`` after start. With no sources configured the fallback
        is a fixed rate used forever. Otherwise (stale rate, or no rate at all) refuse.
        """
        now = self._clock()
        if self._rate is not None and self._fetched_at is not None:
            if now - self._fetched_at < self._max_age:
                return self._rate
            raise PriceUnavailable(
                f"the BTC/USD rate is {int(now - self._fetched_at)} s old "
                f"(max {self._max_age} s); refusing USD pricing until it is refreshed"
            )
        if self._fallback > 0 and (not self._sources or now - self._started < self._max_age):
            return self._fallback
        raise PriceUnavailable("no BTC/USD rate is available; refusing USD pricing")

    def msat_per_usd(self) -> Fraction:
        """Exactly how many msat one USD buys: ``MSAT_PER_BTC / btc_usd``."""
        return Fraction(MSAT_PER_BTC) / self.btc_usd()

    async def refresh(self) -> None:
        """Ask every source; store the median of the sane answers. Logs failures, never raises."""
        if not self._sources:
            return
        answers = await asyncio.gather(*(self._fetch(source) for source in self._sources))
        good = sorted(a for a in answers if a is not None)
        if not good:
            log.warning("BTC/USD refresh: no source answered with a usable rate")
            return
        middle = len(good) // 2
        self._rate = good[middle] if len(good) % 2 else (good[middle - 1] + good[middle]) / 2
        self._fetched_at = self._clock()
        shown = Decimal(self._rate.numerator) / self._rate.denominator
        log.info("BTC/USD rate %.2f from %d of %d sources", shown, len(good), len(self._sources))

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every ``btc_usd_refresh_seconds`` until ``stop`` is set."""
        while not stop.is_set():
            await self.refresh()
            if not self._sources:
                await stop.wait()
                return
            # wait_for on the event doubles as an interruptible sleep.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._refresh_every)

    async def _fetch(self, source: RateSource) -> Fraction | None:
        try:
            response = await self._client.get(source.url, timeout=SOURCE_TIMEOUT_SECONDS)
            response.raise_for_status()
            document = json.loads(response.text, parse_float=Decimal)
            return parse_rate(_follow(document, source.path))
        # Anything a third-party source can do wrong (network, status, JSON, shape, value,
        # even RecursionError on absurd nesting) must only cost us that one answer.
        except Exception as exc:
            log.warning("BTC/USD source %s (%s) failed: %s", source.url, source.path, exc)
            return None


def _follow(document: Any, path: str) -> Any:
    """Walk a dotted path through dicts (by key) and lists (by index)."""
    value = document
    for part in path.split("."):
        if isinstance(value, list):
            value = value[int(part)]
        elif isinstance(value, dict):
            value = value[part]
        else:
            raise LookupError(f"'{part}' of path {path!r} does not exist")
    return value


def parse_rate(value: Any) -> Fraction:
    """A BTC/USD number from JSON (int, Decimal or numeric string) as an exact, positive rate."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise TypeError(f"expected a number, got {value!r}")
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r}") from None
    if not number.is_finite() or number <= 0:
        raise ValueError(f"not a positive finite rate: {value!r}")
    return Fraction(number)
