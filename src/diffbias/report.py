"""Paper-style figures, tables and a typeset PDF report per study.

The report reads only the files its rule declares (workflow/rules/report.smk): the study tables
``<study_dir>/<table>.parquet`` and the study-level array packs ``<study_dir>/arrays/<measurement>.npz``. It writes the
PDF, ``<study_dir>/figures/`` (PNG of every figure) and ``<study_dir>/tables/`` (Markdown and LaTeX tables, and
``report_sections.json``, the contents as data).

Sections: the overview, then every registered measurement's sections in registry order (each measurement declares
its own, :mod:`diffbias.measurements`), then the model cost and the training log, which every study has. The contents
page lists what the study drew, each section with the items of the study's papers it reproduces
(``studies.<s>.paper``); the closing page says what the config switched off and which sections had nothing to draw.

Layout: :mod:`diffbias.typeset`, matplotlib-drawn pages (booktabs tables, wrapped text, a contents page). Chosen
over ReportLab because every figure is already a matplotlib figure and its PDF backend keeps them vector with no
conversion step (ReportLab would need svglib to embed vector plots): no new dependency.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import analysis, measurements
from .io import atomic_path, read_parquet_metadata
from .sections import (RUN_COLS, NotApplicable, NotMeasured, datasets, display, plt, save_figure, section, text_page,
                       write_table)
from .typeset import Document, frame_table


def describe(reproduces: dict[str, str] | str, papers: list[str]) -> str:
    """What a section reproduces, for this study: the items of its papers; a section that reproduces items of other
    papers only is this study's addition ("beyond paper 000; cf. paper 004 fig. 4")."""
    if isinstance(reproduces, str):
        return reproduces
    mine = [f"paper {p} {reproduces[p]}" for p in papers if p in reproduces]
    if mine:
        return "reproduces " + "; ".join(mine)
    others = "; ".join(f"paper {p} {item}" for p, item in reproduces.items())
    where = f"paper {', '.join(papers)}" if papers else "the study's papers"
    return f"beyond {where} (cf. {others})" if others else ""


# ----------------------------------------------------------------------------------------------------
# Sections every study has
# ----------------------------------------------------------------------------------------------------


def data_space(study: dict) -> list[str]:
    """One line per latent data set: where its models and per-run measurements work, and what its FID sees."""
    from .latents import model_input

    lines = []
    for name, ds in (study.get("dataset_specs") or {}).items():
        if ds.get("latents"):
            channels, side = model_input(ds)
            lat = ds["latents"]
            lines.append(f"{name} is a latent data set: {ds['resolution']}x{ds['resolution']} images encoded once by the "
                         f"autoencoder at {lat['autoencoder']} (posterior {lat.get('posterior', 'mean')}) into "
                         f"{channels}x{side}x{side} latents. The models train on the latents, and the per-run "
                         "measurements of the models' inputs run in latent space (column 'space' of their tables); "
                         "samples are decoded to images, scored against real images at "
                         f"{ds['resolution']}x{ds['resolution']}.")
    return lines


@section("Overview", "the study's setting: variants, baselines, data, scale and provenance", needs=("train_log",))
def section_overview(ctx: dict) -> None:
    study, log = ctx["study"], ctx["train_log"]
    meta = read_parquet_metadata(ctx["study_dir"] / "train_log.parquet")
    runs = meta.get("runs", {})
    first = next(iter(runs.values()), None) or {}
    papers = ", ".join(study.get("papers") or []) or "none declared (studies.<s>.paper)"
    findings = [line for m in measurements.load().values() if m.findings for line in m.findings(ctx)]
    paras = [
        f"Study: {study['name']} — {study.get('title', '')}",
        f"Papers reproduced: {papers}.",
        f"Data set(s): {', '.join(datasets(ctx, log))}.  N: {', '.join(map(str, study['N']))}.  "
        f"Seeds: {', '.join(map(str, study['seeds']))}.  Runs: {len(runs)}.",
        *data_space(study),
        "Scale: " + study.get("scale_note", ""),
        *(["What this study can and cannot show: " + study["summary"]] if study.get("summary") else []),
        *findings,
        "Provenance (first run; every run's is in the parquet metadata): "
        f"git commit {first.get('git_commit')} dirty={first.get('git_dirty')}; device {json.dumps(first.get('device'))}; "
        f"packages {json.dumps(first.get('packages'))}",
    ]
    ctx["pdf"].text(f"diffbias report: {study['name']}", paras)
    baseline = analysis.resolve_baselines(study)
    rows = [{"variant": v, "label": ctx["labels"].get(v, v), "backbone": spec.get("backbone"), "preset": spec.get("preset"),
             "baseline": baseline.get(v) or "—",
             "options": json.dumps({k: o for k, o in (spec.get("options") or {}).items() if o not in (None, False, "")})}
            for v, spec in study.get("variant_specs", {}).items()]
    if rows:
        ctx["pdf"].table("Variants and their baselines", frame_table(pd.DataFrame(rows)),
                         caption="Each variant is compared with the baseline of its own backbone and preset "
                                 "(studies.<study>.baseline, a variant or a list of them).")


