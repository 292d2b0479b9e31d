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
    # Streamed into the zip one array at a time (as numpy.savez writes them): a paper-scale study's arrays need not
    # fit in memory. Stored, not deflated (io.write_npz: deflating the attention maps took most of this job).
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
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
    (dataset, N), and whether it is the best mean of its (block, dataset, N) column.

    Also each cell's 95 % interval (``low``, ``high``, ``basis``: :func:`summarise`, from ``per_run``'s own
    ``low``/``high`` columns when it has them) and ``resolved``: whether its difference from its baseline is resolved
    by :data:`COMPARISON_RULE` ("lower", "higher", or "" when unresolved)."""
    intervals = per_run[RUN_KEYS + [value] + [c for c in ("low", "high") if c in per_run]].rename(columns={value: "value"})
    stats = summarise(intervals)
    baseline = resolve_baselines(study)
    block_of = {v: i for i, b in enumerate(variant_blocks(study)) for v in b.variants}
    stats = stats[stats["variant"].isin(block_of)].copy()
    stats["block"] = stats["variant"].map(block_of)
    stats["baseline"] = stats["variant"].map(baseline)
    stats["label"] = stats["variant"].map(lambda v: study.get("labels", {}).get(v, v))
    cells = stats.set_index(["dataset", "variant", "N"])
    yard = yardsticks(stats, study)
    changes, resolved = [], []
    for r in stats.itertuples():
        key = (r.dataset, r.baseline, r.N)
        has_base = r.baseline not in (None, r.variant) and key in cells.index
        base = cells.loc[key, "mean"] if has_base else np.nan
        changes.append(100.0 * (r.mean - base) / base if np.isfinite(base) and base != 0 else np.nan)
        outcome = resolve(r._asdict(), cells.loc[key].to_dict(), yard.get((r.dataset, r.N))) if has_base else 0
        resolved.append({-1: "lower", 1: "higher", 0: ""}[outcome])
    stats["change_pct"] = changes
    stats["resolved"] = resolved
    column = stats.groupby(["block", "dataset", "N"])["mean"]
    stats["best"] = stats["mean"] == (column.transform("min") if lower_is_better else column.transform("max"))
    stats["best"] &= column.transform("count") > 1  # a single row is not "best" of anything
    return stats.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------
# Intervals and the comparison rule
# ----------------------------------------------------------------------------------------------------

CONFIDENCE = 0.95
COMPARISON_RULE = (
    "A difference is resolved only when the two 95 % intervals do not overlap. With several seeds the interval is "
    "the t-interval of the mean over seeds (seeds change the training images, the initialisation and the evaluation "
    "noise). With one seed it is each run's own interval over its evaluation images or samples (bootstrap), which "
    "covers evaluation noise only: another training seed could change the result; where the study has the "
    "baseline's split-B twin (the same recipe on N other images), the difference must also exceed the baseline's "
    "difference from its twin, one draw of what a change of training data alone does. Non-overlap is conservative: "
    "it resolves fewer differences than a test on the difference would.")


def summarise(per_run: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, variant, N) of a per-run frame (run keys, ``value``, optional ``low``/``high``): mean, std and
    number of seeds, and a 95 % interval with its basis:

    - ``basis="seeds"`` (2 or more seeds): the t-interval of the mean over seeds;
    - ``basis="images"`` (one seed): the run's own ``low``/``high`` (evaluation noise only);
    - ``basis="none"``: one seed and no interval of its own (low/high NaN)."""
    from scipy.stats import t as student_t

    rows = []
    for (d, v, n), sub in per_run.groupby(["dataset", "variant", "N"], sort=True):
        values = sub["value"].to_numpy(dtype=float)
        mean, seeds = float(values.mean()), len(values)
        std = float(values.std(ddof=1)) if seeds > 1 else np.nan
        if seeds > 1:
            half = float(student_t.ppf(0.5 + CONFIDENCE / 2, seeds - 1)) * std / np.sqrt(seeds)
            low, high, basis = mean - half, mean + half, "seeds"
        elif {"low", "high"} <= set(sub) and np.isfinite(sub["low"].iloc[0]) and np.isfinite(sub["high"].iloc[0]):
            low, high, basis = float(sub["low"].iloc[0]), float(sub["high"].iloc[0]), "images"
        else:
            low, high, basis = np.nan, np.nan, "none"
        rows.append({"dataset": d, "variant": v, "N": n, "mean": mean, "std": std, "seeds": seeds, "low": low,
                     "high": high, "basis": basis})
    return pd.DataFrame(rows, columns=["dataset", "variant", "N", "mean", "std", "seeds", "low", "high", "basis"])


