"""The dashboard's activity figures: requests and revenue per day and channel, per-key use,
open holds, and the request counters and latency the channels report (:class:`Metrics`).

Ledger figures come from charges (one ``charge`` row per settled request); charges logged
before the channel was recorded count as nostr for npub accounts, else http.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from nodeprov.core.ledger import Ledger
from nodeprov.core.metrics import LATENCY_BUCKETS, Metrics

DAY = 86_400
CHANNELS = ("http", "nostr")
_CHANNEL = "COALESCE(channel, CASE WHEN account_id LIKE 'npub:%' THEN 'nostr' ELSE 'http' END)"
_MODEL = "COALESCE(model, ref, '')"


@dataclass
class DayUsage:
    """One UTC day: requests and msat charged per channel."""

    day: int  # unix time of 00:00 UTC
    requests: dict[str, int] = field(default_factory=dict)
    msat: dict[str, int] = field(default_factory=dict)

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_msat(self) -> int:
        return sum(self.msat.values())


@dataclass(frozen=True)
class KeyUsage:
    account_id: str
    kind: str
    requests: int
    charged_msat: int
    last_at: int


@dataclass(frozen=True)
class OpenHold:
    id: int
    account_id: str
    model: str
    amount_msat: int
    created_at: int
    lease_expires_at: int
    ref: str | None


async def daily_usage(
    ledger: Ledger, days: int = 30, at: int | None = None, model: str | None = None
) -> list[DayUsage]:
    """Requests and revenue per UTC day and channel for the last ``days`` days (today too),
    of one ``model`` or all."""
    today = ((int(time.time()) if at is None else at) // DAY) * DAY
    start = today - (days - 1) * DAY
    where, params = "kind = 'charge' AND at >= ?", [start]
    if model:
        where += f" AND {_MODEL} = ?"
        params.append(model)  # type: ignore[arg-type]
    rows = await ledger.db.fetchall(
        f"SELECT (at / {DAY}) * {DAY}, {_CHANNEL}, COUNT(*), -SUM(delta_msat) "
        f"FROM transactions WHERE {where} GROUP BY 1, 2",
        params,
    )
    out = {start + i * DAY: DayUsage(start + i * DAY) for i in range(days)}
    for day, channel, count, msat in rows:
        if (usage := out.get(int(day))) is not None:
            usage.requests[str(channel)] = int(count)
            usage.msat[str(channel)] = int(msat)
    return list(out.values())


async def key_usage(
    ledger: Ledger, days: int = 30, limit: int = 20, at: int | None = None
) -> tuple[list[KeyUsage], KeyUsage | None]:
    """The accounts that paid for the most in the last ``days`` days, and per-request tokens
    (each pays one request) summed as one line (None if there were none)."""
    start = (int(time.time()) if at is None else at) - days * DAY
    rows = await ledger.db.fetchall(
        "SELECT t.account_id, COALESCE(a.kind, ''), COUNT(*), -SUM(t.delta_msat), MAX(t.at) "
        "FROM transactions t LEFT JOIN accounts a ON a.id = t.account_id "
        "WHERE t.kind = 'charge' AND t.at >= ? AND t.account_id NOT LIKE 'req:%' "
        "GROUP BY t.account_id ORDER BY 4 DESC, 3 DESC LIMIT ?",
        (start, limit),
    )
    keys = [KeyUsage(str(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]
    tokens = await ledger.db.fetchone(
        "SELECT COUNT(*), COALESCE(-SUM(delta_msat), 0), COALESCE(MAX(at), 0) FROM transactions "
        "WHERE kind = 'charge' AND at >= ? AND account_id LIKE 'req:%'",
        (start,),
    )
    per_request = None
    if tokens is not None and int(tokens[0]):
        per_request = KeyUsage("", "request", int(tokens[0]), int(tokens[1]), int(tokens[2]))
    return keys, per_request


async def open_holds(ledger: Ledger, limit: int = 100) -> list[OpenHold]:
    """The holds of jobs running now (streams included), oldest first."""
    rows = await ledger.db.fetchall(
        "SELECT id, account_id, purpose, amount_msat, created_at, lease_expires_at, ref "
        "FROM holds WHERE state = 'open' ORDER BY created_at, id LIMIT ?",
        (limit,),
    )
    return [
        OpenHold(int(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]), int(r[5]), r[6])
        for r in rows
    ]


# --- the channels' counters (since this process started) ------------------------------


@dataclass(frozen=True)
class RequestRates:
    """Finished requests of one channel and model by outcome (since start)."""

    channel: str
    model: str
    requests: int
    ok: int
    unpaid: int  # 402: no or too little payment
    client_errors: int  # other 4xx
    server_errors: int  # 5xx: upstream, mint or node failures

    @property
    def error_rate(self) -> float:
        """Share of requests that failed on the node's side (5xx), 0..1."""
        return self.server_errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Latency:
    """Request latency of one channel (arrival to last byte), from the histogram."""

    channel: str
    count: int
    mean_seconds: float
    p50_seconds: float  # upper bound of the bucket holding the median (inf: beyond the last)
    p95_seconds: float


def request_rates(metrics: Metrics) -> list[RequestRates]:
    """Per channel and model: requests, successes, unpaid, client and server errors."""
    merged: dict[tuple[str, str], list[int]] = {}
    for (channel, model, status), n in metrics.requests.items():
        counts = merged.setdefault((channel, model), [0, 0, 0, 0, 0])
        counts[0] += n
        code = int(status) if str(status).isdigit() else 500
        if code < 400:
            counts[1] += n
        elif code == 402:
            counts[2] += n
        elif code < 500:
            counts[3] += n
        else:
            counts[4] += n
    return [RequestRates(c, m, *counts) for (c, m), counts in sorted(merged.items())]


def _quantile(counts: list[int], q: float) -> float:
    """The upper bound of the first bucket whose cumulative count reaches ``q`` of all."""
    total = counts[-1]
    for bound, cumulative in zip((*LATENCY_BUCKETS, math.inf), counts, strict=True):
        if cumulative >= q * total:
            return bound
    return math.inf


def latencies(metrics: Metrics) -> list[Latency]:
    """Per channel: count, mean and bucketed median and 95th percentile of request latency."""
    out = []
    for channel, counts in sorted(metrics.latency.items()):
        total = counts[-1]  # the buckets are cumulative: +Inf holds every request
        if not total:
            continue
        mean = metrics.latency_sum.get(channel, 0.0) / total
        out.append(Latency(channel, total, mean, _quantile(counts, 0.5), _quantile(counts, 0.95)))
    return out
