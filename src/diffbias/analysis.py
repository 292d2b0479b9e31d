"""Study-level tables: tidy aggregation of per-run files and the paper-style comparison tables.

Comparison tables follow paper 004 tables 1-3: one column block per data set (one column per N inside it),
rows grouped into blocks, one block per baseline (a header row with the baseline's label, as the paper's
"DiT-XS/1" block), each row the mean +- std over seeds, the best value of each column within a block in bold,
and under every compared row its % change against its own baseline. Rows are keyed by variant, never by
display label, so two variants both labelled "w/ Local" (DiT-XS/1 and DiT-S/1) stay apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .io import atomic_path, read_parquet_metadata, write_parquet

RUN_KEYS = ["dataset", "variant", "N", "seed"]
ARRAY_KEY_SEPARATOR = "::"  # "<dataset>/<variant>/N<n>/seed<seed>::<array name>" in a study-level array pack


def aggregate_parquets(inputs: list[str], out: str | Path, study: dict) -> pd.DataFrame:
    """Concatenate per-run tables (each already carries its run keys); keep each run's provenance."""
    frames, provenance = [], {}
    for path in inputs:
        df = pd.read_parquet(path)
        meta = read_parquet_metadata(path)
        if not set(RUN_KEYS) <= set(df.columns):
            run = meta.get("spec", {}).get("run", {})
            for key in RUN_KEYS:
                df[key] = run.get(key)
        frames.append(df)
        key = "/".join(str(df[k].iloc[0]) for k in RUN_KEYS) if len(df) else str(path)
        provenance[key] = meta.get("provenance")
    table = pd.concat(frames, ignore_index=True)
    labels = study.get("labels", {})
    table["label"] = table["variant"].map(lambda v: labels.get(v, v))
    write_parquet(table, out, {"study": study, "runs": provenance})
    return table


# ----------------------------------------------------------------------------------------------------
# Per-run arrays -> one study-level pack (the report reads only files its rule declares)
# ----------------------------------------------------------------------------------------------------


def aggregate_arrays(inputs: list[str], runs: list[str], out: str | Path, max_items: int | None = None) -> list[str]:
    """Pack per-run ``.npz`` files into one ``.npz`` keyed ``"<run>::<array>"``, run = dataset/variant/N<n>/seed<s>.

    ``inputs[i]`` belongs to ``runs[i]`` (the workflow passes both from the same list). ``max_items`` keeps the
    first items along the first axis of arrays with at least two dimensions (a preview of a large sample set).
    Returns the keys written.
    """
    if len(inputs) != len(runs):
        raise ValueError(f"{len(inputs)} input files but {len(runs)} run keys")
    import zipfile

    written = []
    # Streamed into the zip one array at a time (as numpy.savez_compressed writes them): a paper-scale study's
    # arrays need not fit in memory.
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            for path, run in zip(inputs, runs):
                with np.load(path, allow_pickle=False) as data:
                    for name in data.files:
                        array = data[name]
                        if max_items is not None and array.ndim >= 2:
                            array = array[:max_items]
                        key = f"{run}{ARRAY_KEY_SEPARATOR}{name}"
                        with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                            np.lib.format.write_array(fh, np.asarray(array), allow_pickle=False)
                        written.append(key)
            with zf.open("__runs__.npy", "w") as fh:
                np.lib.format.write_array(fh, np.array(json.dumps(list(runs))), allow_pickle=False)
    return written


class RunArrays(Mapping):
    """One run's arrays in an open study-level pack, read from the file on access (packs can be large)."""

    def __init__(self, pack, run: str, names: list[str]):
        self._pack, self._run, self._names = pack, run, names

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        return self._pack[f"{self._run}{ARRAY_KEY_SEPARATOR}{name}"]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def unpack_arrays(pack) -> dict[str, RunArrays]:
    """An open study-level pack (``np.load``) -> {run: {array name: array}}; arrays are read when used."""
    names: dict[str, list[str]] = {}
    for key in pack.files:
        if ARRAY_KEY_SEPARATOR in key:
            run, name = key.split(ARRAY_KEY_SEPARATOR, 1)
            names.setdefault(run, []).append(name)
    return {run: RunArrays(pack, run, n) for run, n in names.items()}


def parse_run(run: str) -> tuple[str, str, int, int]:
    """'<dataset>/<variant>/N<n>/seed<s>' -> (dataset, variant, n, seed)."""
    dataset, variant, n, seed = run.split("/")
    return dataset, variant, int(n.removeprefix("N")), int(seed.removeprefix("seed"))


def run_key(dataset, variant, n, seed) -> str:
    return f"{dataset}/{variant}/N{int(n)}/seed{int(seed)}"




