"""The HTML leaderboard: one self-contained page, rendered by headless Chromium, its tables read back."""
from milbench.report.aggregate import Options, build
from milbench.report.write import write

import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests.runstore import Spec, write_run

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    runs = tmp_path_factory.mktemp("html") / "runs"
    for model, quality in (("crossfusion", 1.5), ("amil", 0.8), ("transmil", 0.2), ("crossfusion_single", 1.0)):
        for cohort in ("tcga_blca", "tcga_luad"):
            write_run(runs, Spec(model, cohort, quality, folds=(0, 1, 2) if model == "transmil" else (0, 1, 2, 3, 4)))
    board = build(runs, options=Options(n_boot=50, paired_boot=500))
    path = next(p for p in write(board, runs.parent / "out", ["html"]) if p.suffix == ".html")
    return board, path


class Tables(HTMLParser):
    """Every table of a document: id -> rows of (is group heading, [(text, attributes)])."""

    def __init__(self):
        super().__init__()
        self.tables, self.body_attrs, self.table, self.row, self.cell = {}, {}, None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body_attrs = attrs
        elif tag == "table":
            self.table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self.table is not None:
            self.row = ("group" in (attrs.get("class") or ""), [])
            self.table.append(self.row)
        elif tag in ("td", "th") and self.row is not None:
            self.cell = ["", attrs]
            self.row[1].append(self.cell)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.cell = None
        elif tag == "table":
            self.table = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[0] += data


def _parse(html):
    parser = Tables()
    parser.feed(html)
    return parser


def test_page_is_self_contained(page):
    _, path = page
    html = path.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html and "<script>" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)  # nothing fetched from anywhere
    assert "<link" not in html and "@import" not in html and "url(" not in html


def test_static_tables_hold_the_recomputed_cells(page):
    board, path = page
    tables = _parse(path.read_text()).tables
    _check_main_table(board, tables["main-fixed-default"])


def _check_main_table(board, rows):
    header = [text for text, _ in rows[0][1]]
    body = [(cells[0][0], cells[1:]) for group, cells in rows[1:] if not group]
    cells = board.cells.set_index("display")
    assert {label for label, _ in body} == set(cells.index)
    for label, tds in body:
        for (text, attrs), cohort in zip(tds, header[1:]):
            r = cells[(cells.index == label)].set_index("cohort").loc[f"tcga_{cohort.lower()}"]
            assert text.startswith(f"{r['mean']:.3f} ± {r['std']:.3f}{r.folds}×{r.seeds}")
            assert float(attrs["data-value"]) == pytest.approx(r["mean"], rel=1e-9)
            assert ("best" in (attrs.get("class") or "")) == (r["mark"] == "best")
            assert ("second" in (attrs.get("class") or "")) == (r["mark"] == "second")
            assert text.endswith("†") == (not r.complete)


def test_tables_scroll_inside_the_page_column(page):
    _, path = page
    html = path.read_text()
    assert "div.scroll{overflow-x:auto;max-width:100%}" in html
    n_tables = html.count("<table ")
    assert n_tables > 5 and html.count('<div class="scroll"><table ') == n_tables == html.count("</table></div>")
    assert "figure img{max-width:100%" in html and 'src="data:image/png;base64,' in html


def _chromium(url, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium); .ci/run installs it")
    res = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_chromium_renders_and_sorts_the_table(page, tmp_path):
    board, path = page
    dom = _parse(_chromium(path.as_uri() + "#sort=main-fixed-default:1:desc", tmp_path))
    assert dom.body_attrs.get("data-sortable") == "ready"  # the inline script ran
    rows = dom.tables["main-fixed-default"]
    _check_main_table(board, rows)  # the rendered cells are the recomputed ones
    # within each group the rows are now sorted by the first cohort, descending, missing values last
    groups, current = [], []
    for is_group, cells in rows[1:]:
        if is_group:
            groups.append(current)
            current = []
        else:
            value = cells[1][1].get("data-value")
            current.append(float(value) if value is not None else -np.inf)
    groups.append(current)
    assert sum(len(g) for g in groups) == board.cells.display.nunique()
    assert all(g == sorted(g, reverse=True) for g in groups)
    header = rows[0][1]
    assert header[1][1].get("aria-sort") == "descending"
    # every table of the static page survives rendering
    assert set(dom.tables) == set(_parse(path.read_text()).tables)


def test_chromium_is_available_in_ci():
    """CI installs chromium (.ci/run); locally the rendering test skips with a reason when it is absent."""
    script = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "apt-get install -y chromium" in script and "/usr/bin/chromium" in script
    assert script.strip().splitlines()[-1].strip() == "make test"