def resolve(a: Mapping, b: Mapping, yardstick: float | None = None) -> int:
    """:data:`COMPARISON_RULE` on two :func:`summarise` cells: -1 when a is resolved lower than b, +1 higher, 0 when
    unresolved (intervals overlap or missing, or, with one seed, a difference within ``yardstick``)."""
    lows, highs = (a["low"], b["low"]), (a["high"], b["high"])
    if not all(np.isfinite(x) for x in (*lows, *highs)):
        return 0
    if a["basis"] != "seeds" and b["basis"] != "seeds" and yardstick is not None and np.isfinite(yardstick):
        if abs(a["mean"] - b["mean"]) <= yardstick:
            return 0
    if a["high"] < b["low"]:
        return -1
    if a["low"] > b["high"]:
        return 1
    return 0


def yardsticks(cells: pd.DataFrame, study: dict) -> dict[tuple, float]:
    """Per (dataset, N): |baseline - its split-B twin| (study["twins"]), the largest over the study's baselines with
    a twin; empty when the study has no twin of a baseline."""
    twins = {b: t for b, t in (study.get("twins") or {}).items() if b in baselines_of(study) or not baselines_of(study)}
    index = cells.set_index(["dataset", "variant", "N"])["mean"]
    out: dict[tuple, float] = {}
    for base, twin in twins.items():
        for (d, v, n), value in index.items():
            if v == base and (d, twin, n) in index.index:
                out[(d, n)] = max(out.get((d, n), 0.0), abs(value - index[(d, twin, n)]))
    return out


def interval_text(cell: Mapping, digits: int) -> str:
    """``mean [low, high]`` (one seed with an interval), ``mean ± std`` (several seeds) or ``mean``."""
    if cell["basis"] == "images":
        return f"{cell['mean']:.{digits}f} [{cell['low']:.{digits}f}, {cell['high']:.{digits}f}]"
    return format_value(cell["mean"], cell["std"], int(cell["seeds"]), digits)


def basis_note(cells: pd.DataFrame) -> str:
    """One sentence on what the intervals of these cells cover."""
    bases = set(cells["basis"])
    if bases == {"seeds"}:
        return f"Intervals over {int(cells['seeds'].min())}-{int(cells['seeds'].max())} seeds."
    if "seeds" not in bases:
        return ("One training seed: every interval is over evaluation images or samples and covers evaluation noise "
                "only; no verdict here says more than that.")
    return "Some cells have several seeds (intervals over seeds), others one (intervals over evaluation images only)."


# ----------------------------------------------------------------------------------------------------
# Claims: what a study says the papers found, tested against what it measured
# ----------------------------------------------------------------------------------------------------

VERDICTS = ("reproduced", "contradicted", "unresolved at this precision", "not measured")


def claim_side(side) -> dict:
    """A claim's side as a selector: a variant name, or ``{variant, N}`` with either or both."""
    return {"variant": side} if isinstance(side, str) else {k: side[k] for k in ("variant", "N") if k in side}


def claim_sides(claim: dict) -> tuple[str, dict, list[dict]]:
    """(direction "lower"/"higher", the side claimed lower/higher, the sides it is compared with)."""
    direction = "lower" if "lower" in claim else "higher"
    than = claim["than"] if isinstance(claim["than"], list) else [claim["than"]]
    return direction, claim_side(claim[direction]), [claim_side(t) for t in than]