# ----------------------------------------------------------------------------------------------------
# Baselines: one per backbone and preset
# ----------------------------------------------------------------------------------------------------


def baselines_of(study: dict) -> list[str]:
    """The study's `baseline` entry (a variant name, a list of them, or absent) as a list."""
    base = study.get("baseline")
    names = [] if base is None else [base] if isinstance(base, str) else list(base)
    unknown = [b for b in names if b not in study["variants"]]
    if unknown:
        raise ValueError(f"study {study.get('name')!r}: baseline(s) {unknown} are not among its variants")
    return names


def _architecture(study: dict, variant: str) -> tuple:
    spec = study.get("variant_specs", {}).get(variant, {})
    return spec.get("backbone", variant), spec.get("preset")


def resolve_baselines(study: dict) -> dict[str, str | None]:
    """Each variant's baseline: the listed baseline with the same backbone and preset (variant_specs).

    A baseline is its own baseline. A variant whose architecture has no listed baseline is compared with the
    study's only baseline when it lists exactly one (a cross-backbone comparison such as paper 002's DiT vs
    DICE); with several listed it has none, so DiT-S/1 is never measured against DiT-XS/1.
    """
    names = baselines_of(study)
    resolved: dict[str, str | None] = {}
    for v in study["variants"]:
        same = [b for b in names if _architecture(study, b) == _architecture(study, v)]
        resolved[v] = v if v in names else same[0] if same else names[0] if len(names) == 1 else None
    return resolved


@dataclass
class Block:
    """Rows compared with one baseline (header: the baseline's label), in study order."""

    header: str
    baseline: str | None
    variants: list[str] = field(default_factory=list)


def variant_blocks(study: dict) -> list[Block]:
    labels = study.get("labels", {})
    blocks: dict[object, Block] = {}
    for v, base in resolve_baselines(study).items():
        key = base if base is not None else ("unbaselined",) + _architecture(study, v)
        if key not in blocks:
            header = labels.get(base, base) if base is not None else (_architecture(study, v)[1] or _architecture(study, v)[0])
            blocks[key] = Block(header=str(header), baseline=base)
        blocks[key].variants.append(v)
    for block in blocks.values():  # the baseline row opens its block
        if block.baseline in block.variants:
            block.variants.remove(block.baseline)
            block.variants.insert(0, block.baseline)
    return list(blocks.values())


# ----------------------------------------------------------------------------------------------------
# Comparison tables
# ----------------------------------------------------------------------------------------------------


def per_run_mean(table: pd.DataFrame, value: str) -> pd.DataFrame:
    """One number per run: the mean of `value` over the run's rows (e.g. the PSNR gap over the respaced steps)."""
    return table.groupby(RUN_KEYS, as_index=False)[value].mean()


def compare(per_run: pd.DataFrame, study: dict, value: str, lower_is_better: bool = True) -> pd.DataFrame:
    """Long comparison table: per (dataset, variant, N) the mean, std and count over seeds of `value`, the
    variant's block and baseline, the % change of the mean against its own baseline's mean at the same
    (dataset, N), and whether it is the best mean of its (block, dataset, N) column."""
    stats = per_run.groupby(["dataset", "variant", "N"], as_index=False)[value].agg(["mean", "std", "count"])
    stats = stats.rename(columns={"count": "seeds"})
    baseline = resolve_baselines(study)
    block_of = {v: i for i, b in enumerate(variant_blocks(study)) for v in b.variants}
    stats = stats[stats["variant"].isin(block_of)].copy()
    stats["block"] = stats["variant"].map(block_of)
    stats["baseline"] = stats["variant"].map(baseline)
    stats["label"] = stats["variant"].map(lambda v: study.get("labels", {}).get(v, v))
    base_mean = stats.set_index(["dataset", "variant", "N"])["mean"]
    changes = []
    for r in stats.itertuples():
        base = base_mean.get((r.dataset, r.baseline, r.N), np.nan) if r.baseline not in (None, r.variant) else np.nan
        changes.append(100.0 * (r.mean - base) / base if np.isfinite(base) and base != 0 else np.nan)
    stats["change_pct"] = changes
    column = stats.groupby(["block", "dataset", "N"])["mean"]
    stats["best"] = stats["mean"] == (column.transform("min") if lower_is_better else column.transform("max"))
    stats["best"] &= column.transform("count") > 1  # a single row is not "best" of anything
    return stats.reset_index(drop=True)


def gap_summary(psnr: pd.DataFrame) -> pd.DataFrame:
    """Mean PSNR gap over the respaced steps, per run, then mean and std over seeds per (dataset, variant, N)."""
    per_run = psnr.groupby(RUN_KEYS + ["label"], as_index=False)["gap"].mean()
    summary = per_run.groupby(["dataset", "variant", "label", "N"], as_index=False)["gap"].agg(["mean", "std", "count"])
    return summary.rename(columns={"mean": "gap_mean", "std": "gap_std", "count": "seeds"})


