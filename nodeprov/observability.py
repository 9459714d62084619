"""Prometheus ``/metrics`` (text format 0.0.4, by ``prometheus_client``) and ``/health``.

The channels report into one :class:`Metrics`; the ledger gauges are read at scrape
time. ``/health`` checks the ledger (503 when it is unusable), each trusted mint
(``GET /v1/info``, cached a few seconds) and, when given, relays and upstreams.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from nodeprov.core.ledger import OPERATOR, Ledger
from nodeprov.core.metrics import LATENCY_BUCKETS as LATENCY_BUCKETS
from nodeprov.core.metrics import Metrics as Metrics
from nodeprov.core.node import Core
from nodeprov.core.overlap import SwapOverlap

# What generate_latest writes (the library's CONTENT_TYPE_LATEST names a newer version).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MINT_CACHE_SECONDS = 5.0
MINT_PROBE_TIMEOUT = 3.0

# A probe answers {name: ok} or {name: {"ok": bool, ...}}; it may be sync or async.
Probe = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]


async def ledger_gauges(ledger: Ledger) -> dict[str, tuple[str, float]]:
    """Gauges read from the books at scrape time."""
    holds = await ledger.open_holds()
    users = await ledger.db.fetchone(
        "SELECT COALESCE(SUM(balance_msat), 0) FROM accounts WHERE id != ?", (OPERATOR,)
    )
    operator = await ledger.account(OPERATOR)
    return {
        "nodeprov_open_holds": ("Jobs holding funds right now.", holds[0]),
        "nodeprov_open_holds_msat": ("Msat reserved by open holds.", holds[1]),
        "nodeprov_held_for_users_msat": ("Msat owed to users.", users[0] if users else 0),
        "nodeprov_operator_earnings_msat": (
            "Operator earnings not yet paid out.",
            operator.balance_msat if operator else 0,
        ),
    }


def overlap_counters(overlap: SwapOverlap) -> dict[str, tuple[str, int]]:
    """What overlapping per-request tokens' swaps with upstream calls did (and cost)."""
    return {
        "nodeprov_swap_overlap_started": (
            "Upstream calls started before their token's swap was confirmed.",
            overlap.started,
        ),
        "nodeprov_swap_overlap_cancelled": (
            "Overlapped upstream calls cancelled because the token's swap failed.",
            overlap.cancelled,
        ),
        "nodeprov_swap_overlap_waited": (
            "Requests that swapped first because their client had no overlap slot left.",
            overlap.waited,
        ),
        "nodeprov_swap_overlap_known_spent": (
            "Tokens known as spent or refused: swapped first, no upstream call started.",
            overlap.known_spent,
        ),
        "nodeprov_swap_overlap_trips": (
            "Times failed swaps turned the overlap off node-wide for a cool-down.",
            overlap.trips,
        ),
    }


@dataclass(frozen=True)
class HealthProbes:
    """Optional checks supplied by other services (the Nostr pool, the upstream router)."""

    relays: Probe | None = None
    upstreams: Probe | None = None


class MintHealth:
    """``GET /v1/info`` of each trusted mint, cached for ``ttl`` seconds."""

    def __init__(self, mints: Iterable[str], client: httpx.AsyncClient, ttl: float) -> None:
        self.mints = tuple(m.rstrip("/") for m in mints)
        self.client = client
        self.ttl = ttl
        self._cache: tuple[float, dict[str, Any]] | None = None

    async def check(self) -> dict[str, Any]:
        if self._cache is not None and time.monotonic() - self._cache[0] < self.ttl:
            return self._cache[1]
        result = {mint: await self._one(mint) for mint in self.mints}
        self._cache = (time.monotonic(), result)
        return result

    async def _one(self, mint: str) -> dict[str, Any]:
        started = time.monotonic()
        try:
            response = await self.client.get(mint + "/v1/info", timeout=MINT_PROBE_TIMEOUT)
            response.raise_for_status()
            name = response.json().get("name")
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:200]}
        latency_ms = round((time.monotonic() - started) * 1000)
        return {"ok": True, "name": name, "latency_ms": latency_ms}


async def _run_probe(probe: Probe) -> dict[str, Any]:
    try:
        answer = probe()
        if inspect.isawaitable(answer):
            answer = await answer
        return {
            name: dict(state) if isinstance(state, Mapping) else {"ok": bool(state)}
            for name, state in dict(answer).items()
        }
    except Exception as exc:  # a broken probe is reported, it does not break /health
        return {"probe": {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:200]}}


async def health(
    ledger: Ledger, mints: MintHealth, probes: HealthProbes
) -> tuple[int, dict[str, Any]]:
    """The health report and its HTTP status (503 only when the ledger is unusable)."""
    report: dict[str, Any] = {}
    try:
        await ledger.db.fetchone("SELECT COUNT(*) FROM accounts")
        report["ledger"] = {"ok": True}
    except Exception as exc:
        report["ledger"] = {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:200]}
    report["mints"] = await mints.check()
    if probes.relays is not None:
        report["relays"] = await _run_probe(probes.relays)
    if probes.upstreams is not None:
        report["upstreams"] = await _run_probe(probes.upstreams)
    parts = [report["ledger"]] + [
        state for key in ("mints", "relays", "upstreams") for state in report.get(key, {}).values()
    ]
    if not report["ledger"]["ok"]:
        status = "down"
    else:
        status = "ok" if all(p.get("ok") for p in parts) else "degraded"
    return (503 if status == "down" else 200), {"status": status, **report}


def ops_routes(core: Core, metrics: Metrics, probes: HealthProbes | None = None) -> list[BaseRoute]:
    """``GET /metrics`` and ``GET /health`` as routes to add to another Starlette app."""
    mints = MintHealth(core.wallet.mints, core.client, MINT_CACHE_SECONDS)
    checks = probes or HealthProbes()

    async def metrics_endpoint(request: Request) -> Response:
        try:
            gauges = await ledger_gauges(core.ledger)
        except Exception:  # the counters are still worth serving
            gauges = {}
        counters = overlap_counters(core.payments.overlap)
        return PlainTextResponse(metrics.render(gauges, counters), media_type=CONTENT_TYPE)

    async def health_endpoint(request: Request) -> Response:
        status, body = await health(core.ledger, mints, checks)
        return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

    return [
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/health", health_endpoint, methods=["GET"]),
    ]


def build_ops_app(
    core: Core, metrics: Metrics, health_probes: HealthProbes | None = None
) -> Starlette:
    """A small app serving ``/metrics`` and ``/health`` (mount it, or use :func:`ops_routes`)."""
    return Starlette(routes=ops_routes(core, metrics, health_probes))