@section("Model cost: parameters, GFLOPs, throughput", {"002": "table 2 (static metrics)", "000": "table 2 (FLOPs)",
                                                         "003": "table 1 (total images and total GFLOPs columns)"},
         needs=("counts",))
def section_costs(ctx: dict) -> None:
    counts = ctx["counts"]
    per = counts[["variant", "params", "gmacs"]].copy()
    per["params (M)"] = per.pop("params") / 1e6
    # paper 003 table 1: total images = training steps x batch size, total GFLOPs = total images x GFLOPs per image
    specs = ctx["study"].get("variant_specs", {})
    images = per["variant"].map(lambda v: (specs.get(v, {}).get("steps") or 0) * (specs.get(v, {}).get("batch_size") or 0))
    per["total images (M)"] = images / 1e6
    per["total GFLOPs"] = images * per["gmacs"]
    per = per.rename(columns={"gmacs": "GFLOPs"})
    log = ctx.get("train_log")
    if log is not None and len(log):
        last = log.sort_values("step").groupby(RUN_COLS, as_index=False).last()
        train = last.groupby("variant", as_index=False).agg(train_img_s=("images_per_s", "median"),
                                                           peak_mem_mb=("peak_memory_mb", "max"))
        per = per.merge(train, on="variant", how="left")
    for m in measurements.load().values():  # e.g. sampling images/s from the FID runs
        extra = m.cost_columns(ctx) if m.cost_columns else None
        if extra is not None:
            per = per.merge(extra, on="variant", how="left")
    order = {v: i for i, v in enumerate(ctx["study"]["variants"])}
    per = per.sort_values("variant", key=lambda s: s.map(order))
    per.insert(0, "model", per.pop("variant").map(lambda v: display(ctx, v)))
    write_table(ctx, "cost", per, ".3f")
    memory = log["memory_kind"].iloc[0] if log is not None and "memory_kind" in log and len(log) else "n/a"
    ctx["pdf"].table("Parameters, FLOPs and throughput", frame_table(
        per, formats={"params (M)": ".3f", "GFLOPs": ".4f", "total images (M)": ".4g", "total GFLOPs": ".3g",
                      "train_img_s": ".1f", "peak_mem_mb": ".0f", "sample_img_s": ".2f"}),
        caption=f"GFLOPs: multiply-accumulates per image as fvcore counts them (handles for fused/local attention, "
                f"masks, FFTs, the DICE signal function) at the input of {ctx['study'].get('count_dataset', 'the study')}. "
                "Total images = training steps x batch size, total GFLOPs = total images x GFLOPs per image (paper 003 "
                "table 1's columns). "
                f"Training images/s: median over runs of the last logged interval; peak memory: {memory}; "
                "sampling images/s: median over the FID runs.")
    published = [f"{display(ctx, r.variant)}: {r.published}" for r in counts.itertuples() if getattr(r, "published", "")]
    if published:
        text_page(ctx, "Published counts beside ours", [
            "Ours at the published input (source [convention, input]: published (ours)); conventions: diffbias = the "
            "above (the DiT paper's), fvcore-as-shipped = fvcore without handles, torchinfo-mult-adds = conv params x "
            "positions + other params once:", *published])


@section("GFLOPs against sequence length", {"003": "fig. 3 (GFLOPs per image of each architecture as the sequence "
         "grows; here the study's own architectures, counted at the input sides of studies.<s>.count_sides)"})
