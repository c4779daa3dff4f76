"""Usage charts drawn on the server as inline SVG: no chart library, nothing fetched by the browser."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from html import escape

from markupsafe import Markup

# Okabe-Ito: told apart with the common colour-vision deficiencies; each has 3:1 against white.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#8A6D00", "#56B4E9")
OTHER_COLOUR = "#6B7280"
WIDTH, HEIGHT = 760, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 16, 44


@dataclass(frozen=True)
class Series:
    label: str
    values: dict[date, int]
    colour: str


def series_colours(labels: list[str], other: str | None = None) -> list[str]:
    return [OTHER_COLOUR if label == other else PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)]


def axis_step(maximum: int, ticks: int = 4) -> int:
    """A round whole step (1, 2, 2.5 or 5 × 10^k) so that `ticks` steps reach `maximum`."""
    raw = max(maximum, ticks) / ticks
    exponent = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        step = factor * exponent
        if step >= raw and step == int(step):
            return int(step)
    return int(10 * exponent)  # pragma: no cover - the loop always returns


def short_number(value: int) -> str:
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if value >= size:
            text = f"{value / size:.1f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return str(value)


def stacked_bars(days: list[date], series: list[Series], *, title: str, description: str, chart_id: str) -> Markup:
    """Tokens per day, one stacked bar per day, one colour per series."""
    totals = [sum(s.values.get(day, 0) for s in series) for day in days]
    step = axis_step(max(totals, default=0))
    top = step * 4
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(days), 1)
    bar_w = max(slot * 0.7, 1.0)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(description)}</desc>',
    ]
    for i in range(5):
        value = step * i
        y = TOP + plot_h - plot_h * i / 4
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="axis" x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{short_number(value)}</text>'
        )
    for index, day in enumerate(days):
        x = LEFT + slot * index + (slot - bar_w) / 2
        base = TOP + plot_h
        for s in series:
            value = s.values.get(day, 0)
            if value <= 0:
                continue
            h = plot_h * value / top
            base -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar_w:.1f}" height="{max(h, 0.5):.1f}" fill="{s.colour}">'
                f"<title>{day.isoformat()}, {escape(s.label)}: {value:,} tokens</title></rect>"
            )
        if index % 5 == 0 or index == len(days) - 1:
            parts.append(
                f'<text class="axis" x="{x + bar_w / 2:.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">'
                f"{day.strftime('%b %d')}</text>"
            )
    parts.append(f'<line class="baseline" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


def meter(used: int, limit: int | None, *, label: str) -> Markup:
    """A small horizontal bar for use against a limit (decorative: the numbers are in the text)."""
    if not limit:
        share = 0.0 if limit is None else 1.0
    else:
        share = min(used / limit, 1.0)
    level = "high" if share >= 0.9 else "mid" if share >= 0.7 else "low"
    width = 160
    return Markup(
        f'<svg class="meter meter-{level}" viewBox="0 0 {width} 10" width="{width}" height="10" aria-hidden="true" '
        f'focusable="false" xmlns="http://www.w3.org/2000/svg">'
        f'<rect class="meter-track" width="{width}" height="10" rx="3"/>'
        f'<rect class="meter-fill" width="{width * share:.1f}" height="10" rx="3">'
        f"<title>{escape(label)}</title></rect></svg>"
    )
