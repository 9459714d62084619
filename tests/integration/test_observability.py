"""``/metrics`` and ``/health`` served over real HTTP (uvicorn) with a real mint and ledger."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse as PlainText

from nodeprov.core.node import Core
from nodeprov.http.app import Guard
from nodeprov.observability import LATENCY_BUCKETS, HealthProbes, Metrics, build_ops_app
from tests.support.daemon_core import make_core, write_config
from tests.support.services import MintHandle
from tests.support.tcp_proxy import dead_url
from tests.support.waiting import until

SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)\})?'
    r" (?P<value>[-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\+Inf|NaN))$"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Parse the exposition line by line; every line must be a comment or a valid sample."""
    assert text.endswith("\n")
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4, line
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram"} and name not in types, line
            types[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        labels = frozenset(LABEL.findall(match["labels"] or ""))
        key = (match["name"], labels)
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(match["value"])
        family = re.sub(r"_(bucket|sum|count)$", "", match["name"])
        assert match["name"] in types or family in types, f"sample before its TYPE: {line!r}"
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class QuietServer(uvicorn.Server):
    """uvicorn without signal handlers (the test owns the process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
def dead_mint() -> Iterator[str]:
    yield dead_url()


@pytest.fixture
async def core(tmp_path: Path, mint: MintHandle, dead_mint: str) -> AsyncIterator[Core]:
    built = await make_core(write_config(tmp_path, [mint.url, dead_mint]))
    try:
        yield built
    finally:
        await built.close()


async def test_metrics_parse_and_counters_move(
    core: Core, mint: MintHandle, make_token: Any
) -> None:
    metrics = Metrics(models=["demo-chat"])
    app = build_ops_app(core, metrics)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        first = await http.get("/metrics")
        assert first.status_code == 200
        assert first.headers["content-type"].startswith("text/plain; version=0.0.4")
        before, types = parse(first.text)
        # The reference parser reads it too (the families, by their base names).
        families = {f.name: f.type for f in text_string_to_metric_families(first.text)}
        assert families["nodeprov_requests"] == "counter"
        assert families["nodeprov_request_latency_seconds"] == "histogram"
        assert types["nodeprov_requests_total"] == "counter"
        assert types["nodeprov_request_latency_seconds"] == "histogram"
        assert types["nodeprov_open_holds"] == "gauge"
        assert value(before, "nodeprov_msat_earned_total") == 0

        await core.wallet.receive(await make_token(50, mint=mint), "key:metrics", "api_key")
        hold = await core.ledger.hold("key:metrics", 7000, purpose="demo-chat")
        metrics.record_request("http", "demo-chat", 200, 0.3, charged_msat=1500)
        metrics.record_request("http", "demo-chat", 200, 0.07, charged_msat=500)
        metrics.record_request("nostr", "demo-chat", 402, 0.01)
        metrics.record_request("http", 'evil"\nmodel', 404, 500.0)  # unknown: counted as other
        metrics.record_mint_error()
        metrics.record_relay_error()
        metrics.record_relay_error()
        core.payments.overlap.started += 3
        core.payments.overlap.cancelled += 1

        after, _ = parse((await http.get("/metrics")).text)
        total = "nodeprov_requests_total"
        assert value(after, total, channel="http", model="demo-chat", status="200") == 2
        assert value(after, total, channel="nostr", model="demo-chat", status="402") == 1
        assert value(after, total, channel="http", model="other", status="404") == 1
        assert value(after, "nodeprov_msat_earned_total") == 2000
        assert value(after, "nodeprov_mint_errors_total") == 1
        assert value(after, "nodeprov_relay_errors_total") == 2
        assert value(after, "nodeprov_swap_overlap_started_total") == 3
        assert value(after, "nodeprov_swap_overlap_cancelled_total") == 1
        assert value(after, "nodeprov_swap_overlap_waited_total") == 0
        assert value(after, "nodeprov_open_holds") == 1
        assert value(after, "nodeprov_open_holds_msat") == 7000
        assert value(after, "nodeprov_held_for_users_msat") == 50_000
        assert value(after, "nodeprov_operator_earnings_msat") == 0

        latency = "nodeprov_request_latency_seconds"
        buckets = [
            value(after, f"{latency}_bucket", channel="http", le=le)
            for le in [*(str(b) if b % 1 else str(int(b)) for b in LATENCY_BUCKETS), "+Inf"]
        ]
        assert buckets == sorted(buckets)  # cumulative
        assert value(after, f"{latency}_bucket", channel="http", le="0.1") == 1
        assert value(after, f"{latency}_bucket", channel="http", le="0.5") == 2
        assert buckets[-1] == value(after, f"{latency}_count", channel="http") == 3
        assert value(after, f"{latency}_sum", channel="http") == pytest.approx(500.37)

        await core.ledger.settle(hold, 1500, "r1")
        final, _ = parse((await http.get("/metrics")).text)
        assert value(final, "nodeprov_open_holds") == 0
        assert value(final, "nodeprov_operator_earnings_msat") == 1500


async def test_health_reports_a_down_mint_separately(
    core: Core, mint: MintHandle, dead_mint: str
) -> None:
    calls = 0

    async def upstreams() -> dict[str, Any]:
        return {"demo": {"ok": True, "models": 1}}

    def relays() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"ws://127.0.0.1:1": False, "ws://127.0.0.1:2": True}

    app = build_ops_app(core, Metrics(), HealthProbes(relays=relays, upstreams=upstreams))
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/health")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "degraded"
        assert body["ledger"] == {"ok": True}
        assert body["mints"][mint.url]["ok"] is True
        assert (
            body["mints"][dead_mint]["ok"] is False
            and "Connect" in body["mints"][dead_mint]["error"]
        )
        assert body["relays"] == {
            "ws://127.0.0.1:1": {"ok": False},
            "ws://127.0.0.1:2": {"ok": True},
        }
        assert body["upstreams"] == {"demo": {"ok": True, "models": 1}}
        again = (await http.get("/health")).json()
        assert again["mints"] == body["mints"] and calls == 2  # mints cached, probes live


async def test_health_all_ok_and_broken_probe(tmp_path: Path, mint: MintHandle) -> None:
    core = await make_core(write_config(tmp_path, mint.url))

    def broken() -> dict[str, Any]:
        raise RuntimeError("pool not started")

    try:
        ok_app = build_ops_app(core, Metrics())
        broken_app = build_ops_app(core, Metrics(), HealthProbes(relays=broken))
        async with (
            serving(ok_app) as url,
            serving(broken_app) as url2,
            httpx.AsyncClient() as http,
        ):
            body = (await http.get(url + "/health")).json()
            assert body["status"] == "ok" and set(body) == {"status", "ledger", "mints"}
            other = await http.get(url2 + "/health")
            assert other.status_code == 200 and other.json()["status"] == "degraded"
            assert "pool not started" in other.json()["relays"]["probe"]["error"]
    finally:
        await core.close()


async def test_health_503_when_the_ledger_is_unusable(tmp_path: Path, mint: MintHandle) -> None:
    core = await make_core(write_config(tmp_path, mint.url))
    metrics = Metrics()
    metrics.record_mint_error()
    app = build_ops_app(core, metrics)
    try:
        async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
            await core.ledger.db.close()
            response = await http.get("/health")
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "down" and body["ledger"]["ok"] is False
            assert body["mints"][mint.url]["ok"] is True  # still reported separately
            # /metrics still serves the counters when the ledger gauges cannot be read.
            samples, _ = parse((await http.get("/metrics")).text)
            assert value(samples, "nodeprov_mint_errors_total") == 1
            assert ("nodeprov_open_holds", frozenset()) not in samples
    finally:
        await core.upstreams.aclose()
        await core.client.aclose()


async def test_streams_being_sent_are_counted_until_they_end_or_the_client_leaves() -> None:
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    release = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await release.wait()
        yield b"data: [DONE]\n\n"

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(events(), media_type="text/event-stream")

    metrics = Metrics()
    inner = Starlette(routes=[Route("/v1/stream", stream)])
    ops = Starlette(routes=[Route("/metrics", lambda r: PlainText(metrics.render()))])
    app = Starlette()
    app.mount("/ops", ops)
    app.mount("/", Guard(inner, 1024, metrics))
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        async with http.stream("GET", "/v1/stream") as first:
            lines = first.aiter_lines()
            await anext(lines)
            assert metrics.streams_open == 1
            samples, types = parse((await http.get("/ops/metrics")).text)
            assert types["nodeprov_open_streams"] == "gauge"
            assert value(samples, "nodeprov_open_streams") == 1
            release.set()
            assert [line async for line in lines if line] == ["data: [DONE]"]
        await until(lambda: metrics.streams_open == 0, what="the finished stream uncounted")
        release.clear()
        async with http.stream("GET", "/v1/stream") as second:
            await anext(second.aiter_lines())
            assert metrics.streams_open == 1
        # The client left mid-stream: the stream ends when its next write finds it gone (or
        # the server notices the disconnect), and is uncounted then.
        release.set()
        await until(lambda: metrics.streams_open == 0, what="the abandoned stream uncounted")