def claim_cells(claim: dict, study: dict) -> list[tuple[str, dict, dict]]:
    """Every comparison a claim makes: (dataset, side a, side b) with both sides complete ({variant, N}). Keys a
    side leaves open range over the claim's ``variants`` / ``N`` (default: the study's); ``datasets`` likewise."""
    _, a, others = claim_sides(claim)
    datasets = claim.get("datasets") or study.get("datasets") or []
    ns = claim.get("N") or study["N"]
    variants = claim.get("variants") or study["variants"]
    cells = []
    for d in datasets:
        for b in others:
            free = [{"variant": v} for v in variants] if "variant" not in a else [{"N": n} for n in ns] \
                if "N" not in a else [{}]
            for extra in free:
                cells.append((d, {**extra, **a}, {**extra, **b}))
    return cells


def evaluate_claims(claims: list[dict], values: dict[str, pd.DataFrame], study: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Verdicts of a study's claims from its measured quantities (``values[name]``: a per-run frame, run keys +
    ``value`` [+ ``low``/``high``], as Quantity.per_run returns it), by :data:`COMPARISON_RULE`.

    Returns (one row per claim: text, quantity, comparisons, for/against/unresolved counts, verdict, basis;
    one row per comparison). A claim is *reproduced* when every comparison is resolved in its direction,
    *contradicted* when any is resolved against it, otherwise *unresolved at this precision*; *not measured* when
    none of its comparisons has both sides measured."""
    labels = study.get("labels", {})
    summary_rows, detail_rows = [], []
    for i, claim in enumerate(claims, 1):
        direction, _, _ = claim_sides(claim)
        frame = values.get(claim["quantity"])
        cells = summarise(frame) if frame is not None and len(frame) else summarise(pd.DataFrame(columns=RUN_KEYS + ["value"]))
        index = cells.set_index(["dataset", "variant", "N"])
        yard = yardsticks(cells, study)
        outcomes, bases = [], set()
        for d, a, b in claim_cells(claim, study):
            ka, kb = (d, a["variant"], a["N"]), (d, b["variant"], b["N"])
            if ka not in index.index or kb not in index.index:
                continue
            ca, cb = index.loc[ka].to_dict(), index.loc[kb].to_dict()
            ys = [yard[k] for k in ((d, a["N"]), (d, b["N"])) if k in yard]
            outcome = resolve(ca, cb, max(ys) if ys else None)
            agrees = outcome == (-1 if direction == "lower" else 1)
            result = "for" if agrees else "unresolved" if outcome == 0 else "against"
            outcomes.append(result)
            bases |= {ca["basis"], cb["basis"]}
            detail_rows.append({
                "claim": i, "dataset": d,
                "a": f"{labels.get(a['variant'], a['variant'])}, N={a['N']}",
                "b": f"{labels.get(b['variant'], b['variant'])}, N={b['N']}",
                "a_value": interval_text(ca, 4), "b_value": interval_text(cb, 4),
                "difference": ca["mean"] - cb["mean"], "yardstick": max(ys) if ys else np.nan, "outcome": result})
        if not outcomes:
            verdict = "not measured"
        elif "against" in outcomes:
            verdict = "contradicted"
        elif all(o == "for" for o in outcomes):
            verdict = "reproduced"
        else:
            verdict = "unresolved at this precision"
        basis = ("seeds" if bases == {"seeds"} else "one seed: evaluation noise only" if bases and "seeds" not in bases
                 else "mixed" if bases else "")
        source = " ".join(x for x in (f"paper {claim['paper']}" if claim.get("paper") else "", claim.get("item", "")) if x)
        summary_rows.append({
            "claim": i, "source": source, "text": claim["text"], "quantity": claim["quantity"],
            "direction": direction, "comparisons": len(outcomes), "for": outcomes.count("for"),
            "against": outcomes.count("against"), "unresolved": outcomes.count("unresolved"), "verdict": verdict,
            "basis": basis})
    return pd.DataFrame(summary_rows), pd.DataFrame(detail_rows)


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


RESOLVED_MARK = "*"  # a change against the baseline resolved by COMPARISON_RULE


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
                text = interval_text(r, digits) if "basis" in r else format_value(r["mean"], r["std"], int(r["seeds"]), digits)
                cells.append(Cell(text, bool(r["best"])))
                mark = RESOLVED_MARK if r.get("resolved") else ""  # resolved against its baseline (COMPARISON_RULE)
                change.append(Cell(f"{r['change_pct']:+.2f}%{mark}" if np.isfinite(r["change_pct"]) else ""))
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
