"""Counters and the latency histogram the channels report into, in Prometheus text format.

Kept in the core (no HTTP here) so that the core can build one :class:`Metrics` for both
channels; ``nodeprov.observability`` serves it at ``/metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OTHER = "other"


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