def gap_table(psnr: pd.DataFrame, study: dict) -> pd.DataFrame:
    """Paper 004 figs. 6-8 as a table: the mean PSNR gap per run (over the respaced steps), compared per data set."""
    return compare(per_run_mean(psnr, "gap"), study, "gap", lower_is_better=True)


@dataclass
class Cell:
    text: str
    bold: bool = False


@dataclass
class TableLayout:
    """A typeset-ready table: column groups (data set -> N values), then rows.

    Each row is ("block", header) or ("row", label, cells) or ("change", label, cells); cells line up with
    the flattened (group, N) columns.
    """

    groups: list[tuple[str, list[int]]]
    rows: list[tuple]
    caption: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[tuple[str, int]]:
        return [(g, n) for g, ns in self.groups for n in ns]


def format_value(mean: float, std: float, seeds: int, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if seeds > 1 and np.isfinite(std) else "")


def layout_comparison(long: pd.DataFrame, study: dict, digits: int = 4, caption: str = "",
                      datasets: list[str] | None = None) -> TableLayout:
    """The paper layout of a :func:`compare` table (columns: data set x N; blocks of rows per baseline)."""
    present = set(long["dataset"])
    datasets = datasets or [d for d in study.get("datasets", []) if d in present] or sorted(present)
    groups = [(d, sorted(int(n) for n in long.loc[long["dataset"] == d, "N"].unique())) for d in datasets]
    cols = [(d, n) for d, ns in groups for n in ns]
    index = long.set_index(["variant", "dataset", "N"])
    rows: list[tuple] = []
    blocks = variant_blocks(study)
    for block in blocks:
        present = [v for v in block.variants if v in set(long["variant"])]
        if not present:
            continue
        if len(blocks) > 1 or block.baseline is None:
            rows.append(("block", block.header))
        for v in present:
            cells, change = [], []
            for d, n in cols:
                if (v, d, n) not in index.index:
                    cells.append(Cell("—")), change.append(Cell(""))
                    continue
                r = index.loc[(v, d, n)]
                cells.append(Cell(format_value(r["mean"], r["std"], int(r["seeds"]), digits), bool(r["best"])))
                change.append(Cell(f"{r['change_pct']:+.2f}%" if np.isfinite(r["change_pct"]) else ""))
            label = study.get("labels", {}).get(v, v)
            rows.append(("row", label, cells))
            if any(c.text for c in change):
                base = block.baseline
                rows.append(("change", f"  vs {study.get('labels', {}).get(base, base)}", change))
    return TableLayout(groups=groups, rows=rows, caption=caption)


def format_table(layout: TableLayout, fmt: str = "markdown") -> str:
    """A :class:`TableLayout` as Markdown or LaTeX (booktabs; bold best values, change rows in italics)."""
    cols = layout.columns
    if fmt == "markdown":
        header = ["Model"] + [f"{d} N = {n}" for d, n in cols]
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(cols) + "|"]
        for row in layout.rows:
            if row[0] == "block":
                lines.append(f"| **{row[1]}** |" + " |" * len(cols))
            else:
                cells = [f"**{c.text}**" if c.bold else (f"*{c.text}*" if row[0] == "change" and c.text else c.text)
                         for c in row[2]]
                lines.append("| " + " | ".join([row[1].strip()] + cells) + " |")
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        esc = lambda s: s.replace("%", r"\%").replace("_", r"\_").replace("±", r"$\pm$").replace("#", r"\#")  # noqa: E731
        lines = [r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule"]
        spans = [rf"\multicolumn{{{len(ns)}}}{{c}}{{{esc(d)}}}" for d, ns in layout.groups]
        lines.append("Model & " + " & ".join(spans) + r" \\")
        start = 2
        rules = []
        for _, ns in layout.groups:
            rules.append(rf"\cmidrule(lr){{{start}-{start + len(ns) - 1}}}")
            start += len(ns)
        lines.append(" ".join(rules))
        lines.append(" & " + " & ".join(f"$N={n}$" for _, n in cols) + r" \\")
        lines.append(r"\midrule")
        for row in layout.rows:
            if row[0] == "block":
                lines.append(rf"\multicolumn{{{len(cols) + 1}}}{{l}}{{\textit{{{esc(row[1])}}}}} \\")
                continue
            cells = [rf"\textbf{{{esc(c.text)}}}" if c.bold else (rf"\textit{{{esc(c.text)}}}" if row[0] == "change" and c.text
                                                                   else esc(c.text)) for c in row[2]]
            lines.append(" & ".join([esc(row[1].strip())] + cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown table format {fmt!r}")
