"""Typeset pages with matplotlib: text pages, booktabs-style tables and figures, gathered into one PDF that
opens with a contents page.

Why matplotlib and not ReportLab: every figure of the report is already a matplotlib figure, and
matplotlib's PDF backend keeps them vector (line plots stay sharp at any zoom) with no conversion step;
ReportLab can only place raster images or its own drawings (vector matplotlib needs svglib on top). Drawing the
tables and text with the same library keeps one dependency, one font (DejaVu, embedded as TrueType so the text
is searchable) and one page model. The contents page is written last-but-placed-first: pages are collected,
then numbered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.textpath import TextToPath  # noqa: E402

from .io import atomic_path  # noqa: E402

PORTRAIT = (8.27, 11.69)  # A4, inches
LANDSCAPE = (11.69, 8.27)
MARGIN = 0.6  # inches
MIN_TABLE_FONT = 6.0
_MEASURE = TextToPath()
matplotlib.rcParams["pdf.fonttype"] = 42  # TrueType: the PDF's text can be searched and extracted


def text_width(text: str, size: float, bold: bool = False, italic: bool = False) -> float:
    """Width of `text` in inches at `size` points."""
    props = FontProperties(size=size, weight="bold" if bold else "normal", style="italic" if italic else "normal")
    return _MEASURE.get_text_width_height_descent(text, props, ismath=False)[0] / 72.0


def wrap(text: str, size: float, width: float, indent: str = "") -> list[str]:
    """Greedy word wrap of `text` to `width` inches at `size` points, measured with the font itself."""
    lines, line = [], ""
    width *= 0.95  # the path-based measure runs a little short of the rendered text
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else (indent if lines else "") + word
        if line and text_width(candidate, size) > width:
            lines.append(line)
            line = indent + word
        else:
            line = candidate
    return lines + [line]


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------


@dataclass
class TCell:
    text: str
    bold: bool = False
    italic: bool = False


@dataclass
class Table:
    """header: rows of (text, span) spanning body columns; body rows: ("row" | "block" | "change", [TCell]).

    Column 0 is left-aligned (row labels), the others right-aligned (numbers line up on their last digit).
    A "block" row holds one cell, the block header spanning the whole width.
    """

    header: list[list[tuple[str, int]]]
    body: list[tuple[str, list[TCell]]]
    ncols: int
    group_rules: bool = False  # a short rule under each spanning header cell (booktabs \cmidrule)
    column_groups: list[tuple[int, int]] = field(default_factory=list)  # (first, last) column of each group

    def widths(self, size: float) -> list[float]:
        pad = 0.14
        widths = [0.0] * self.ncols
        for kind, cells in self.body:
            if kind == "block":
                continue
            for i, c in enumerate(cells):
                widths[i] = max(widths[i], text_width(c.text, size, c.bold, c.italic) + pad)
        for hrow in self.header:
            col = 0
            for text, span in hrow:
                if span == 1:
                    widths[col] = max(widths[col], text_width(text, size, bold=True) + pad)
                col += span
        for hrow in self.header:  # a spanning header wider than its columns widens them evenly
            col = 0
            for text, span in hrow:
                need = text_width(text, size, bold=True) + pad
                have = sum(widths[col:col + span])
                if need > have:
                    for i in range(col, col + span):
                        widths[i] += (need - have) / span
                col += span
        return widths

    def split_columns(self) -> list["Table"]:
        """Split a table too wide for a page between its column groups (each part keeps the label column)."""
        if not self.column_groups or len(self.column_groups) < 2:
            return [self]
        half = len(self.column_groups) // 2
        parts = []
        for groups in (self.column_groups[:half], self.column_groups[half:]):
            keep = [0] + [c for first, last in groups for c in range(first, last + 1)]
            parts.append(self._subset(keep, groups))
        return parts  # Document.table splits a part again if it is still too wide

    def _subset(self, keep: list[int], groups: list[tuple[int, int]]) -> "Table":
        header = []
        for hrow in self.header:
            cols, col = [], 0
            for text, span in hrow:
                inside = [c for c in range(col, col + span) if c in keep]
                if inside:
                    cols.append((text, len(inside)))
                col += span
            header.append(cols)
        body = [(k, cells if k == "block" else [cells[c] for c in keep]) for k, cells in self.body]
        remap = {c: i for i, c in enumerate(keep)}
        return Table(header, body, len(keep), self.group_rules, [(remap[a], remap[b]) for a, b in groups])


def frame_table(df, bold=None, formats: dict | None = None) -> Table:
    """A DataFrame as a one-header-row Table (`bold`: a same-shaped boolean frame, `formats`: column -> format)."""
    import pandas as pd

    formats = formats or {}
    body = []
    for i, (_, row) in enumerate(df.iterrows()):
        cells = []
        for j, (col, value) in enumerate(row.items()):
            if isinstance(value, str):
                text = value
            elif value is None or (isinstance(value, float) and pd.isna(value)):
                text = "—"
            elif col in formats:
                text = format(value, formats[col])
            elif isinstance(value, float):
                text = f"{value:.4g}"
            else:
                text = str(value)
            cells.append(TCell(text, bold=bool(bold.iat[i, j]) if bold is not None else False))
        body.append(("row", cells))
    return Table([[(str(c), 1) for c in df.columns]], body, len(df.columns))


def layout_table(layout) -> Table:
    """An analysis.TableLayout (data set column blocks, baseline row blocks) as a Table."""
    header = [[("Model", 1)] + [(d, len(ns)) for d, ns in layout.groups],
              [("", 1)] + [(f"N = {n}", 1) for _, ns in layout.groups for n in ns]]
    groups, col = [], 1
    for _, ns in layout.groups:
        groups.append((col, col + len(ns) - 1))
        col += len(ns)
    body = []
    for row in layout.rows:
        if row[0] == "block":
            body.append(("block", [TCell(row[1], italic=True)]))
        else:
            change = row[0] == "change"
            body.append((row[0], [TCell(row[1], italic=change)]
                         + [TCell(c.text, bold=c.bold, italic=change) for c in row[2]]))
    return Table(header, body, 1 + len(layout.columns), group_rules=True, column_groups=groups)


# ----------------------------------------------------------------------------------------------------
# The document
# ----------------------------------------------------------------------------------------------------


@dataclass
class Section:
    title: str
    reproduces: str
    first_page: int | None = None  # 1-based page of the final PDF, set when written
    pages: int = 0
    status: str = "rendered"  # or "not measured in this study: <why>"


class Document:
    """Pages in order, grouped into sections; ``savefig`` makes it a drop-in for PdfPages in sections."""

    def __init__(self, title: str):
        self.title = title
        self.sections: list[Section] = []
        self._pages: list[tuple[plt.Figure, dict]] = []
        self._section: Section | None = None

    # -- sections ------------------------------------------------------------------------------------
    def begin(self, title: str, reproduces: str) -> Section:
        self._section = Section(title, reproduces)
        self.sections.append(self._section)
        return self._section

    def _add(self, fig: plt.Figure, **save_kw) -> None:
        if self._section is None:
            self.begin("Untitled", "")
        if self._section.first_page is None:
            self._section.first_page = len(self._pages)  # index, numbered at write time
        self._section.pages += 1
        self._pages.append((fig, save_kw))

    def savefig(self, fig: plt.Figure, **save_kw) -> None:
        self._add(fig, **save_kw)

    # -- page kinds ----------------------------------------------------------------------------------
    def _page(self, size=PORTRAIT, heading: str | None = None) -> tuple[plt.Figure, float]:
        fig = plt.figure(figsize=size)
        y = size[1] - MARGIN
        if heading:
            fig.text(MARGIN / size[0], y / size[1], heading, fontsize=13, weight="bold", va="top")
            y -= 0.45
        return fig, y

    def text(self, title: str | None, paragraphs: list[str], size: float = 9.0) -> None:
        """Paragraphs wrapped to the page width, continued on new pages as needed."""
        fig, y = self._page(heading=title)
        line_h = size * 1.45 / 72
        for para in paragraphs:
            lines = wrap(para, size, PORTRAIT[0] - 2 * MARGIN, indent="    " if para.startswith("  ") else "")
            for line in lines:
                if y - line_h < MARGIN:
                    self._add(fig)
                    fig, y = self._page()
                bold = line.startswith("**") and line.endswith("**") and len(line) > 4
                fig.text(MARGIN / PORTRAIT[0], y / PORTRAIT[1], line.strip("*") if bold else line, fontsize=size,
                         va="top", weight="bold" if bold else "normal")
                y -= line_h
            y -= line_h * 0.5
        self._add(fig)

    def table(self, title: str, table: Table, caption: str = "", notes: list[str] | None = None,
              size: float = 8.0) -> None:
        """A booktabs table (top/mid/bottom rules), landscape or smaller type or split between column groups
        when it does not fit the width; rows continue on further pages with the header repeated."""
        for page_size in (PORTRAIT, LANDSCAPE):
            avail = page_size[0] - 2 * MARGIN
            font = size
            while font >= MIN_TABLE_FONT and sum(table.widths(font)) > avail:
                font -= 0.5
            if font >= MIN_TABLE_FONT:
                break
        else:
            parts = table.split_columns()
            if len(parts) == 1:  # cannot split: draw at the smallest type, clipped at the margin
                font, page_size = MIN_TABLE_FONT, LANDSCAPE
            else:
                for i, part in enumerate(parts):
                    self.table(f"{title} ({i + 1}/{len(parts)})", part, caption, notes if i == len(parts) - 1 else None, size)
                return
        self._draw_table(title, table, caption, notes or [], font, page_size)

    def _draw_table(self, title, table: Table, caption, notes, font, page_size) -> None:
        W, H = page_size
        widths = table.widths(font)
        xs = [MARGIN]
        for w in widths:
            xs.append(xs[-1] + w)
        row_h = font * 1.7 / 72
        fx = lambda x: x / W  # noqa: E731
        fy = lambda y: y / H  # noqa: E731

        def rule(fig, y, lw, x0=xs[0], x1=xs[-1]):
            fig.add_artist(plt.Line2D([fx(x0), fx(x1)], [fy(y), fy(y)], lw=lw, color="black"))

        def start_page(cont: bool):
            fig, y = self._page(page_size, heading=title + (" (continued)" if cont else ""))
            if caption and not cont:
                for line in wrap(caption, 8.5, W - 2 * MARGIN):
                    fig.text(fx(MARGIN), fy(y), line, fontsize=8.5, va="top")
                    y -= 8.5 * 1.45 / 72
                y -= 0.1
            rule(fig, y, 1.0)
            y -= 0.04
            for hi, hrow in enumerate(table.header):
                col = 0
                for text, span in hrow:
                    left, right = xs[col], xs[col + span]
                    if span > 1:
                        fig.text(fx((left + right) / 2), fy(y - row_h / 2), text, fontsize=font, weight="bold",
                                 ha="center", va="center")
                        if table.group_rules:
                            rule(fig, y - row_h + 0.02, 0.5, left + 0.05, right - 0.05)
                    elif col == 0:
                        fig.text(fx(left + 0.02), fy(y - row_h / 2), text, fontsize=font, weight="bold", va="center")
                    else:
                        fig.text(fx(right - 0.07), fy(y - row_h / 2), text, fontsize=font, weight="bold",
                                 ha="right", va="center")
                    col += span
                y -= row_h
            rule(fig, y, 0.6)
            return fig, y - 0.03

        fig, y = start_page(False)
        for kind, cells in table.body:
            if y - row_h < MARGIN + 0.3:
                rule(fig, y, 1.0)
                self._add(fig)
                fig, y = start_page(True)
            if kind == "block":
                fig.text(fx(xs[0] + 0.02), fy(y - row_h / 2), cells[0].text, fontsize=font, style="italic",
                         weight="bold", va="center")
            else:
                for i, c in enumerate(cells):
                    style = dict(fontsize=font - (1 if kind == "change" else 0), va="center",
                                 weight="bold" if c.bold else "normal", style="italic" if c.italic else "normal",
                                 color="0.3" if kind == "change" else "black")
                    if i == 0:
                        fig.text(fx(xs[0] + 0.02), fy(y - row_h / 2), c.text, **style)
                    else:
                        fig.text(fx(xs[i + 1] - 0.07), fy(y - row_h / 2), c.text, ha="right", **style)
            y -= row_h
        rule(fig, y, 1.0)
        y -= 0.15
        for note in notes:
            for line in wrap(note, 7.5, W - 2 * MARGIN):
                if y < MARGIN:
                    self._add(fig)
                    fig, y = self._page(page_size)
                fig.text(fx(MARGIN), fy(y), line, fontsize=7.5, va="top")
                y -= 7.5 * 1.45 / 72
            y -= 0.04
        self._add(fig)

    # -- output --------------------------------------------------------------------------------------
    def write(self, path: str | Path) -> list[Section]:
        """Contents page(s) first, then every page; returns the sections with their final page numbers."""
        contents = self._contents_pages(offset=0)
        offset = len(contents)
        for fig in contents:
            plt.close(fig)
        contents = self._contents_pages(offset)  # page numbers now final
        for s in self.sections:
            if s.first_page is not None:
                s.first_page += offset + 1
        with atomic_path(path) as tmp:
            with PdfPages(tmp) as pdf:
                for fig in contents:
                    pdf.savefig(fig)
                    plt.close(fig)
                for fig, kw in self._pages:
                    pdf.savefig(fig, **kw)
                    plt.close(fig)
                info = pdf.infodict()
                info["Title"] = self.title
        self._pages = []
        return self.sections

    def _contents_pages(self, offset: int) -> list[plt.Figure]:
        pages, size = [], 8.0
        fig, y = self._page(heading=f"Contents — {self.title}")
        line_h = size * 1.4 / 72
        for i, s in enumerate(self.sections, 1):
            page = "" if s.first_page is None else str(s.first_page + offset + 1)
            width = PORTRAIT[0] - 2 * MARGIN - 0.4
            lines = [(f"{i}. {s.title}", True)]
            about = "; ".join(([s.reproduces] if s.reproduces else [])
                              + ([s.status] if s.status != "rendered" else []))
            lines += [(text, False) for text in (wrap(about, size - 0.5, width) if about else [])]
            need = line_h * (len(lines) + 0.4)
            if y - need < MARGIN:
                pages.append(fig)
                fig, y = self._page(heading="Contents (continued)")
            for j, (text, bold) in enumerate(lines):
                if not text:
                    continue
                x = MARGIN / PORTRAIT[0] + (0 if j == 0 else 0.03)
                fig.text(x, y / PORTRAIT[1], text, fontsize=size if bold else size - 0.5, va="top",
                         weight="bold" if bold else "normal", style="normal" if bold else "italic")
                if j == 0:
                    fig.text(1 - MARGIN / PORTRAIT[0], y / PORTRAIT[1], page, fontsize=size, va="top", ha="right")
                y -= line_h
            y -= line_h * 0.3
        pages.append(fig)
        return pages
