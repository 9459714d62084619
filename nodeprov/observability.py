"""Prometheus ``/metrics`` (text format 0.0.4, written by hand) and ``/health``.

The channels report into one :class:`Metrics`; the ledger gauges are read at scrape
time. ``/health`` checks the ledger (503 when it is unusable), each trusted mint
(``GET /v1/info``, cached a few seconds) and, when given, relays and upstreams.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from nodeprov.core.ledger import OPERATOR, Ledger

if TYPE_CHECKING:  # the daemon builds the Metrics this module defines
    from nodeprov.daemon import Core

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MINT_CACHE_SECONDS = 5.0
MINT_PROBE_TIMEOUT = 3.0
OTHER = "other"

# A probe answers {name: ok} or {name: {"ok": bool, ...}}; it may be sync or async.
Probe = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Metrics:
    """Counters and the latency histogram the HTTP and Nostr channels update.

    ``models``: the priced model ids; any other model name is counted as ``other`` so
    that clients cannot grow the label set without bound.
    """

    def __init__(self, models: Iterable[str] | None = None) -> None:
        self.models = frozenset(models) if models is not None else None
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[str, list[int]] = {}  # channel -> bucket counts (+Inf last)
        self.latency_sum: dict[str, float] = {}
        self.msat_earned = 0
        self.mint_errors = 0
        self.relay_errors = 0

    def record_request(
        self, channel: str, model: str, status: int | str, seconds: float, charged_msat: int = 0
    ) -> None:
        """Count one finished request, its latency and what it charged (integer msat)."""
        if self.models is not None and model not in self.models:
            model = OTHER
        key = (channel, model, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        buckets = self.latency.setdefault(channel, [0] * (len(LATENCY_BUCKETS) + 1))
        for i, bound in enumerate((*LATENCY_BUCKETS, math.inf)):
            if seconds <= bound:
                buckets[i] += 1
        self.latency_sum[channel] = self.latency_sum.get(channel, 0.0) + max(seconds, 0.0)
        self.msat_earned += max(int(charged_msat), 0)

    def record_mint_error(self) -> None:
        """Count a failed call to a mint (unreachable, 5xx, refused)."""
        self.mint_errors += 1

    def record_relay_error(self) -> None:
        """Count a relay failure (connection lost, rejected event)."""
        self.relay_errors += 1

    def render(self, gauges: Mapping[str, tuple[str, float]] | None = None) -> str:
        """The exposition text; ``gauges`` maps name -> (help, value)."""
        out: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        family("nodeprov_requests_total", "counter", "Finished requests by channel, model, status.")
        for (channel, model, status), n in sorted(self.requests.items()):
            labels = _labels((("channel", channel), ("model", model), ("status", status)))
            out.append(f"nodeprov_requests_total{labels} {n}")
        name = "nodeprov_request_latency_seconds"
        family(name, "histogram", "Request latency from arrival to the last byte.")
        for channel, counts in sorted(self.latency.items()):
            for bound, n in zip((*LATENCY_BUCKETS, math.inf), counts, strict=True):
                pairs = (("channel", channel), ("le", _number(bound)))
                out.append(f"{name}_bucket{_labels(pairs)} {n}")
            label = _labels([("channel", channel)])
            out.append(f"{name}_sum{label} {_number(self.latency_sum[channel])}")
            out.append(f"{name}_count{label} {counts[-1]}")
        for metric, value, text in (
            ("nodeprov_msat_earned_total", self.msat_earned, "Msat charged for requests."),
            ("nodeprov_mint_errors_total", self.mint_errors, "Failed calls to mints."),
            ("nodeprov_relay_errors_total", self.relay_errors, "Relay failures."),
        ):
            family(metric, "counter", text)
            out.append(f"{metric} {value}")
        for metric, (text, gauge) in (gauges or {}).items():
            family(metric, "gauge", text)
            out.append(f"{metric} {_number(gauge)}")
        return "\n".join(out) + "\n"


async def ledger_gauges(ledger: Ledger) -> dict[str, tuple[str, float]]:
    """Gauges read from the books at scrape time."""
    holds = await ledger.db.fetchone(
        "SELECT COUNT(*), COALESCE(SUM(amount_msat), 0) FROM holds WHERE state = 'open'"
    )
    users = await ledger.db.fetchone(
        "SELECT COALESCE(SUM(balance_msat), 0) FROM accounts WHERE id != ?", (OPERATOR,)
    )
    operator = await ledger.account(OPERATOR)
    return {
        "nodeprov_open_holds": ("Jobs holding funds right now.", holds[0] if holds else 0),
        "nodeprov_open_holds_msat": ("Msat reserved by open holds.", holds[1] if holds else 0),
        "nodeprov_held_for_users_msat": ("Msat owed to users.", users[0] if users else 0),
        "nodeprov_operator_earnings_msat": (
            "Operator earnings not yet paid out.",
            operator.balance_msat if operator else 0,
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
        return PlainTextResponse(metrics.render(gauges), media_type=CONTENT_TYPE)

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