def section_flops_vs_length(ctx: dict) -> None:
    pyplot, table = plt(), ctx.get("counts_by_length")
    if table is None or table.empty:
        raise NotApplicable("studies.<s>.count_sides is not set")
    fig, ax = pyplot.subplots(figsize=(5.5, 3.6))
    for variant in dict.fromkeys(table["variant"]):
        sub = table[table["variant"] == variant].sort_values("seq_len")
        ax.plot(sub["seq_len"], sub["gmacs"], marker="o", ms=3, label=display(ctx, variant))
    ax.set_xscale("log", base=2), ax.set_yscale("log")
    ax.set_xlabel("sequence length before patching (input side², latent or pixel positions)")
    ax.set_ylabel("GFLOPs per image (fvcore MACs)")
    ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("How each architecture's cost grows with the sequence (paper 003 fig. 3: patching keeps DiT's "
                 "attention affordable; DiffuSSM grows linearly)", fontsize=8)
    save_figure(ctx, fig, "flops_vs_length")
    write_table(ctx, "flops_vs_length", table.assign(model=table["variant"].map(lambda v: display(ctx, v)))
                [["model", "side", "seq_len", "tokens", "gmacs"]], ".4g")


@section("Training loss and throughput", "diagnostics (no paper figure)", needs=("train_log",))
def section_loss_curves(ctx: dict) -> None:
    pyplot, log = plt(), ctx["train_log"]
    fig, axes = pyplot.subplots(1, 2, figsize=(9, 3))
    for (v, n), sub in log.groupby(["variant", "N"]):
        line = sub.groupby("step")[["loss", "images_per_s"]].mean()
        axes[0].plot(line.index, line["loss"], lw=0.8, label=f"{display(ctx, v)}, N={n}")
        axes[1].plot(line.index, line["images_per_s"], lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (mse + vb)")
    axes[1].set_title("training throughput (images/s)")
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=5, loc="upper left", bbox_to_anchor=(1.02, 1))
    save_figure(ctx, fig, "loss_curves")


def quantity_values(ctx: dict) -> dict[str, pd.DataFrame]:
    """Every registered quantity (Measurement.quantities) this study measured: one row per run, run keys + value
    [+ low/high]."""
    out = {}
    for name, (m, q) in measurements.quantities().items():
        table = ctx.get(m.name)
        if table is not None and len(table):
            out[name] = q.per_run(table)
    return out


@section("Claims tested", "the study's claims (studies.<s>.claims) against what it measured, by the comparison rule")
def section_claims(ctx: dict) -> None:
    """The report's last table: each claim the study declares, what was measured and the verdict, derived from the
    intervals (analysis.COMPARISON_RULE), never written by hand."""
    study = ctx["study"]
    claims = study.get("claims") or []
    if not claims:
        raise NotApplicable("the study declares no claims")
    summary, details = analysis.evaluate_claims(claims, quantity_values(ctx), study)
    write_table(ctx, "claims", summary)
    if len(details):
        write_table(ctx, "claims_details", details)
    import textwrap

    rows = []  # the claim's words wrapped over continuation rows (table cells do not wrap)
    for _, r in summary.iterrows():
        words = textwrap.wrap(r["text"] + (f" ({r['source']})" if r["source"] else ""), 70)
        rows.append({"#": str(r["claim"]), "claim": words[0], "quantity": r["quantity"], "claimed": r["direction"],
                     "for / against / unresolved": f"{r['for']} / {r['against']} / {r['unresolved']}",
                     "verdict": r["verdict"], "intervals over": r["basis"]})
        rows += [{"#": "", "claim": line, "quantity": "", "claimed": "", "for / against / unresolved": "",
                  "verdict": "", "intervals over": ""} for line in words[1:]]
    shown = pd.DataFrame(rows)
    one_seed = len(study.get("seeds") or []) == 1
    notes = ["Rule: " + analysis.COMPARISON_RULE,
             "Verdict: reproduced when every comparison is resolved in the claimed direction, contradicted when any "
             "is resolved against it, otherwise unresolved at this precision; not measured when no comparison has "
             "both sides measured."]
    if one_seed:
        notes.append("This study has one training seed: every interval covers evaluation noise only (the images or "
                     "samples of one trained model), so 'reproduced' means reproduced by these models, not that the "
                     "claim holds over training data and seeds.")
    ctx["pdf"].table("Claims tested", frame_table(shown), caption="Each claim the study declares, the comparisons "
                     "it makes (per data set, and per N or variant as the claim leaves open) and the verdict derived "
                     "from the intervals.", notes=notes)
    if len(details):
        shown = details.rename(columns={"claim": "#", "a": "claimed side", "b": "compared with", "a_value": "value",
                                        "b_value": "value ", "yardstick": "twin yardstick"})
        ctx["pdf"].table("Claims tested: each comparison", frame_table(shown, formats={"difference": "+.4f",
                                                                                          "twin yardstick": ".4f"}),
                         caption="value: mean [95 % interval] with one seed, mean ± std with several; twin "
                                 "yardstick: |baseline - its split-B twin| at that N (one seed only; — without a twin).")


