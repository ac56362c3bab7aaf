"""The leaderboard as one self-contained HTML page: inline CSS and JavaScript, figures embedded as data URIs, no
external assets, works offline. Each table scrolls sideways inside the page column when it is wider than it.

Every table sorts by a click on its header (numbers by value, missing values last, group headings stay in place:
rows sort within their group). A fragment ``#sort=TABLE_ID:COLUMN:asc|desc`` (several joined by ``;``) sorts
on load, so a sorted view can be linked to.
"""

from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path

from milbench.report.aggregate import INCOMPLETE, SIGNIFICANT, TIED
from milbench.report.document import Block, Cell, Figure, Section
from milbench.report.tables import REFERENCE

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;
color:#222}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc}h3{font-size:1.02em}
table{border-collapse:collapse;margin:.5em 0 .3em;font-variant-numeric:tabular-nums}
th,td{padding:3px 9px;border-bottom:1px solid #e4e4e4;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
thead th{cursor:pointer;user-select:none;border-bottom:2px solid #555;background:#fafafa}
thead th[aria-sort=ascending]::after{content:" \\25B2"}thead th[aria-sort=descending]::after{content:" \\25BC"}
tr.group th{text-align:left;font-style:italic;font-weight:600;background:#f3f6fa;cursor:default}
td .sub{color:#777;font-size:.8em;margin-left:.3em}td .marks{color:#b00;margin-left:.15em}
td.best{font-weight:700}td.second{text-decoration:underline}
p.note{color:#555;font-size:.9em;margin:.2em 0 1em}
div.scroll{overflow-x:auto;max-width:100%}
figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption{color:#555;font-size:.9em}
"""

JS = """
(function () {
  function key(cell) {
    var v = cell ? cell.getAttribute("data-value") : null;
    return v === null || v === "" ? null : Number(v);
  }
  function compare(a, b, col, dir) {
    var x = key(a.cells[col]), y = key(b.cells[col]);
    if (x !== null || y !== null) {
      if (x === null) return 1;
      if (y === null) return -1;
      return (x - y) * dir;
    }
    return a.cells[col].textContent.localeCompare(b.cells[col].textContent) * dir;
  }
  function sortTable(table, col, dir) {
    Array.prototype.forEach.call(table.tBodies, function (body) {
      var rows = Array.prototype.filter.call(body.rows, function (r) { return !r.classList.contains("group"); });
      rows.sort(function (a, b) { return compare(a, b, col, dir); });
      rows.forEach(function (r) { body.appendChild(r); });
    });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      if (i === col) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      th.addEventListener("click", function () {
        sortTable(table, i, th.getAttribute("aria-sort") === "descending" ? 1 : -1);
      });
    });
  });
  var m = /(?:^#|;)sort=([^#]*)/.exec(decodeURIComponent(location.hash));
  if (m) m[1].split(";").forEach(function (spec) {
    var p = spec.split(":"), table = document.getElementById(p[0]);
    if (table && p.length > 1) sortTable(table, Number(p[1]), p[2] === "asc" ? 1 : -1);
  });
  document.body.setAttribute("data-sortable", "ready");
})();
"""


def _cell(c: Cell) -> str:
    classes = " ".join(x for x, on in (("best", c.bold), ("second", c.underline)) if on)
    attrs = f' class="{classes}"' if classes else ""
    if c.value is not None:
        attrs += f' data-value="{c.value:.12g}"'
    tips = [f"{c.sub.replace('×', ' folds × ')} seeds"] if c.sub else []
    tips += ["incomplete"] if INCOMPLETE in c.marks else []
    tips += ["differs from the reference (Holm-adjusted)"] if SIGNIFICANT in c.marks else []
    tips += ["the reference of the paired comparisons"] if REFERENCE in c.marks else []
    tips += ["tied: the paired test cannot tell it from the leader (or the runner-up)"] if TIED in c.marks else []
    if tips:
        attrs += f' title="{escape("; ".join(tips))}"'
    body = escape(c.text)
    body += f'<span class="sub">{escape(c.sub)}</span>' if c.sub else ""
    body += f'<span class="marks">{escape(c.marks)}</span>' if c.marks else ""
    return f"<td{attrs}>{body}</td>"


def _table(b: Block) -> str:
    head = "".join(f'<th scope="col">{escape(c)}</th>' for c in b.columns)
    bodies, current, previous = [], [], None
    for row, group in zip(b.rows, b.groups):
        if group != previous and current:
            bodies.append(current)
            current = []
        if group != previous and group:
            current.append(f'<tr class="group"><th colspan="{len(b.columns)}">{escape(group)}</th></tr>')
        previous = group
        current.append("<tr>" + "".join(_cell(c) for c in row) + "</tr>")
    if current:
        bodies.append(current)
    body = "".join("<tbody>" + "".join(rows) + "</tbody>" for rows in bodies) or "<tbody></tbody>"
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in b.notes)
    return (f'<h3>{escape(b.title)}</h3>\n<div class="scroll"><table class="sortable" id="{escape(b.key)}"><thead><tr>'
            f"{head}</tr></thead>{body}</table></div>\n{notes}")


def _figure(f: Figure, assets: Path | None) -> str:
    """The figure's PNG embedded as a data URI (read from ``assets``), with its caption."""
    png = assets / f"{f.stem}.png" if assets is not None else None
    caption = escape(" ".join([f.title + ".", *f.notes]))
    if png is None or not png.is_file():
        return f'<h3>{escape(f.title)}</h3>\n<p class="note">Figure {escape(f.stem)}.png not written.</p>'
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<h3>{escape(f.title)}</h3>\n<figure id="{escape(f.key)}"><img alt="{escape(f.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{caption} PDF beside this page: '
            f"<code>{escape(f.stem)}.pdf</code>.</figcaption></figure>")


def _text(text: str) -> str:
    """Escaped paragraph text, with markdown-style `code` spans kept as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def render_html(title: str, sections: list[Section], assets: Path | None = None) -> str:
    """A complete HTML document holding every section and table, with its styles and sorting script inline;
    figures are read from ``assets`` (the folder they were written to) and embedded."""
    parts = []
    for sec in sections:
        parts.append(f'<section><h2>{escape(sec.title)}</h2>')
        parts += [f"<p>{_text(t)}</p>" for t in sec.text if t]
        parts += [_figure(b, assets) if isinstance(b, Figure) else _table(b) for b in sec.blocks]
        parts.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body><h1>{escape(title)}</h1>\n" + "\n".join(parts)
            + f"\n<script>{JS}</script>\n</body></html>\n")
