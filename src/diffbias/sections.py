"""What a report section works with: the ``section`` marker, and helpers to draw, tabulate and label.

A section is a function ``fn(ctx)`` marked with :func:`section` (title, the paper items it reproduces, the study
tables it needs). Measurement modules declare theirs (``Measurement.sections``); :mod:`diffbias.report` owns the
document and the sections every study has (overview, model cost, training loss). ``ctx`` holds:

- ``ctx["study"]``: the study description (:func:`diffbias.plan.study_description`);
- ``ctx[<table>]``: each study table present (``train_log``, ``counts`` and every measurement's, with a ``label``
  column); ``ctx["arrays"][<measurement>]``: ``{run: {array: ndarray}}`` from the study-level packs;
- ``ctx["pdf"]`` (:class:`diffbias.typeset.Document`), ``ctx["figures_dir"]``, ``ctx["tables_dir"]``,
  ``ctx["labels"]`` and ``ctx["blocks"]`` (variants grouped by baseline).

Matplotlib is imported on first use, so that importing the registry (the workflow does it at DAG build) stays
light.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import analysis
from .io import atomic_path

RUN_COLS = analysis.RUN_KEYS


class NotMeasured(Exception):
    """Raised by a section that has nothing to draw in this study although its measurement ran (e.g. attention maps of
    attention-free backbones); the report's closing page says why."""


class NotApplicable(Exception):
    """Raised by a section that does not apply to the study's design (paper 004 app. C in a study without
    weight-sharing or PCA variants): it is left out of the report."""


def section(title: str, reproduces: dict[str, str] | str = "", needs: tuple[str, ...] = ()):
    """Mark ``fn`` as a report section: its title, what it reproduces and the study tables it needs.

    ``reproduces`` maps a paper id ("004") to the item ("figs. 6-8"); the report names only the items of the papers
    the study declares (``studies.<s>.paper``). A plain string describes a section beyond the papers."""
    def mark(fn):
        fn.title, fn.reproduces, fn.needs = title, reproduces, tuple(needs)
        return fn
    return mark


def plt():
    """matplotlib's pyplot with the Agg backend and the report's style (imported once, on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    pyplot.rcParams.update({"figure.max_open_warning": 0, "figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3,
                            "font.size": 8})
    return pyplot


def layout_table(layout):
    """A comparison layout as a typeset table (diffbias.typeset, imported on first use)."""
    from .typeset import layout_table as build

    return build(layout)


def frame_table(df, **kwargs):
    """A data frame as a typeset table (diffbias.typeset, imported on first use)."""
    from .typeset import frame_table as build

    return build(df, **kwargs)


PNG_DPI = 150


def save_figure(ctx: dict, fig, name: str) -> None:
    """A figure as PNG under figures/ and as a vector page of the report, both cropped to the same tight box.

    The figure is drawn twice, not four times: once on the PNG canvas (cropped in memory to the tight box measured
    on that drawing), once into the report. ``savefig(bbox_inches="tight")`` draws a figure once to measure it and
    once to save it, and the report's figures were most of a report job's time."""
    figures_dir = Path(ctx["figures_dir"])
    figures_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(figures_dir / f"{name}.png") as tmp:
        box = tight_png(fig, tmp, dpi=PNG_DPI)
    ctx["pdf"].savefig(fig, bbox_inches=box)  # the document closes it once written


def tight_png(fig, path, dpi: float = PNG_DPI):
    """Write ``fig`` as a PNG cropped to its tight bounding box (matplotlib's ``bbox_inches="tight"`` with its
    ``savefig.pad_inches``) from one drawing; returns that box in inches, for the figure's other formats.

    Padding that reaches past the canvas is filled with the figure's background, as matplotlib's own re-rendering
    gives; only when something is drawn beyond the canvas does matplotlib render again, on a canvas the box's size."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    original_dpi = fig.dpi
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    try:
        fig.set_dpi(dpi)
        canvas.draw()
        tight = fig.get_tightbbox(canvas.get_renderer())
        box = tight.padded(matplotlib.rcParams["savefig.pad_inches"])
        pixels = np.asarray(canvas.buffer_rgba())
        height, width = pixels.shape[:2]
        inside = tight.x0 * dpi >= -0.5 and tight.y0 * dpi >= -0.5 and tight.x1 * dpi <= width + 0.5 \
            and tight.y1 * dpi <= height + 0.5
        if not inside:  # something drawn beyond the canvas
            fig.savefig(path, dpi=dpi, bbox_inches=box, format="png")
            return box
        x0, y0, x1, y1 = (box.extents * dpi).tolist()
        left, right = int(np.floor(x0)), int(np.ceil(x1))
        top, bottom = int(np.floor(height - y1)), int(np.ceil(height - y0))  # image rows count from the top
        background = np.round(np.asarray(matplotlib.colors.to_rgba(fig.get_facecolor())) * 255).astype(np.uint8)
        out = np.full((bottom - top, right - left, 4), background, dtype=np.uint8)
        rows, cols = slice(max(top, 0), min(bottom, height)), slice(max(left, 0), min(right, width))
        out[rows.start - top:rows.stop - top, cols.start - left:cols.stop - left] = pixels[rows, cols]
        Image.fromarray(out).save(path, format="png", dpi=(dpi, dpi))
    finally:
        fig.set_dpi(original_dpi)
    return box