def sections() -> list[Callable[[dict], None]]:
    """Every section in report order: the overview, each measurement's (registry order), cost and training, and the
    claims table last."""
    return [section_overview, *(s for m in measurements.load().values() for s in m.sections),
            section_costs, section_flops_vs_length, section_loss_curves, section_claims]


# ----------------------------------------------------------------------------------------------------
# The document
# ----------------------------------------------------------------------------------------------------


def build_report(study: dict, study_dir: str | Path, out: str | Path, figures_dir: str | Path | None = None,
                 tables_dir: str | Path | None = None) -> list:
    """Render the study's report from ``study_dir``'s declared files; returns the typeset sections (title, what it
    reproduces, first page, pages, status) in order."""
    study_dir = Path(study_dir)
    ctx = {
        "study": study,
        "study_dir": study_dir,
        "figures_dir": Path(figures_dir) if figures_dir else study_dir / "figures",
        "tables_dir": Path(tables_dir) if tables_dir else study_dir / "tables",
        "labels": study.get("labels", {}),
        "blocks": analysis.variant_blocks(study),
        "arrays": {},
        "out": out,
        # attention PCA bases of the study's PCA-attention variants (paper 004 fig. 13), declared report inputs
        "pca_bases": {v: p for v, p in (study.get("pca_bases") or {}).items() if Path(p).exists()},
    }
    registry = measurements.load()
    for table in ("train_log", "counts", "counts_by_length", *registry):
        if (study_dir / f"{table}.parquet").exists():
            ctx[table] = pd.read_parquet(study_dir / f"{table}.parquet")
    packs = []  # kept open while the sections draw: arrays are read from them on use
    for name, m in registry.items():
        path = study_dir / "arrays" / f"{name}.npz"
        if m.arrays and path.exists():
            packs.append(np.load(path, allow_pickle=False))
            ctx["arrays"][name] = analysis.unpack_arrays(packs[-1])
    try:
        return _render(ctx, study)
    finally:
        for pack in packs:
            pack.close()


def _render(ctx: dict, study: dict) -> list:
    doc = Document(f"diffbias report: {study['name']}")
    ctx["pdf"] = doc
    papers = study.get("papers") or []
    nothing_drawn = []
    for fn in sections():
        needs = getattr(fn, "needs", ())
        if any(ctx.get(t) is None or len(ctx[t]) == 0 for t in needs):
            continue  # its measurement measured none of the study's runs: the closing line names the switch
        entry = doc.begin(fn.title, describe(getattr(fn, "reproduces", ""), papers))
        try:
            fn(ctx)
        except (NotMeasured, NotApplicable) as why:
            if entry.pages:
                raise RuntimeError(f"section {fn.title!r} drew pages before saying it had nothing to draw") from None
            doc.sections.remove(entry)
            if isinstance(why, NotMeasured):
                nothing_drawn.append(f"{fn.title}: {why}")
    switched_off = [f"{name} ({why})" for name, why in (study.get("switched_off") or {}).items()]
    if switched_off or nothing_drawn:
        doc.begin("Not in this report", "")
        lines = []
        if switched_off:
            lines.append("Switched off by the config: " + "; ".join(switched_off) + ".")
        if nothing_drawn:
            lines.append("Measured, but nothing to draw: " + "; ".join(nothing_drawn) + ".")
        doc.text("Not in this report", lines)
    written = doc.write(ctx["out"])
    # the contents as data, for checks that need no PDF parser
    ctx["tables_dir"].mkdir(parents=True, exist_ok=True)
    with atomic_path(ctx["tables_dir"] / "report_sections.json") as tmp:
        tmp.write_text(json.dumps({"sections": [vars(s) for s in written],
                                   "switched_off": study.get("switched_off") or {},
                                   "nothing_drawn": nothing_drawn}, indent=1))
    return written
