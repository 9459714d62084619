"""ExchangeRates against a real local HTTP server; time is an injected clock, not sleeps."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from nodeprov.config import PricingSection, RateSource
from nodeprov.core.money import MSAT_PER_BTC
from nodeprov.core.pricing import ExchangeRates
from nodeprov.errors import PriceUnavailable
from tests.support.waiting import until

# path -> (status, body); the tests edit it between refreshes
ROUTES: dict[str, tuple[int, bytes]] = {
    "/coingecko": (200, b'{"bitcoin": {"usd": 60000}}'),
    "/coinbase": (200, b'{"data": {"base": "BTC", "amount": "62000.50"}}'),
    "/kraken": (200, b'{"result": [{"price": 61000.25}]}'),
    "/down": (500, b"internal error"),
    "/garbage": (200, b"<html>not json</html>"),
    "/negative": (200, b'{"usd": -5}'),
    "/zero": (200, b'{"usd": "0"}'),
    "/nan": (200, b'{"usd": "NaN"}'),
    "/bool": (200, b'{"usd": true}'),
    "/wrongpath": (200, b'{"other": 1}'),
    "/object": (200, b'{"usd": {"last": 1}}'),
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = ROUTES.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def closed_port_url() -> str:
    # a port nobody listens on: bind, read the port, close
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/price"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def section(base: str, *sources: tuple[str, str], **kw: object) -> PricingSection:
    return PricingSection(
        btc_usd_sources=tuple(RateSource(f"{base}{path}", dotted) for path, dotted in sources),
        **kw,  # type: ignore[arg-type]
    )


GOOD = (("/coingecko", "bitcoin.usd"), ("/coinbase", "data.amount"), ("/kraken", "result.0.price"))


async def test_median_of_three_sources(base_url: str, client: httpx.AsyncClient) -> None:
    rates = ExchangeRates(section(base_url, *GOOD), client, Clock())
    await rates.refresh()
    assert rates.btc_usd() == Fraction("61000.25")
    assert rates.msat_per_usd() == Fraction(MSAT_PER_BTC) / Fraction("61000.25")
    assert type(rates.msat_per_usd()) is Fraction


async def test_median_of_two_is_the_exact_mean(base_url: str, client: httpx.AsyncClient) -> None:
    rates = ExchangeRates(section(base_url, *GOOD[:2]), client, Clock())
    await rates.refresh()
    # (60000 + 62000.50) / 2, exactly; "62000.50" is a numeric string
    assert rates.btc_usd() == Fraction("61000.25")


async def test_bad_sources_are_ignored(
    base_url: str, closed_port_url: str, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [
        ("/down", "usd"),
        ("/garbage", "usd"),
        ("/negative", "usd"),
        ("/zero", "usd"),
        ("/nan", "usd"),
        ("/bool", "usd"),
        ("/wrongpath", "usd"),
        ("/object", "usd"),
        ("/missing", "usd"),
        ("/coingecko", "bitcoin.usd.deeper"),
        ("/kraken", "result.7.price"),
    ]
    pricing = section(base_url, *bad, GOOD[0], GOOD[1])
    pricing = PricingSection(
        btc_usd_sources=(*pricing.btc_usd_sources, RateSource(closed_port_url, "usd"))
    )
    rates = ExchangeRates(pricing, client, Clock())
    with caplog.at_level("WARNING"):
        await rates.refresh()
    assert rates.btc_usd() == Fraction("61000.25")
    assert sum("failed" in r.getMessage() for r in caplog.records) == len(bad) + 1


async def test_all_sources_down_never_raises(
    base_url: str, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    rates = ExchangeRates(section(base_url, ("/down", "usd"), ("/garbage", "usd")), client, Clock())
    await rates.refresh()
    assert rates.last_rate is None
    with pytest.raises(PriceUnavailable):
        rates.msat_per_usd()
    assert "no source answered" in caplog.text


async def test_fallback_until_max_age_then_refuse(base_url: str, client: httpx.AsyncClient) -> None:
    clock = Clock()
    pricing = section(
        base_url, ("/down", "usd"), btc_usd_fallback=Decimal(50000), btc_usd_max_age_seconds=600
    )
    rates = ExchangeRates(pricing, client, clock)
    await rates.refresh()
    assert rates.btc_usd() == 50000
    clock.now += 599
    assert rates.msat_per_usd() == Fraction(MSAT_PER_BTC, 50000)
    clock.now += 1
    with pytest.raises(PriceUnavailable) as info:
        rates.msat_per_usd()
    assert info.value.status == 503 and info.value.retryable


async def test_fetched_rate_goes_stale(base_url: str, client: httpx.AsyncClient) -> None:
    clock = Clock()
    pricing = section(
        base_url, GOOD[0], btc_usd_fallback=Decimal(50000), btc_usd_max_age_seconds=300
    )
    rates = ExchangeRates(pricing, client, clock)
    await rates.refresh()
    assert rates.btc_usd() == 60000  # a fetched rate beats the fallback
    clock.now += 299
    assert rates.btc_usd() == 60000
    clock.now += 1
    with pytest.raises(PriceUnavailable, match="old"):
        rates.btc_usd()  # stale, and the fallback is only for before the first fetch
    await rates.refresh()
    assert rates.btc_usd() == 60000


async def test_failed_refresh_keeps_the_last_rate(base_url: str, client: httpx.AsyncClient) -> None:
    clock = Clock()
    ROUTES["/flaky"] = (200, b'{"usd": "64000.1"}')
    try:
        rates = ExchangeRates(section(base_url, ("/flaky", "usd")), client, clock)
        await rates.refresh()
        ROUTES["/flaky"] = (503, b"")
        clock.now += 100
        await rates.refresh()
        assert rates.btc_usd() == Fraction("64000.1")
        clock.now += 3500  # past the default max age of the first fetch
        with pytest.raises(PriceUnavailable):
            rates.btc_usd()
    finally:
        del ROUTES["/flaky"]


async def test_no_sources_means_a_fixed_rate_forever(client: httpx.AsyncClient) -> None:
    clock = Clock()
    rates = ExchangeRates(PricingSection(btc_usd_fallback=Decimal("99999.99")), client, clock)
    await rates.refresh()
    clock.now += 10**9
    assert rates.btc_usd() == Fraction("99999.99")
    with pytest.raises(PriceUnavailable):
        ExchangeRates(PricingSection(), client, clock).btc_usd()


async def test_run_refreshes_until_stopped(base_url: str, client: httpx.AsyncClient) -> None:
    rates = ExchangeRates(section(base_url, GOOD[0], btc_usd_refresh_seconds=3600), client)
    stop = asyncio.Event()
    task = asyncio.create_task(rates.run(stop))
    await until(lambda: rates.last_rate is not None, what="the first refresh")
    assert rates.last_rate == 60000
    stop.set()
    await asyncio.wait_for(task, timeout=2)
