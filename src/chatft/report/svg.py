"""Line charts as inline SVG, drawn here so that report.html reads without its script and fetches nothing.

In: one or more `Series` (name, (x, y) points, a CSS class for its colour) and optional horizontal reference
lines. Out: one `<figure>`: the chart as `<svg>` text (no xmlns: inline SVG in HTML needs none, and the report
holds no URL) and, in its `data-chart` attribute, the points as JSON for charts.js, which adds hover values and
drag-to-zoom. Without script every plotted point still carries a `<title>` (`step 3: loss 6.92978`) that browsers
show on hover; above `MAX_MARKERS` points per series the markers are thinned evenly (the first and last always
kept), and above `MAX_LINE_POINTS` the line keeps each bucket's lowest and highest point, so a long run's spikes
still show (the JSON holds the line's points as drawn). Non-finite values (a skipped float16 step's inf loss)
are left out.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html import escape

WIDTH, HEIGHT = 560, 230
LEFT, RIGHT, TOP, BOTTOM = 62, 14, 14, 34
MAX_MARKERS = 400
MAX_LINE_POINTS = 3000


def fmt(value: float) -> str:
    """How a value is written in hover titles and axis labels: six significant digits."""
    return f"{value:.6g}"


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    css: str = "s0"  # the class that colours it (see the page's stylesheet)
    markers_only: bool = False  # validation: a few points, drawn as dots joined by a dashed line
    finite: list[tuple[float, float]] = field(init=False)

    def __post_init__(self) -> None:
        self.finite = [(x, y) for x, y in self.points if math.isfinite(x) and math.isfinite(y)]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    candidates = (first + i * step for i in range(4 * count))  # bounded, even where float steps are coarse
    ticks = sorted({float(f"{v:.12g}") for v in candidates if low - step * 1e-9 <= v <= high + step * 1e-9})
    return ticks or [low]


def _bounds(values: list[float], pad: float) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high == low:  # a flat line sits in the middle of a small band
        spread = abs(low) * 0.05 or 1.0
        return low - spread, high + spread
    margin = (high - low) * pad
    return low - margin, high + margin


def _thin_line(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """At most about MAX_LINE_POINTS points: each bucket keeps its lowest and highest, in x order."""
    if len(points) <= MAX_LINE_POINTS:
        return points
    size = math.ceil(len(points) / (MAX_LINE_POINTS // 2))
    kept = []
    for start in range(0, len(points), size):
        bucket = points[start:start + size]
        low, high = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
        kept += sorted({low, high})
    return kept


def _thin_markers(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_MARKERS:
        return points
    stride = len(points) / (MAX_MARKERS - 1)
    picked = {min(round(i * stride), len(points) - 1) for i in range(MAX_MARKERS)}
    return [points[i] for i in sorted(picked | {len(points) - 1})]


def _number(value: float) -> float | int:
    """A value as the chart's JSON carries it: steps as integers, measurements at full precision (the hover
    shows them with `fmt`, as the titles do)."""
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def chart_data(series: list[Series], x_range: tuple[float, float], y_range: tuple[float, float],
               x_label: str, hlines: list[tuple[float, str]]) -> str:
    """What charts.js needs to redraw a chart when zoomed and to name values on hover, as JSON: the plot box,
    the ranges drawn, and each series' points as drawn (the thinned line, or a dotted series' markers)."""
    payload = {
        "box": [LEFT, TOP, WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM], "x": list(x_range), "y": list(y_range),
        "xl": x_label, "ref": [[value, label] for value, label in hlines if math.isfinite(value)],
        "series": [{"name": s.name, "css": s.css, "dots": s.markers_only,
                    "pts": [[_number(x), _number(y)] for x, y in (_thin_markers(s.finite) if s.markers_only
                                                                  else _thin_line(s.finite))]}
                   for s in series],
    }
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


def _axes(px, py, x_range: tuple[float, float], y_range: tuple[float, float]) -> str:
    """Grid lines and tick labels of both axes (charts.js draws them again for a zoomed range)."""
    x_low, x_high = x_range
    parts = []
    for tick in nice_ticks(*y_range):
        y = py(tick)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="tick y" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(tick)}</text>')
    for tick in (t for t in nice_ticks(x_low, x_high) if float(t).is_integer() or x_high - x_low < 4):
        x = px(tick)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>'
                     f'<text class="tick x" x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{fmt(tick)}'
                     "</text>")
    return '<g class="axes">' + "".join(parts) + "</g>"


def line_chart(title: str, series: list[Series], *, y_label: str, x_label: str = "step",
               hlines: list[tuple[float, str]] = ()) -> str:
    """One chart; an empty string when no series has a finite point. The series and reference lines are drawn
    inside a nested <svg> the size of the plot, which clips them when charts.js zooms in."""
    drawn = [s for s in series if s.finite]
    if not drawn:
        return ""
    xs = [x for s in drawn for x, _ in s.finite]
    ys = [y for s in drawn for _, y in s.finite] + [value for value, _ in hlines if math.isfinite(value)]
    x_low, x_high = min(xs), max(xs)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = _bounds(ys, 0.06)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>",
             f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>',
             _axes(px, py, (x_low, x_high), (y_low, y_high)),
             f'<text class="axis" x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 3}" '
             f'text-anchor="middle">{escape(x_label)}</text>',
             f'<text class="axis" transform="translate(12 {TOP + plot_h / 2:.1f}) rotate(-90)" '
             f'text-anchor="middle">{escape(y_label)}</text>',
             f'<svg class="area" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" '
             f'viewBox="{LEFT} {TOP} {plot_w} {plot_h}">']
    for value, label in hlines:
        if math.isfinite(value):
            y = py(value)
            parts.append(f'<g class="ref"><line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
                         f'<text x="{WIDTH - RIGHT - 4}" y="{y - 4:.1f}" text-anchor="end">{escape(label)}</text>'
                         f"<title>{escape(label)}: {fmt(value)}</title></g>")
    for item in drawn:
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in _thin_line(item.finite))
        dashed = " dashed" if item.markers_only else ""
        parts.append(f'<g class="series {escape(item.css)}"><polyline class="line{dashed}" points="{line}"/>')
        radius, dot = (3, " dot") if item.markers_only else (4, "")
        for x, y in _thin_markers(item.finite):  # hover targets without script; validation's few dots are shown
            parts.append(f'<circle class="pt{dot}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="{radius}">'
                         f"<title>{escape(x_label)} {fmt(x)}: {escape(item.name)} {fmt(y)}</title></circle>")
        parts.append("</g>")
    parts.append("</svg></svg>")
    legend = "".join(f'<span class="key {escape(s.css)}">{escape(s.name)}</span>' for s in drawn) \
        if len(drawn) > 1 or hlines else ""
    data = escape(chart_data(drawn, (x_low, x_high), (y_low, y_high), x_label, hlines))
    return (f'<figure class="chart-box" data-chart="{data}"><figcaption>{escape(title)}{legend}</figcaption>'
            + "".join(parts) + "</figure>")


def bars(rows: list[tuple[str, float, str]], unit: str) -> str:
    """Horizontal bars on one scale, e.g. the memory estimate against the measured peak: (label, value, css)."""
    rows = [r for r in rows if r[1] is not None and math.isfinite(r[1])]
    if not rows:
        return ""
    top = max(value for _, value, _ in rows) or 1.0
    label_w, row_h, width = 150, 26, WIDTH
    span = width - label_w - 110
    parts = [f'<svg class="bars" viewBox="0 0 {width} {row_h * len(rows) + 6}" role="img" aria-label="memory">']
    for i, (label, value, css) in enumerate(rows):
        y = 4 + i * row_h
        length = max(value / top * span, 1)
        parts.append(f'<text class="tick" x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(label)}</text>'
                     f'<rect class="bar {escape(css)}" x="{label_w}" y="{y}" width="{length:.1f}" height="{row_h - 8}">'
                     f"<title>{escape(label)}: {value:,.1f} {escape(unit)}</title></rect>"
                     f'<text class="tick" x="{label_w + length + 6:.1f}" y="{y + 15}">{value:,.1f} {escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)
