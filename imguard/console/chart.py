"""The Overview's chart: alerts per hour as an SVG drawn on the server (no JavaScript, no library, no CDN).

Every label goes through `escape`: a rule id or a time is data, and the SVG is inlined in the page."""

from __future__ import annotations

from datetime import datetime, timedelta
from markupsafe import Markup, escape

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 720, 220, 44, 34, 12


def buckets_filled(counts: list[tuple[str, int]], start: datetime, end: datetime, step: timedelta,
                   fmt: str) -> list[tuple[str, int]]:
    """Every bucket from `start` to `end` (each labelled with `fmt`, as the counts are keyed), empty ones as 0."""
    known = dict(counts)
    out, at = [], start
    while at <= end:
        key = at.strftime(fmt)
        out.append((key, known.get(key, 0)))
        at += step
    return out


def bar_chart(series: list[tuple[str, int]], title: str) -> Markup:
    """A bar per (label, count); labels read 'YYYY-MM-DDTHH' (hours) or 'YYYY-MM-DD' (days)."""
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    top = max([n for _, n in series] + [1])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" class="axis"/>']
    for fraction in (0.0, 0.5, 1.0):
        y = TOP + plot_h - fraction * plot_h
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
                     f'{round(top * fraction)}</text>')
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" class="grid"/>')
    if not series:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="tick">no alerts</text>')
    step = plot_w / max(len(series), 1)
    label_every = max(1, len(series) // 8)
    for i, (label, count) in enumerate(series):
        h = count / top * plot_h
        x = LEFT + i * step
        parts.append(f'<rect x="{x + step * 0.1:.1f}" y="{TOP + plot_h - h:.1f}" width="{max(step * 0.8, 1):.1f}" '
                     f'height="{h:.1f}" class="bar"><title>{escape(_label(label))} UTC: {count}</title></rect>')
        if i % label_every == 0:
            parts.append(f'<text x="{x + step / 2:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" '
                         f'class="tick">{escape(_label(label)[5:])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _label(key: str) -> str:
    return key.replace("T", " ") + "h" if "T" in key else key