def text_page(ctx: dict, title: str | None, lines: list[str] | str) -> None:
    """A page (or paragraph block) of text."""
    ctx["pdf"].text(title, lines.splitlines() if isinstance(lines, str) else lines)


def write_table(ctx: dict, name: str, layout_or_frame, fmt_frame: str = ".4g") -> None:
    """A comparison layout or a plain frame as Markdown and LaTeX under tables/."""
    tables_dir = Path(ctx["tables_dir"])
    tables_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(layout_or_frame, analysis.TableLayout):
        files = {f"{name}.md": analysis.format_table(layout_or_frame, "markdown"),
                 f"{name}.tex": analysis.format_table(layout_or_frame, "latex")}
    else:
        files = {f"{name}.md": layout_or_frame.to_markdown(index=False, floatfmt=fmt_frame) + "\n",
                 f"{name}.tex": layout_or_frame.to_latex(index=False, float_format=lambda v: format(v, fmt_frame))}
    for fname, text in files.items():
        with atomic_path(tables_dir / fname) as tmp:
            tmp.write_text(text)


def need(ctx: dict, *tables: str) -> None:
    missing = [t for t in tables if ctx.get(t) is None or len(ctx[t]) == 0]
    if missing:
        raise NotMeasured(f"no {', '.join(missing)} table (the measurement applies to none of the study's runs)")


def display(ctx: dict, variant: str) -> str:
    """A variant's label, prefixed with its block header where another variant of the study shares the label."""
    label = ctx["labels"].get(variant, variant)
    if sum(1 for v in ctx["study"]["variants"] if ctx["labels"].get(v, v) == label) > 1:
        header = next((b.header for b in ctx["blocks"] if variant in b.variants), "")
        return f"{header}: {label}" if header and header != label else f"{label} ({variant})"
    return label


def datasets(ctx: dict, frame: pd.DataFrame) -> list[str]:
    order = ctx["study"].get("datasets") or []
    present = list(frame["dataset"].unique())
    return [d for d in order if d in present] + sorted(d for d in present if d not in order)


def variants(ctx: dict, frame: pd.DataFrame) -> list[str]:
    return [v for b in ctx["blocks"] for v in b.variants if v in set(frame["variant"])]


def first_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """One run per (dataset, variant, N): the lowest random seed (figures of maps show one model per cell)."""
    return frame[RUN_COLS].drop_duplicates().sort_values("seed").groupby(["dataset", "variant", "N"], as_index=False).first()


def by_variant_then_n(ctx: dict, frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` sorted in the study's variant order, then by N."""
    order = {v: i for i, v in enumerate(variants(ctx, frame))}
    return runs.sort_values(["variant", "N"], key=lambda s: s.map(order) if s.name == "variant" else s)


def comparison(ctx: dict, frame: pd.DataFrame, value: str, digits: int, lower_is_better: bool = True):
    """The paper layout (columns data set x N, one block per baseline) of the per-run mean of ``value``."""
    long = analysis.compare(analysis.per_run_mean(frame, value), ctx["study"], value, lower_is_better)
    return analysis.layout_comparison(long, ctx["study"], digits=digits, datasets=datasets(ctx, frame))


def reduced_variants(ctx: dict) -> set[str]:
    """Paper 004 app. C: the parameter-reduction variants (weight sharing, PCA attention), their baselines and every
    variant compared with those baselines; empty when the study has none."""
    specs = ctx["study"].get("variant_specs", {})
    reduced = [v for v, s in specs.items() if (s.get("options") or {}).get("share_blocks")
               or (s.get("options") or {}).get("pca_layers")]
    if not reduced:
        return set()
    base = analysis.resolve_baselines(ctx["study"])
    theirs = {base[r] for r in reduced if base.get(r)}
    return set(reduced) | theirs | {v for v in specs if base.get(v) in theirs}


def tile(images: np.ndarray) -> np.ndarray:
    """(k, C, H, W) uint8 -> one square-ish grid image (H', W') or (H', W', C)."""
    k = int(np.ceil(np.sqrt(len(images))))
    c, h, w = images.shape[1:]
    grid = np.zeros((k * h, k * w, c), dtype=images.dtype)
    for idx, im in enumerate(images):
        grid[(idx // k) * h:(idx // k + 1) * h, (idx % k) * w:(idx % k + 1) * w] = im.transpose(1, 2, 0)
    return grid.squeeze(-1) if c == 1 else grid


def space_note(table: pd.DataFrame, what: str) -> str:
    """Where a per-run measurement ran (its ``space`` column): pixels, or a latent run's autoencoder latents."""
    spaces = set(table["space"]) if "space" in table else {"pixel"}  # tables from before the column: pixels
    if spaces == {"pixel"}:
        return f"{what} in pixel space."
    if spaces == {"latent"}:
        return (f"{what} in latent space: on the autoencoder's scaled latents the models train on "
                "(datasets.<d>.latents), not on images.")
    return f"{what} in pixel space for some data sets and in latent space for others (column 'space' of the tables)."
