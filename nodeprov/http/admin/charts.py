"""Requests and revenue per day as inline SVG bar charts (stacked by channel), server-side."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from html import escape

from nodeprov.core.admin_stats import CHANNELS, DayUsage
from nodeprov.http.admin.format import sat_text

WIDTH, HEIGHT = 720, 200
LEFT, RIGHT, TOP, BOTTOM = 78, 10, 14, 34


def _day(ts: int, fmt: str = "%m-%d") -> str:
    return time.strftime(fmt, time.gmtime(ts))


def usage_svg(days: Sequence[DayUsage], what: str) -> str:
    """A bar per day, stacked by channel: ``what`` is ``"msat"`` (revenue) or ``"requests"``."""
    if what == "msat":
        pick: Callable[[DayUsage, str], int] = lambda d, c: d.msat.get(c, 0)  # noqa: E731
        show: Callable[[int], str] = sat_text
        name = "Revenue"
    else:
        pick = lambda d, c: d.requests.get(c, 0)  # noqa: E731
        show = lambda n: f"{n:,} requests"  # noqa: E731
        name = "Requests"
    totals = [sum(pick(d, c) for c in CHANNELS) for d in days]
    peak = max(totals, default=0)
    scale = peak if peak > 0 else 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(days))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" id="chart-{escape(what)}" '
        f'aria-label="{name} per day by channel, last {len(days)} days">',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{WIDTH - RIGHT}" y2="{TOP}" class="grid"/>',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" '
        'class="axis"/>',
        f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end" class="label">'
        f"{escape(show(peak))}</text>",
        f'<text x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end" class="label">0</text>',
    ]
    for i, day in enumerate(days):
        x = round(LEFT + i * step + step * 0.15, 1)
        base: float = TOP + plot_h
        detail = ", ".join(f"{c} {show(pick(day, c))}" for c in CHANNELS)
        title = f"{_day(day.day, '%Y-%m-%d')}: {show(totals[i])} ({detail})"
        parts.append(f"<g><title>{escape(title)}</title>")
        parts.append(
            f'<rect x="{x}" y="{TOP}" width="{round(step * 0.7, 1)}" height="{plot_h}" '
            'class="hit"/>'
        )
        for channel in CHANNELS:
            value = pick(day, channel)
            if value <= 0:
                continue
            h = round(plot_h * value / scale, 1)
            base = round(base - h, 1)
            parts.append(
                f'<rect x="{x}" y="{base}" width="{round(step * 0.7, 1)}" height="{h}" '
                f'class="bar {channel}"/>'
            )
        parts.append("</g>")
        if i % 5 == 0 or i == len(days) - 1:
            parts.append(
                f'<text x="{round(LEFT + (i + 0.5) * step, 1)}" y="{HEIGHT - 12}" '
                f'text-anchor="middle" class="label">{_day(day.day)}</text>'
            )
    if peak == 0:
        parts.append(
            f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" text-anchor="middle" '
            f'class="label">no paid requests in this period</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
