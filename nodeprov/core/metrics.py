"""Counters and the latency histogram the channels report into; exposed by ``prometheus_client``.

Kept in the core (no HTTP here) so that the core can build one :class:`Metrics` for both
channels; ``nodeprov.observability`` serves it at ``/metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OTHER = "other"


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
        self.streams_open = 0  # SSE responses being sent right now

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

    def stream_started(self) -> None:
        """A streamed (SSE) response began."""
        self.streams_open += 1

    def stream_ended(self) -> None:
        """A streamed response ended (finished, failed or the client left)."""
        self.streams_open = max(0, self.streams_open - 1)

    def record_mint_error(self) -> None:
        """Count a failed call to a mint (unreachable, 5xx, refused)."""
        self.mint_errors += 1

    def record_relay_error(self) -> None:
        """Count a relay failure (connection lost, rejected event)."""
        self.relay_errors += 1

    def render(
        self,
        gauges: Mapping[str, tuple[str, float]] | None = None,
        counters: Mapping[str, tuple[str, int]] | None = None,
    ) -> str:
        """The exposition text (by ``prometheus_client``); ``gauges`` and ``counters`` kept
        elsewhere: name (a counter's without ``_total``) -> (help, value)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Snapshot(self, gauges or {}, counters or {}))
        return generate_latest(registry).decode()


class _Snapshot(Collector):
    """The counters as they are now and gauges read at scrape time, as metric families.

    The hot path only bumps plain ints (cheaper than the client's locked metric objects);
    this collector turns them into families when ``/metrics`` is scraped.
    """

    def __init__(
        self,
        metrics: Metrics,
        gauges: Mapping[str, tuple[str, float]],
        counters: Mapping[str, tuple[str, int]],
    ) -> None:
        self.metrics = metrics
        self.gauges = gauges
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "nodeprov_requests",
            "Finished requests by channel, model, status.",
            labels=("channel", "model", "status"),
        )
        for key, n in sorted(m.requests.items()):
            requests.add_metric(key, n)
        yield requests
        latency = HistogramMetricFamily(
            "nodeprov_request_latency_seconds",
            "Request latency from arrival to the last byte.",
            labels=("channel",),
        )
        for channel, counts in sorted(m.latency.items()):
            bounds = [_number(b) for b in (*LATENCY_BUCKETS, math.inf)]
            latency.add_metric(
                [channel], list(zip(bounds, counts, strict=True)), m.latency_sum[channel]
            )
        yield latency
        for name, value, text in (
            ("nodeprov_msat_earned", m.msat_earned, "Msat charged for requests."),
            ("nodeprov_mint_errors", m.mint_errors, "Failed calls to mints."),
            ("nodeprov_relay_errors", m.relay_errors, "Relay failures."),
            *((name, n, text) for name, (text, n) in self.counters.items()),
        ):
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily(
            "nodeprov_open_streams", "Streamed responses being sent now.", value=m.streams_open
        )
        for name, (text, gauge) in self.gauges.items():
            yield GaugeMetricFamily(name, text, value=gauge)
