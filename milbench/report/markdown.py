"""Markdown rendering of a leaderboard document (pipe tables; figures as links to the PNG beside the file)."""

from __future__ import annotations

from milbench.report.aggregate import Leaderboard
from milbench.report.document import Block, Cell, Figure, Section, document


def _md_cell(c: Cell) -> str:
    s = c.text.replace("|", "\\|")
    s = f"**{s}**" if c.bold else s
    s = f"<ins>{s}</ins>" if c.underline else s
    return s + (f" ({c.sub})" if c.sub else "") + c.marks


def _md_block(b: Block) -> list[str]:
    out = [f"### {b.title}", "", "| " + " | ".join(b.columns) + " |", "|" + "---|" * len(b.columns)]
    previous = None
    for row, group in zip(b.rows, b.groups):
        if group and group != previous:
            out.append(f"| **{group}** |" + " |" * (len(b.columns) - 1))
        previous = group
        out.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    return out + [""] + [f"{n}\n" for n in b.notes]


def _md_figure(f: Figure) -> list[str]:
    return [f"### {f.title}", "", f"![{f.title}]({f.stem}.png)", "", f"PDF: [{f.stem}.pdf]({f.stem}.pdf)", ""] + [
        f"{n}\n" for n in f.notes]


def render_markdown(title: str, sections: list[Section]) -> str:
    """Markdown: one heading per section, one pipe table per block, group headings as bold rows."""
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""] + [f"{t}\n" for t in sec.text if t]
        for b in sec.blocks:
            out += _md_figure(b) if isinstance(b, Figure) else _md_block(b)
    return "\n".join(out).rstrip() + "\n"


def to_markdown(lb: Leaderboard) -> str:
    return render_markdown(*document(lb))
