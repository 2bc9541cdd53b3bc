"""The few HTML pieces the report is made of: escaped text, tables, numbers, and the document around them.

Everything that comes from a run (paths, config values, data, model answers) goes through `esc`: html.escape
with quotes, and control characters other than tab and newline shown as `\\xNN` (a model's answer may hold them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from html import escape
from typing import Any

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(value: Any) -> str:
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
    return escape(text, quote=True)


def num(value: Any, digits: int = 4) -> str:
    """A metric for a table: '-' when absent, thousands separators for counts, `digits` decimals otherwise."""
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.3e}"
    return esc(value)


def code(value: Any) -> str:
    return f"<code>{esc(value)}</code>"


def kv_table(rows: Iterable[tuple[str, str | None]]) -> str:
    """Key/value rows; the value is already HTML; rows whose value is None are left out."""
    body = "".join(f"<tr><th>{esc(key)}</th><td>{value}</td></tr>" for key, value in rows if value is not None)
    return f'<table class="kv">{body}</table>'


def table(header: list[str], rows: list[list[str]], numeric: Iterable[int] = ()) -> str:
    """A table whose cells are already HTML; columns in `numeric` are right-aligned."""
    right = set(numeric)
    head = "".join(f'<th{" class=num" if i in right else ""}>{esc(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in right else ""}>{cell}</td>'
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def note(text_html: str) -> str:
    return f'<p class="note">{text_html}</p>'


STYLE = """
:root{--fg:#1f2328;--muted:#656d76;--line:#d0d7de;--bg:#fff;--soft:#f6f8fa}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg);
 margin:0 auto;max-width:1200px;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;border-bottom:1px solid var(--line);padding-bottom:4px;
 margin-top:28px}h3{font-size:14px;margin:16px 0 6px}
nav a{margin-right:12px;color:#0969da;text-decoration:none}
.sub,.note{color:var(--muted)}.note{font-size:13px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--soft);padding:1px 4px;
 border-radius:4px;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
thead th,table.kv th{background:var(--soft);font-weight:600}table.kv th{white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;background:#dafbe1;color:#116329}
.badge.warn{background:#fff8c5;color:#7d4e00}.badge.bad{background:#ffebe9;color:#a40e26}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(470px,1fr));gap:12px}
figure.chart-box{margin:0;border:1px solid var(--line);border-radius:6px;padding:6px 8px}
figcaption{font-weight:600;font-size:13px;margin-bottom:2px}
svg.chart,svg.bars{width:100%;height:auto;display:block}
svg .plot{fill:#fff;stroke:var(--line)}svg .grid{stroke:#eaeef2}
svg .tick{font-size:10px;fill:var(--muted)}svg .axis{font-size:11px;fill:var(--muted)}
.series polyline{fill:none;stroke:currentColor;stroke-width:1.6}.series polyline.dashed{stroke-dasharray:4 3}
.series circle.pt{fill:currentColor;fill-opacity:0}.series circle.pt:hover{fill-opacity:1;stroke:#000}
.series circle.pt.dot{fill-opacity:1}
.ref line{stroke:#cf222e;stroke-dasharray:6 4;stroke-width:1.2}.ref text{font-size:10px;fill:#cf222e}
.s0{color:#0969da}.s1{color:#bc4c00}.s2{color:#1a7f37}.s3{color:#8250df}.s4{color:#cf222e}.s5{color:#1b7c83}
.s6{color:#9a6700}.s7{color:#6e7781}
figure.chart-box{position:relative}figure.live svg.chart{cursor:crosshair;user-select:none}
svg .guide{stroke:#57606a;stroke-dasharray:3 3;display:none}.hovering svg .guide{display:inline}
svg .selection{fill:#0969da;fill-opacity:.12;display:none}.selecting svg .selection{display:inline}
.series circle.hover{fill:currentColor;stroke:#fff;stroke-width:1.5}
.tip{position:absolute;display:none;pointer-events:none;background:#fff;border:1px solid var(--line);
 border-radius:6px;padding:4px 8px;font-size:12px;box-shadow:0 2px 8px rgba(0,0,0,.12);white-space:nowrap;z-index:2}
.hovering .tip{display:block}.tip .row::before{content:"";display:inline-block;width:8px;height:8px;
 border-radius:4px;background:currentColor;margin-right:5px}
button.unzoom{display:none;float:right;font:12px system-ui,sans-serif;padding:0 8px;cursor:pointer}
.zoomed button.unzoom{display:inline-block}
rect.bar.s0{fill:#0969da}rect.bar.s1{fill:#bc4c00}
.key{font-weight:400;font-size:12px;margin-left:12px}.key::before{content:"";display:inline-block;width:14px;
 height:3px;background:currentColor;vertical-align:middle;margin-right:4px}
.gens{display:grid;gap:8px;margin-bottom:14px}
.gen{border:1px solid var(--line);border-radius:6px;padding:6px 8px;min-width:0}
.gen h4{margin:0 0 4px;font-size:13px}.gen.ref{background:var(--soft)}
pre.mask{border:1px solid var(--line);border-radius:6px;padding:6px 8px;background:#fff;color:var(--muted)}
pre.mask mark{background:#dafbe1;color:#116329;font-weight:600;border-radius:2px}
pre.mask .sp{border:1px dashed #8250df;border-radius:3px;color:#8250df;padding:0 1px}
.legend mark{background:#dafbe1;color:#116329;font-weight:600}.legend .sp{border:1px dashed #8250df;color:#8250df}
table.diff tr.differs td,table.diff tr.differs th{background:#fff8c5}
pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
footer{margin-top:36px;color:var(--muted);font-size:12px}
"""


def _script() -> str:
    """charts.js, to inline: the report fetches nothing, so the script travels inside the page."""
    from importlib import resources

    return resources.files("chatft.report").joinpath("charts.js").read_text(encoding="utf-8")


def document(title: str, body: str) -> str:
    """The whole page around `body`: inline CSS and script, no URL."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>{body}"
            f"<script>{_script()}</script></body></html>\n")
