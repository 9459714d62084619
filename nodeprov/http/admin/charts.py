"""The revenue-over-time bar chart as inline SVG, rendered on the server."""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape

from nodeprov.core.admin_queries import DayRevenue
from nodeprov.http.admin.format import sat_text

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 70, 10, 14, 34


def _day(ts: int) -> str:
    return time.strftime("%m-%d", time.gmtime(ts))


def revenue_svg(days: Sequence[DayRevenue]) -> str:
    """A bar per day (earnings in msat), with a top gridline labelled in sat."""
    peak = max((d.msat for d in days), default=0)
    scale = peak if peak > 0 else 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(days))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" aria-label="Revenue per day, '
        f'last {len(days)} days">',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{WIDTH - RIGHT}" y2="{TOP}" class="grid"/>',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" '
        'class="axis"/>',
        f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end" class="label">'
        f"{escape(sat_text(peak))}</text>",
        f'<text x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end" class="label">0</text>',
    ]
    for i, day in enumerate(days):
        h = round(plot_h * day.msat / scale, 1)
        x = round(LEFT + i * step + step * 0.15, 1)
        title = f"{time.strftime('%Y-%m-%d', time.gmtime(day.day))}: {sat_text(day.msat)}"
        parts.append(
            f'<rect x="{x}" y="{round(TOP + plot_h - h, 1)}" width="{round(step * 0.7, 1)}" '
            f'height="{h}" class="bar"><title>{escape(title)}</title></rect>'
        )
        if i % 5 == 0 or i == len(days) - 1:
            parts.append(
                f'<text x="{round(LEFT + (i + 0.5) * step, 1)}" y="{HEIGHT - 12}" '
                f'text-anchor="middle" class="label">{_day(day.day)}</text>'
            )
    if peak == 0:
        parts.append(
            f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" text-anchor="middle" '
            'class="label">no earnings in this period</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
