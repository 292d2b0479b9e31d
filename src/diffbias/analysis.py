"""Study-level tables: tidy aggregation of per-run parquet files and the paper-style summaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .io import read_parquet_metadata, write_parquet

RUN_KEYS = ["dataset", "variant", "N", "seed"]


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


def gap_summary(psnr: pd.DataFrame) -> pd.DataFrame:
    """Mean PSNR gap over the respaced steps, per run, then mean and std over seeds per (variant, N)."""
    per_run = psnr.groupby(RUN_KEYS + ["label"], as_index=False)["gap"].mean()
    summary = per_run.groupby(["dataset", "variant", "label", "N"], as_index=False)["gap"].agg(["mean", "std", "count"])
    summary = summary.rename(columns={"mean": "gap_mean", "std": "gap_std", "count": "seeds"})
    return summary


def gap_table(summary: pd.DataFrame, variants: list[str], baseline: str | None) -> pd.DataFrame:
    """Paper layout: one row per variant (in study order), one column per N; % change vs the baseline row."""
    wide = summary.pivot_table(index="variant", columns="N", values="gap_mean").reindex(variants)
    labels = summary.drop_duplicates("variant").set_index("variant")["label"]
    rows = []
    for v in variants:
        values = wide.loc[v]
        row = {"model": labels.get(v, v)}
        for n, value in values.items():
            row[f"N={n}"] = value
            if baseline is not None and v != baseline:
                base = wide.loc[baseline, n]
                row[f"N={n} change"] = 100.0 * (value - base) / base if base and np.isfinite(base) and base != 0 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame, fmt: str = "markdown") -> str:
    """Render gap_table as Markdown or LaTeX: value, and '(+x.xx%)' where a change exists."""
    n_cols = [c for c in table.columns if c.startswith("N=") and not c.endswith("change")]
    header = ["Model"] + [c.replace("N=", "N = ") for c in n_cols]
    body = []
    for _, row in table.iterrows():
        cells = [str(row["model"])]
        for c in n_cols:
            v = row[c]
            cell = "n/a" if pd.isna(v) else f"{v:.4f}"
            ch = row.get(f"{c} change")
            if ch is not None and not pd.isna(ch):
                cell += f" ({ch:+.2f}%)"
            cells.append(cell)
        body.append(cells)
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        esc = lambda s: s.replace("%", r"\%").replace("_", r"\_")  # noqa: E731
        lines = [r"\begin{tabular}{l" + "r" * len(n_cols) + "}", r"\toprule", " & ".join(map(esc, header)) + r" \\", r"\midrule"]
        lines += [" & ".join(esc(c) for c in r) + r" \\" for r in body]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise ValueError(f"unknown table format {fmt!r}")
