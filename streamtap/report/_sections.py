"""What the report's sections share: the page they write to (its HTML parts in order and the CSV tables
beside it), its style sheet and load check, and the helpers more than one section uses."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from . import figures as F

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1180px;color:#1b1b1b;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:12.5px}td,th{border:1px solid #ddd;padding:2px 7px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}img{max-width:100%;height:auto;display:block;margin:.6rem 0}
.note{color:#555;font-size:12.5px}.missing{background:#fff6e5;border:1px solid #f0c36d;padding:.5rem .8rem}
code{background:#f4f4f4;padding:0 3px}details{margin:.4rem 0}
"""

CHECK = """
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message || e.type)); }, true);
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-broken", broken.map(function (i) { return i.alt; }).join("|"));
  // figures with text outside their canvas (measured when the page was written: data-overflow)
  var over = imgs.filter(function (i) { return i.getAttribute("data-overflow"); });
  document.body.setAttribute("data-overflowing", over.map(function (i) { return i.alt; }).join("|"));
  document.body.setAttribute("data-errors", window.__errors.join("|"));
  document.body.setAttribute("data-rendered", broken.length || window.__errors.length ? "error" : "ok");
});
"""


class _Page:
    """The report being written: its HTML parts in order, and the CSV tables written beside it."""

    def __init__(self, out: Path):
        self.parts: list[str] = []
        self.out = out
        self.figures = 0
        self.tables: list[str] = []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def h2(self, title: str, anchor: str) -> None:
        self.add(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def p(self, text: str, cls: str = "") -> None:
        self.add(f'<p class="{cls}">{html.escape(text)}</p>' if cls else f"<p>{html.escape(text)}</p>")

    def missing(self, why: str) -> None:
        self.add(f'<p class="missing">Not available for this store: {html.escape(why)}</p>')

    def figure(self, fig, alt: str) -> None:
        overflow = F.overflowing_text(fig)  # shown on the page (and checked by its browser test)
        data = base64.b64encode(F.png_bytes(fig)).decode()
        self.figures += 1
        self.add(f'<img alt="{html.escape(alt)}" data-overflow="{html.escape("|".join(overflow))}" '
                 f'src="data:image/png;base64,{data}">')

    def table(self, rows: list[dict], name: str, caption: str = "", left=()) -> None:
        """An HTML table, and the same rows as data/<name>.csv."""
        if not rows:
            return
        cols = list(rows[0])
        head = "".join(f'<th class="{"l" if c in left else ""}">{html.escape(str(c))}</th>' for c in cols)
        body = "".join("<tr>" + "".join(f'<td class="{"l" if c in left else ""}">{html.escape(_fmt(r[c]))}</td>'
                                         for c in cols) + "</tr>" for r in rows)
        cap = f"<caption class='note'>{html.escape(caption)}</caption>" if caption else ""
        self.add(f"<table>{cap}<tr>{head}</tr>{body}</table>")
        self.csv(rows, name)

    def csv(self, rows: list[dict], name: str) -> None:
        """The rows as data/<name>.csv only (numbers too many for the page)."""
        if not rows:
            return
        import csv

        cols = list(rows[0])
        self.tables.append(name)
        (self.out / "data").mkdir(exist_ok=True)
        with open(self.out / "data" / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)


def _fmt(v) -> str:
    """A table cell: floats to four significant digits."""
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


def _q(s: str) -> str:
    """Token text quoted, so that leading spaces and escapes show."""
    return repr(str(s))


def _top_heads(contrib, n: int) -> list[tuple[int, int, float]]:
    """The ``n`` heads with the largest direct contribution in absolute value: (layer, head, value)."""
    is_head = np.asarray(contrib.kind.values) == "head"
    vals = np.asarray(contrib.values, np.float64)
    order = [i for i in np.argsort(-np.abs(vals), kind="stable") if is_head[i]][:n]
    return [(int(contrib.layer.values[i]), int(contrib["head"].values[i]), float(vals[i])) for i in order]
