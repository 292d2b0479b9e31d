"""Paper-style figures, tables and a typeset PDF report per study.

The report reads only the files its rule declares (workflow/rules/report.smk): the study tables
``<study_dir>/<table>.parquet`` and the study-level array packs ``<study_dir>/arrays/<name>.npz`` (per-run
``.npz`` files packed by ``python -m diffbias aggregate-arrays``), both named by the measurement registry
(:mod:`diffbias.measurements`). It writes the PDF, ``<study_dir>/figures/`` (PNG of every figure) and
``<study_dir>/tables/`` (Markdown and LaTeX tables), the latter two declared outputs of the rule.

Layout: :mod:`diffbias.typeset`, matplotlib-drawn pages (booktabs tables with aligned numbers and bold best
values, wrapped text, a contents page with page numbers). Chosen over ReportLab because every figure is already a
matplotlib figure and matplotlib's PDF backend keeps them vector with no conversion step (ReportLab would need
svglib on top to embed vector plots), so one well-kept library already pinned in requirements.txt does the whole
layout and no new dependency is added. Each section names the seed figure or table it reproduces;
a section whose inputs were not measured in this study says so on the contents page and on the "Not measured"
page instead of disappearing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import analysis  # noqa: E402
from .io import atomic_path, read_parquet_metadata  # noqa: E402
from .typeset import Document, frame_table, layout_table  # noqa: E402

plt.rcParams.update({"figure.max_open_warning": 0, "figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3, "font.size": 8})

# Metrics of the seeds that cannot be computed offline: shown as missing columns with the reason, never a number.
UNAVAILABLE_METRICS = {
    "IS": "Inception Score needs the Inception classifier's logits; the offline torch-fidelity weights used here "
          "have none",
    "sFID": "sFID needs the spatial (mixed_6/conv) Inception features, which the offline feature extractor does not "
            "expose",
}


class NotMeasured(Exception):
    """Raised by a section whose inputs this study does not have; the message says which and why."""


def _save(fig: plt.Figure, figures_dir: Path, name: str, pdf) -> None:
    """A figure as PNG under figures/ and as a vector page of the report."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(figures_dir / f"{name}.png") as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    pdf.savefig(fig, bbox_inches="tight")


def _text_page(pdf, title: str, body: str) -> None:
    """A page of text (plugin sections use it); Markdown tables stay readable as monospace-free lines."""
    pdf.text(title, body.splitlines())


def _write_table(ctx: dict, name: str, layout_or_frame, fmt_frame: str = ".4g") -> None:
    tables_dir = ctx["tables_dir"]
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


def section(title: str, reproduces: str, needs: tuple[str, ...] = ()):
    """Mark a function as a report section: its title, the seed item it reproduces, the study tables it needs."""
    def mark(fn):
        fn.title, fn.reproduces, fn.needs = title, reproduces, needs
        return fn
    return mark


def _need(ctx: dict, *tables: str) -> None:
    missing = [t for t in tables if ctx.get(t) is None or len(ctx[t]) == 0]
    if missing:
        raise NotMeasured(f"not measured in this study: no {', '.join(missing)} table (the measurement applies to "
                          "none of its runs, or is not configured)")


def _display(ctx: dict, variant: str) -> str:
    """A variant's label, prefixed with its block header where another variant of the study shares the label."""
    label = ctx["labels"].get(variant, variant)
    if sum(1 for v in ctx["study"]["variants"] if ctx["labels"].get(v, v) == label) > 1:
        header = next((b.header for b in ctx["blocks"] if variant in b.variants), "")
        return f"{header}: {label}" if header and header != label else f"{label} ({variant})"
    return label


def _datasets(ctx: dict, frame: pd.DataFrame) -> list[str]:
    order = ctx["study"].get("datasets") or []
    present = list(frame["dataset"].unique())
    return [d for d in order if d in present] + sorted(d for d in present if d not in order)


def _variants(ctx: dict, frame: pd.DataFrame) -> list[str]:
    return [v for b in ctx["blocks"] for v in b.variants if v in set(frame["variant"])]


def _first_runs(ctx: dict, frame: pd.DataFrame) -> pd.DataFrame:
    """One run per (dataset, variant, N): the lowest seed (figures of maps show one model per cell, as the seed)."""
    return frame[RUN_COLS].drop_duplicates().sort_values("seed").groupby(["dataset", "variant", "N"], as_index=False).first()


RUN_COLS = analysis.RUN_KEYS


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


@section("Overview", "the study's setting (seed 004 table 4 for the DiT variants), provenance")
def section_title(ctx: dict) -> None:
    study, psnr = ctx["study"], ctx["psnr"]
    meta = read_parquet_metadata(ctx["study_dir"] / "psnr.parquet") if (ctx["study_dir"] / "psnr.parquet").exists() else {}
    runs = meta.get("runs", {})
    first = next(iter(runs.values()), None) or {}
    paras = [
        f"Study: {study['name']} — {study.get('title', '')}",
        f"Data set(s): {', '.join(_datasets(ctx, psnr))}.  N: {', '.join(map(str, study['N']))}.  "
        f"Seeds: {', '.join(map(str, study['seeds']))}.  Runs: {len(runs)}.",
        "Scale: " + study.get("scale_note", ""),
        *(["What this study can and cannot show: " + study["summary"]] if study.get("summary") else []),
        *_findings(ctx),
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


def _findings(ctx: dict) -> list[str]:
    """What this run's own numbers say about memorisation (seed 004 fig. 2), per data set, variant and N."""
    psnr = ctx["psnr"]
    runs = psnr.groupby(RUN_COLS, as_index=False).agg(gap=("gap", "mean"), above=("psnr_train", "mean"),
                                                      below=("psnr_test", "mean"))
    per = runs.groupby(["dataset", "variant", "N"], as_index=False)[["gap", "above", "below"]].mean()
    lines = ["Measured here (mean PSNR gap over the respaced steps; train/test = mean PSNR of one-step denoising):"]
    for d in _datasets(ctx, psnr):
        for v in _variants(ctx, psnr):
            parts = [f"N={int(r.N)}: gap {r.gap:.2f} dB (train {r.above:.1f} / test {r.below:.1f} dB)"
                     for r in per[(per["variant"] == v) & (per["dataset"] == d)].sort_values("N").itertuples()]
            if parts:
                lines.append(f"  {d}, {_display(ctx, v)}: " + "; ".join(parts))
    return lines


@section("Mean PSNR gap per data set", "seed 004 figs. 6-8 as numbers, in the layout of tables 1-3", needs=("psnr",))
def section_gap_table(ctx: dict) -> None:
    study = ctx["study"]
    long = analysis.gap_table(ctx["psnr"], study)
    layout = analysis.layout_comparison(long, study, digits=4, datasets=_datasets(ctx, ctx["psnr"]))
    _write_table(ctx, "psnr_gap", layout)
    ctx["pdf"].table("Mean PSNR gap (dB), lower is better", layout_table(layout),
                     caption=f"Mean over the respaced steps, then mean ± std over seeds {', '.join(map(str, study['seeds']))}. "
                             "Best value of each column within a block in bold; under each variant its change against "
                             "its own baseline (same backbone and preset). " + _clip_note(ctx["psnr"]))


def _clip_note(psnr: pd.DataFrame) -> str:
    """Which one-step estimate the PSNR used (evaluation.psnr.clip): the seed's unclipped one or the clipped."""
    if "x0_clipped" not in psnr:
        return "x0_hat clipping not recorded (a table written before evaluation.psnr.clip existed)."
    used = set(psnr["x0_clipped"].astype(bool))
    if used == {False}:
        return "x0_hat not clipped, as seed 004 eq. 3 (evaluation.psnr.clip: false)."
    if used == {True}:
        return "x0_hat clipped to [-1, 1] as the DiT/ADM samplers do (evaluation.psnr.clip: true; the seed does not clip)."
    return "Mixed: some runs clipped x0_hat and some did not (evaluation.psnr.clip changed between runs)."


@section("PSNR of one-step denoising, train vs test", "seed 004 fig. 2 (a, b; UNet vs DiT when the study has both) "
         "and figs. 14-19 (one figure per data set)", needs=("psnr",))
def section_psnr_curves(ctx: dict) -> None:
    psnr = ctx["psnr"]
    backbones = {s.get("backbone") for s in ctx["study"].get("variant_specs", {}).values()}
    for d in _datasets(ctx, psnr):
        sub = psnr[psnr["dataset"] == d]
        variants = _variants(ctx, sub)
        ns = sorted(sub["N"].unique())
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(ns)))
        fig, axes = plt.subplots(2, len(variants), figsize=(2.6 * len(variants) + 1.2, 4.6), sharey="row", squeeze=False)
        for j, v in enumerate(variants):
            for n, colour in zip(ns, colours):
                runs = sub[(sub["variant"] == v) & (sub["N"] == n)]
                if runs.empty:
                    continue
                mean = runs.groupby("t")[["psnr_train", "psnr_test", "gap"]].agg(["mean", "std"])
                t = mean.index.to_numpy()
                for col, style, name in (("psnr_train", "-", "train"), ("psnr_test", "--", "test")):
                    axes[0][j].plot(t, mean[(col, "mean")], style, color=colour, lw=1.1,
                                    label=f"N={n} {name}" if j == len(variants) - 1 else None)
                axes[1][j].plot(t, mean[(("gap", "mean"))], color=colour, lw=1.1)
                axes[1][j].fill_between(t, mean[("gap", "mean")] - mean[("gap", "std")].fillna(0),
                                        mean[("gap", "mean")] + mean[("gap", "std")].fillna(0), color=colour, alpha=0.2)
            axes[0][j].set_title(_display(ctx, v), fontsize=8)
            axes[1][j].set_xlabel("diffusion step t")
        axes[0][0].set_ylabel("PSNR (dB)")
        axes[1][0].set_ylabel("PSNR gap (dB)")
        axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
        extra = " — UNet vs DiT at matched FLOPs" if "unet" in backbones and "dit" in backbones else ""
        fig.suptitle(f"{d}: (a) PSNR train (solid) / test (dashed), (b) PSNR gap, mean ± std over seeds{extra}")
        _save(fig, ctx["figures_dir"], f"psnr_curves_{d}", ctx["pdf"])


@section("PSNR gap per training-set size", "seed 004 fig. 6 (panel per data set), figs. 7-8 (placement, window size)",
         needs=("psnr",))
def section_gap_bars(ctx: dict) -> None:
    _gap_bars(ctx, ctx["psnr"], "psnr_gap_bars", "mean PSNR gap over the respaced steps, mean ± std over seeds")


def _gap_bars(ctx: dict, psnr: pd.DataFrame, name: str, title: str) -> None:
    per_run = analysis.per_run_mean(psnr, "gap")
    datasets = _datasets(ctx, per_run)
    variants = _variants(ctx, per_run)
    ncols = min(3, len(datasets))  # one panel per data set, as seed 004 fig. 6 (a panel grid beyond three)
    nrows = -(-len(datasets) // ncols)
    width = max(3.2, 0.18 * len(variants) * len(ctx["study"]["N"]) + 1.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols + 1.8, 2.8 * nrows + 0.4), squeeze=False)
    colours = plt.cm.tab20(np.linspace(0, 1, 20))[: max(len(variants), 1)]
    for ax in axes.flat[len(datasets):]:
        ax.axis("off")
    for ax, d in zip(axes.flat, datasets):
        sub = per_run[per_run["dataset"] == d]
        ns = sorted(sub["N"].unique())
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            stats = sub[sub["variant"] == v].groupby("N")["gap"].agg(["mean", "std"]).reindex(ns)
            ax.bar(np.arange(len(ns)) + (i - (len(variants) - 1) / 2) * width, stats["mean"], width,
                   yerr=stats["std"].fillna(0), color=colours[i], label=_display(ctx, v), capsize=2)
        ax.set_xticks(np.arange(len(ns)), [f"N={n}" for n in ns])
        ax.set_title(d)
        ax.set_ylabel("PSNR gap (dB), lower = better")
    axes.flat[min(len(datasets), ncols) - 1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(title)
    _save(fig, ctx["figures_dir"], name, ctx["pdf"])


@section("Appendix C: weight sharing and PCA attention", "seed 004 app. C: fig. 12 (PSNR gap of baseline, local, "
         "sharing, PCA) and table 5 (FID); fig. 13's principal components are a training input, not a measurement",
         needs=("psnr",))
def section_appendix_c(ctx: dict) -> None:
    specs = ctx["study"].get("variant_specs", {})
    options = {v: s.get("options") or {} for v, s in specs.items()}
    reduced = [v for v, o in options.items() if o.get("share_blocks") or o.get("pca_layers")]
    if not reduced:
        raise NotMeasured("not measured in this study: no weight-sharing or PCA-attention variant")
    base = analysis.resolve_baselines(ctx["study"])
    their_baselines = {base[r] for r in reduced}  # ...and every variant compared with the same baseline (local)
    keep = set(reduced) | {b for b in their_baselines if b} | {v for v in specs if base.get(v) in their_baselines}
    _gap_bars(ctx, ctx["psnr"][ctx["psnr"]["variant"].isin(keep)], "appendix_c_gap_bars",
              "Weight sharing and PCA attention vs local attention (seed 004 fig. 12 b)")
    if ctx.get("fid") is not None:
        fid = ctx["fid"][ctx["fid"]["variant"].isin(keep)]
        layout = analysis.layout_comparison(analysis.compare(analysis.per_run_mean(fid, "fid"), ctx["study"], "fid"),
                                            ctx["study"], digits=2, datasets=_datasets(ctx, fid))
        _write_table(ctx, "appendix_c_fid", layout)
        ctx["pdf"].table("FID, parameter reduction vs local attention (seed 004 table 5)", layout_table(layout))


@section("FID, KID, precision and recall", "seed 004 tables 1-3 (FID per data set and N, change vs own baseline); "
         "seed 002 table 1; seed 003 tables 1-2", needs=("fid",))
def section_fid(ctx: dict) -> None:
    """KID leads at small sample counts: it is unbiased at any count and its spread over subsets is a real
    uncertainty; FID from a few hundred samples is biased upwards."""
    fid, study = ctx["fid"], ctx["study"]
    datasets = _datasets(ctx, fid)
    fid_layout = analysis.layout_comparison(analysis.compare(analysis.per_run_mean(fid, "fid"), study, "fid"), study,
                                            digits=2, datasets=datasets)
    _write_table(ctx, "fid", fid_layout)
    small = int(fid["num_samples"].min()) < 10_000
    ctx["pdf"].table("FID (lower is better)", layout_table(fid_layout),
                     caption="Mean ± std over seeds; best per column within a block in bold; change vs own baseline. "
                             + ("With fewer than 10k samples FID is biased upwards: compare rows with equal sample counts only."
                                if small else ""))
    kid = fid.assign(kid_x1e3=fid["kid_mean"] * 1e3)
    kid_layout = analysis.layout_comparison(analysis.compare(analysis.per_run_mean(kid, "kid_x1e3"), study, "kid_x1e3"),
                                            study, digits=2, datasets=datasets)
    _write_table(ctx, "kid", kid_layout)
    ctx["pdf"].table("KID × 10³ (lower is better)", layout_table(kid_layout),
                     caption="Mean ± std over seeds of each run's KID (mean over random subsets).")
    if "kid_subset_size" not in fid:  # tables written before KID subsets were recorded
        fid = fid.assign(kid_subset_size=fid["num_samples"])
    per = fid.groupby(["dataset", "variant", "N"], as_index=False).agg(
        precision=("precision", "mean"), recall=("recall", "mean"), samples=("num_samples", "first"),
        subset=("kid_subset_size", "first"), reference=("num_reference", "first"), steps=("sampling_steps", "first"),
        seeds=("seed", "count"))
    if "inception_score" in fid and fid["inception_score"].notna().any():
        per = per.merge(fid.groupby(["dataset", "variant", "N"], as_index=False)["inception_score"].mean(), how="left")
        per = per.rename(columns={"inception_score": "IS"})
    else:
        per["IS"] = "missing†"
    per["sFID"] = "missing‡"
    order = {v: i for i, v in enumerate(_variants(ctx, fid))}
    per = per.sort_values(["dataset", "N", "variant"], key=lambda s: s.map(order) if s.name == "variant" else s)
    per.insert(1, "model", per.pop("variant").map(lambda v: _display(ctx, v)))
    _write_table(ctx, "fid_details", per, ".3f")
    ctx["pdf"].table("Sample quality details", frame_table(per, formats={"precision": ".3f", "recall": ".3f", "IS": ".2f"}),
                     notes=[f"† {UNAVAILABLE_METRICS['IS']}.", f"‡ {UNAVAILABLE_METRICS['sFID']}.",
                            "All through torch-fidelity (Inception-v3, offline weights). KID subsets of 'subset' "
                            "samples and reference images."])


@section("FID over training", "seed 002 fig. 11, seed 003 fig. 6 (right)", needs=("fid_curve",))
def section_fid_curve(ctx: dict) -> None:
    curve = ctx["fid_curve"]
    panels = curve[["dataset", "N"]].drop_duplicates().sort_values(["dataset", "N"]).itertuples(index=False)
    panels = list(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 1.5, 3.0), squeeze=False)
    for ax, (d, n) in zip(axes[0], panels):
        sub = curve[(curve["dataset"] == d) & (curve["N"] == n)]
        for v in _variants(ctx, sub):
            line = sub[sub["variant"] == v].groupby("step")["fid"].mean()
            ax.plot(line.index, line.to_numpy(), marker="o", ms=3, label=_display(ctx, v))
        ax.set_title(f"{d}, N={n}")
        ax.set_xlabel("training step")
        ax.set_ylabel("FID")
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"FID of the EMA snapshots over training ({int(curve['num_samples'].iloc[0])} samples, "
                 f"{int(curve['sampling_steps'].iloc[0])} steps, same sample seeds at every step)")
    _save(fig, ctx["figures_dir"], "fid_curve", ctx["pdf"])


@section("FID against GFLOPs and sampling speed", "seed 003 fig. 3 in part (GFLOPs per architecture, here at the study's "
         "input and against FID; the seed sweeps sequence length), seed 002 fig. 13 (bubble graph: FID vs sampling "
         "speed, area = GFLOPs)", needs=("fid", "counts"))
def section_fid_vs_gflops(ctx: dict) -> None:
    per = ctx["fid"].groupby(["dataset", "variant", "N"], as_index=False).agg(
        fid=("fid", "mean"), speed=("sampling_images_per_s", "median"))
    per = per.merge(ctx["counts"][["variant", "gmacs"]], on="variant", how="left")
    panels = list(per[["dataset", "N"]].drop_duplicates().sort_values(["dataset", "N"]).itertuples(index=False))
    fig, axes = plt.subplots(2, len(panels), figsize=(3.4 * len(panels) + 1.5, 5.6), squeeze=False, layout="constrained")
    for j, (d, n) in enumerate(panels):
        sub = per[(per["dataset"] == d) & (per["N"] == n)]
        for r in sub.itertuples():
            axes[0][j].scatter(r.gmacs, r.fid, s=20)
            axes[0][j].annotate(_display(ctx, r.variant), (r.gmacs, r.fid), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
            area = 400 * r.gmacs / max(per["gmacs"].max(), 1e-12)
            axes[1][j].scatter(r.speed, r.fid, s=max(area, 8), alpha=0.5)
            axes[1][j].annotate(_display(ctx, r.variant), (r.speed, r.fid), fontsize=6)
        axes[0][j].set_xlabel("GFLOPs per image (fvcore MACs)")
        axes[1][j].set_xlabel("sampling images/s")
        for i in range(2):
            axes[i][j].set_ylabel("FID")
            axes[i][j].set_title(f"{d}, N={n}", fontsize=8)
    fig.suptitle("(top) FID vs GFLOPs per architecture (cf. seed 003 fig. 3); (bottom) FID vs sampling speed, "
                 "area ∝ GFLOPs (seed 002 fig. 13)")
    _save(fig, ctx["figures_dir"], "fid_vs_gflops", ctx["pdf"])


@section("Model cost: parameters, GFLOPs, throughput", "seed 002 table 2 (static metrics), seed 000 table 2 (FLOPs)",
         needs=("counts",))
def section_costs(ctx: dict) -> None:
    counts = ctx["counts"]
    per = counts[["variant", "params", "gmacs"]].copy()
    per["params (M)"] = per.pop("params") / 1e6
    per = per.rename(columns={"gmacs": "GFLOPs"})
    log = ctx.get("train_log")
    if log is not None and len(log):
        last = log.sort_values("step").groupby(RUN_COLS, as_index=False).last()
        train = last.groupby("variant", as_index=False).agg(train_img_s=("images_per_s", "median"),
                                                           peak_mem_mb=("peak_memory_mb", "max"))
        per = per.merge(train, on="variant", how="left")
    else:
        per["train_img_s"], per["peak_mem_mb"] = "not measured", "not measured"
    fid = ctx.get("fid")
    if fid is not None and "sampling_images_per_s" in fid:
        sampling = fid.groupby("variant", as_index=False).agg(sample_img_s=("sampling_images_per_s", "median"),
                                                             sampling_steps=("sampling_steps", "first"))
        per = per.merge(sampling, on="variant", how="left")
    else:
        per["sample_img_s"] = "not measured (no FID runs)"
    order = {v: i for i, v in enumerate(ctx["study"]["variants"])}
    per = per.sort_values("variant", key=lambda s: s.map(order))
    per.insert(0, "model", per.pop("variant").map(lambda v: _display(ctx, v)))
    _write_table(ctx, "cost", per, ".3f")
    memory = log["memory_kind"].iloc[0] if log is not None and "memory_kind" in log and len(log) else "n/a"
    ctx["pdf"].table("Parameters, FLOPs and throughput", frame_table(
        per, formats={"params (M)": ".3f", "GFLOPs": ".4f", "train_img_s": ".1f", "peak_mem_mb": ".0f", "sample_img_s": ".2f"}),
        caption=f"GFLOPs: multiply-accumulates per image as fvcore counts them (handles for fused/local attention, "
                f"masks, FFTs, the DICE signal function) at the input of {ctx['study'].get('count_dataset', 'the study')}. "
                f"Training images/s: median over runs of the last logged interval; peak memory: {memory}; "
                "sampling images/s: median over the FID runs.")
    published = [f"{_display(ctx, r.variant)}: {r.published}" for r in counts.itertuples() if getattr(r, "published", "")]
    if published:
        ctx["pdf"].text("Published counts beside ours", [
            "Ours at the published input (source [convention, input]: published (ours)); conventions: diffbias = the "
            "above (the DiT paper's), fvcore-as-shipped = fvcore without handles, torchinfo-mult-adds = conv params x "
            "positions + other params once:", *published])


@section("FreeU-style (b, s) scaling: FID grid", "seed 000 table 1 / sec. 3.2 (FID over b and s)", needs=("freeu",))
def section_freeu(ctx: dict) -> None:
    freeu = ctx["freeu"]
    runs = list(freeu.groupby(RUN_COLS))
    fig, axes = plt.subplots(1, len(runs), figsize=(4.0 * len(runs), 3.4), squeeze=False)
    for ax, ((d, v, n, seed), sub) in zip(axes[0], runs):
        grid = sub.pivot_table(index="b", columns="s", values="fid")
        im = ax.imshow(grid.to_numpy(), cmap="viridis_r")
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(grid.shape[1]), [f"{s:g}" for s in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{b:g}" for b in grid.index])
        ax.set_xlabel("s"), ax.set_ylabel("b")
        ax.set_title(f"{d}, {_display(ctx, v)}, N={n}, seed {seed}", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.04, label="FID")
    fig.suptitle(f"FID over (b, s): {int(freeu['num_samples'].iloc[0])} samples, {int(freeu['sampling_steps'].iloc[0])} steps")
    _save(fig, ctx["figures_dir"], "freeu_fid", ctx["pdf"])


@section("FreeU-style (b, s) scaling: samples", "seed 000 figs. 5-7 (samples at (b, s) = (1.8, 0.85), (1.0, 0.85)), "
         "seed 001 (1.3, 1.0)", needs=("freeu",))
def section_freeu_samples(ctx: dict) -> None:
    packed = ctx["arrays"].get("freeu")
    if not packed:
        raise NotMeasured("not measured in this study: no FreeU sample arrays")
    # the (b, s) points the config lists (freeu_grid.sample_points, [[b, s], ...]); every grid point otherwise
    wanted = [(float(b), float(s)) for b, s in ((ctx["study"].get("freeu_grid") or {}).get("sample_points") or [])]
    for run, arrays in sorted(packed.items()):
        points = {tuple(float(x[1:]) for x in k.split("_")): k for k in arrays}  # "b1.8_s0.85" -> (1.8, 0.85)
        absent = [p for p in wanted if p not in points]
        if absent:
            ctx["pdf"].text(None, [f"{run}: no samples at (b, s) = {absent} (not in the evaluated grid)"])
        keys = [points[p] for p in (wanted or sorted(points)) if p in points]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(2.2 * len(keys), 2.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            ax.imshow(_tile(arrays[key][:16]), cmap="gray", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            b, s = key.split("_")
            ax.set_title(f"b={b[1:]}, s={s[1:]}", fontsize=7)
        d, v, n, seed = analysis.parse_run(run)
        fig.suptitle(f"{d}, {_display(ctx, v)}, N={n}, seed {seed}: samples per (b, s), same noise seeds")
        _save(fig, ctx["figures_dir"], f"freeu_samples_{d}_{v}_N{n}_seed{seed}", ctx["pdf"])


def _tile(images: np.ndarray) -> np.ndarray:
    """(k, C, H, W) uint8 -> one square-ish grid image (H', W') or (H', W', C)."""
    k = int(np.ceil(np.sqrt(len(images))))
    c, h, w = images.shape[1:]
    tile = np.zeros((k * h, k * w, c), dtype=images.dtype)
    for idx, im in enumerate(images):
        tile[(idx // k) * h:(idx // k + 1) * h, (idx % k) * w:(idx % k + 1) * w] = im.transpose(1, 2, 0)
    return tile.squeeze(-1) if c == 1 else tile


@section("Samples", "seed 002 fig. 1 (DiT vs DICE samples), seed 003 fig. 4 (uncurated samples)", needs=("fid",))
def section_samples(ctx: dict) -> None:
    packed = ctx["arrays"].get("fid")
    if not packed:
        raise NotMeasured("not measured in this study: no FID sample arrays")
    runs = sorted(packed)[:12]
    fig, axes = plt.subplots(1, len(runs), figsize=(2.2 * len(runs), 2.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        ax.imshow(_tile(packed[run]["samples"][:16]), cmap="gray", interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        d, v, n, seed = analysis.parse_run(run)
        ax.set_title(f"{d}\n{_display(ctx, v)}, N={n}", fontsize=6)
    fig.suptitle("First 16 FID samples per run (EMA model)")
    _save(fig, ctx["figures_dir"], "samples", ctx["pdf"])


@section("Jacobian eigenvectors and spectra", "seed 004 fig. 3 (rows: models x N, columns: top eigenvectors) and "
         "fig. 1 (c)", needs=("jacobian",))
def section_jacobian(ctx: dict) -> None:
    import torch

    from .metrics.jacobian import plot_eigenvectors

    jac = ctx["jacobian"]
    spectra = jac[jac["image"] == 0]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for (v, n), sub in spectra.groupby(["variant", "N"]):
        line = sub.groupby("rank")["eigenvalue"].mean()
        ax.plot(line.index, line.to_numpy(), label=f"{_display(ctx, v)}, N={n}", lw=1)
    ax.set_xscale("symlog")
    ax.set_xlabel("rank"), ax.set_ylabel("eigenvalue")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    ax.set_title("Eigenvalues of the symmetrised denoiser Jacobian (image 0, mean over runs)")
    _save(fig, ctx["figures_dir"], "jacobian_spectra", ctx["pdf"])
    packed = ctx["arrays"].get("jacobian") or {}
    for d in _datasets(ctx, jac):
        first = _first_runs(ctx, jac[jac["dataset"] == d])
        order = {v: i for i, v in enumerate(_variants(ctx, jac))}
        first = first.sort_values(["variant", "N"], key=lambda s: s.map(order) if s.name == "variant" else s)
        rows = [r for r in first.itertuples() if analysis.run_key(r.dataset, r.variant, r.N, r.seed) in packed]
        if not rows:
            ctx["pdf"].text(None, [f"{d}: Jacobian eigenvectors not measured in this study (no arrays)."])
            continue
        vecs = [packed[analysis.run_key(r.dataset, r.variant, r.N, r.seed)]["eigenvectors"][0, 0] for r in rows]
        k = min(min(len(v) for v in vecs), 6)
        channels = vecs[0].shape[-3] if vecs[0].ndim == 4 else 1  # channels are laid side by side in a panel
        fig, axes = plt.subplots(len(rows), k, figsize=(1.5 * k * channels ** 0.5 + 1.5, 1.5 * len(rows) + 0.5),
                                 squeeze=False)
        for i, (r, v) in enumerate(zip(rows, vecs)):
            sub = jac[(jac["dataset"] == r.dataset) & (jac["variant"] == r.variant) & (jac["N"] == r.N)
                      & (jac["seed"] == r.seed)]
            vals = sub[(sub["image"] == 0) & (sub["t"] == sub["t"].min())].sort_values("rank")["eigenvalue"].to_numpy()[:k]
            plot_eigenvectors(torch.as_tensor(np.asarray(v[:k], dtype=np.float32)), vals if len(vals) == k else None,
                              axes=axes[i])
            axes[i][0].set_ylabel(f"{_display(ctx, r.variant)}\nN={r.N}", fontsize=7)
        fig.suptitle(f"{d}: top-{k} Jacobian eigenvectors at t={int(jac['t'].min())} (image 0; rows: model x N)", fontsize=9)
        _save(fig, ctx["figures_dir"], f"jacobian_eigvecs_{d}", ctx["pdf"])
    asym = jac.groupby(["dataset", "variant", "N", "t"], as_index=False)["asymmetry"].mean()
    asym.insert(1, "model", asym.pop("variant").map(lambda v: _display(ctx, v)))
    ctx["pdf"].table("Jacobian asymmetry", frame_table(asym, formats={"asymmetry": ".4f"}),
                     caption="||J - J^T||_F / ||J||_F of the denoiser Jacobian (eigenvectors are those of the symmetrised "
                             "Jacobian), mean over images and seeds.")


@section("Attention maps", "seed 004 fig. 4 (maps across N, every other layer) and figs. 9-11 (six images at layers "
         "1, 6 and 12)", needs=("attention",))
def section_attention(ctx: dict) -> None:
    import torch

    from .metrics.attention_maps import plot_attention_maps

    att = ctx["attention"]
    packed = ctx["arrays"].get("attention") or {}
    order = {v: i for i, v in enumerate(_variants(ctx, att))}
    drawn = False
    for d in _datasets(ctx, att):
        first = _first_runs(ctx, att[att["dataset"] == d])
        first = first.sort_values(["variant", "N"], key=lambda s: s.map(order) if s.name == "variant" else s)
        runs = []
        for r in first.itertuples():
            arrays = packed.get(analysis.run_key(r.dataset, r.variant, r.N, r.seed), {})
            layers = sorted((k for k in arrays if k.startswith("layer")), key=lambda k: int(k[5:]))
            if layers:
                sub = att[(att["dataset"] == d) & (att["variant"] == r.variant) & (att["N"] == r.N)]
                runs.append((r, arrays, layers, (int(sub["grid_h"].iloc[0]), int(sub["grid_w"].iloc[0]))))
        if not runs:
            continue
        drawn = True
        for v in dict.fromkeys(r.variant for r, *_ in runs):  # fig. 4: rows N, columns every other layer
            mine = [x for x in runs if x[0].variant == v]
            layers = mine[0][2]
            show = layers[1::2] if len(layers) > 6 else layers
            fig, axes = plt.subplots(len(mine), len(show), figsize=(1.9 * len(show) + 0.8, 1.9 * len(mine) + 0.5),
                                     squeeze=False)
            for i, (r, arrays, _, grid) in enumerate(mine):
                plot_attention_maps([torch.from_numpy(arrays[k][0].astype("float32")) for k in show], grid, axes=axes[i],
                                    titles=[f"layer {k[5:]}" for k in show], panel_size=1.9)
                axes[i][0].set_ylabel(f"N={r.N}", fontsize=8)
            fig.suptitle(f"{d}, {_display(ctx, v)}: attention maps across N (image 0, normalised, colour map on [0, 0.1])",
                         fontsize=9)
            _save(fig, ctx["figures_dir"], f"attention_maps_{d}_{v}", ctx["pdf"])
        baselines = {b.baseline for b in ctx["blocks"] if b.baseline} or {runs[0][0].variant}
        for layer in (1, 6, 12):  # figs. 9-11: six images at one layer of the baseline models, rows N
            rows = [x for x in runs if f"layer{layer}" in x[1] and x[0].variant in baselines]
            if not rows:
                continue
            n_img = min(6, min(len(x[1][f"layer{layer}"]) for x in rows))
            fig, axes = plt.subplots(len(rows), n_img, figsize=(1.8 * n_img + 0.8, 1.8 * len(rows) + 0.5), squeeze=False)
            for i, (r, arrays, _, grid) in enumerate(rows):  # one call per row: the images take the layers' place
                plot_attention_maps([torch.from_numpy(arrays[f"layer{layer}"][j].astype("float32")) for j in range(n_img)],
                                    grid, axes=axes[i], titles=[f"image {j + 1}" for j in range(n_img)])
                axes[i][0].set_ylabel(f"{_display(ctx, r.variant)}\nN={r.N}", fontsize=7)
            seed_figure = 9 + (1, 6, 12).index(layer)
            fig.suptitle(f"{d}: attention maps of block {layer} for {n_img} images, baseline model(s) "
                         f"(seed 004 fig. {seed_figure})", fontsize=9)
            _save(fig, ctx["figures_dir"], f"attention_layer{layer}_{d}", ctx["pdf"])
    if not drawn:
        raise NotMeasured("not measured in this study: no attention maps (attention-free backbones or no arrays)")


@section("Attention locality per layer", "beyond the seeds: attention mass within radius 1, mean distance and "
         "entropy per layer against N", needs=("attention",))
def section_attention_locality(ctx: dict) -> None:
    mean = ctx["attention"][ctx["attention"]["head"] == "mean"]
    if mean.empty:
        raise NotMeasured("not measured in this study: attention-free backbones")
    metrics = [m for m in ("mass_r1", "mean_distance", "entropy") if m in set(mean["metric"])]
    variants = _variants(ctx, mean)
    fig, axes = plt.subplots(len(metrics), len(variants), figsize=(2.4 * len(variants) + 1.2, 2.2 * len(metrics) + 0.4),
                             squeeze=False, sharey="row", layout="constrained")
    for i, metric in enumerate(metrics):
        for j, v in enumerate(variants):
            sub = mean[(mean["metric"] == metric) & (mean["variant"] == v)]
            for n, line in sub.groupby("N"):
                m = line.groupby("layer")["value"].mean()
                axes[i][j].plot(m.index, m.to_numpy(), marker="o", ms=2, lw=1, label=f"N={n}")
            axes[i][j].set_title(_display(ctx, v), fontsize=7) if i == 0 else None
            axes[i][0].set_ylabel(metric)
            axes[-1][j].set_xlabel("layer")
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Locality per layer (head-averaged maps, mean over data sets and seeds)")
    _save(fig, ctx["figures_dir"], "attention_locality", ctx["pdf"])


@section("Gaussian-mixture masks", "seed 000 figs. 8-20 (masks per head and block) and fig. 4", needs=("gmm_masks",))
def section_gmm_masks(ctx: dict) -> None:
    from .metrics.gmm_masks import plot_gmm_masks

    gmm = ctx["gmm_masks"]
    packed = ctx["arrays"].get("gmm_masks") or {}
    for r in _first_runs(ctx, gmm).itertuples():
        arrays = packed.get(analysis.run_key(r.dataset, r.variant, r.N, r.seed))
        if not arrays:
            continue
        sub = gmm[(gmm["variant"] == r.variant) & (gmm["N"] == r.N) & (gmm["dataset"] == r.dataset)]
        maps = {name: arrays[name] for name in sub.sort_values("block_index")["block"].unique() if name in arrays}
        fig = plot_gmm_masks(maps, f"{r.dataset}, {_display(ctx, r.variant)}, N={r.N}: learned Gaussian-mixture mask of "
                                   "the centre token, per block (rows) and head (columns)")
        _save(fig, ctx["figures_dir"], f"gmm_masks_{r.dataset}_{r.variant}_N{r.N}", ctx["pdf"])
    kernels = gmm.groupby(["label", "block"], as_index=False, sort=False).agg(
        alpha_mean=("alpha", "mean"), sigma_median=("sigma", "median"), mask_at_0=("mask_at_0", "mean"))
    ctx["pdf"].table("Gaussian-mixture mask parameters", frame_table(kernels, formats={c: ".3f" for c in kernels.columns[2:]}),
                     caption="Per block: mean alpha, median |sigma| (tokens) over heads and kernels, and the mask at "
                             "distance 0 (mean over heads).")


@section("Training loss and throughput", "diagnostics (no seed figure)", needs=("train_log",))
def section_loss_curves(ctx: dict) -> None:
    log = ctx["train_log"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for (v, n), sub in log.groupby(["variant", "N"]):
        line = sub.groupby("step")[["loss", "images_per_s"]].mean()
        axes[0].plot(line.index, line["loss"], lw=0.8, label=f"{_display(ctx, v)}, N={n}")
        axes[1].plot(line.index, line["images_per_s"], lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (mse + vb)")
    axes[1].set_title("training throughput (images/s)")
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=5, loc="upper left", bbox_to_anchor=(1.02, 1))
    _save(fig, ctx["figures_dir"], "loss_curves", ctx["pdf"])


SECTIONS: list[Callable[[dict], None]] = [
    section_title, section_gap_table, section_psnr_curves, section_gap_bars, section_appendix_c, section_fid,
    section_fid_curve, section_fid_vs_gflops, section_samples, section_costs, section_freeu, section_freeu_samples,
    section_jacobian, section_attention, section_attention_locality, section_gmm_masks, section_loss_curves,
]


def measurement_tables() -> list[str]:
    from .measurements import report_tables

    return report_tables()


def array_files() -> dict[str, list[str]]:
    """Study-level array packs per measurement (the per-run outputs after its table), named by the registry."""
    from .measurements import MEASUREMENTS, load_plugins

    load_plugins()
    return {name: [analysis.study_array_name(o) for o in m.outputs[1:]]
            for name, m in MEASUREMENTS.items() if len(m.outputs) > 1}


def plugin_sections() -> list[Callable[[dict], None]]:
    """Report sections of registered plugin measurements (after the built-in ones, in registration order)."""
    from .measurements import plugins

    return [m.section if callable(m.section) else globals()[m.section] for m in plugins().values() if m.section]


def build_report(study: dict, study_dir: str | Path, out: str | Path, figures_dir: str | Path | None = None,
                 tables_dir: str | Path | None = None) -> list:
    """Render the study's report from ``study_dir``'s declared files; returns the typeset sections (title, seed item,
    first page, pages, status) in order."""
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
    }
    for table in ("psnr", "train_log", "counts", *measurement_tables()):  # the registry's tables (diffbias.measurements)
        if (study_dir / f"{table}.parquet").exists():
            ctx[table] = pd.read_parquet(study_dir / f"{table}.parquet")
    packs = []  # kept open while the sections draw: arrays are read from them on use
    for name, files in array_files().items():
        for fname in files:
            path = study_dir / "arrays" / fname
            if path.exists():
                packs.append(np.load(path, allow_pickle=False))
                ctx["arrays"].setdefault(name, {}).update(analysis.unpack_arrays(packs[-1]))
    try:
        return _render(ctx, study)
    finally:
        for pack in packs:
            pack.close()


def _render(ctx: dict, study: dict) -> list:
    doc = Document(f"diffbias report: {study['name']}")
    ctx["pdf"] = doc
    not_measured = []
    for fn in [*SECTIONS, *plugin_sections()]:
        title = getattr(fn, "title", None) or (fn.__doc__ or fn.__name__).strip().splitlines()[0]
        entry = doc.begin(title, getattr(fn, "reproduces", ""))
        try:
            _need(ctx, *getattr(fn, "needs", ()))
            fn(ctx)
        except NotMeasured as why:
            entry.status = str(why)
            not_measured.append(entry)
    if not_measured:
        doc.begin("Not measured in this study", "")
        doc.text("Not measured in this study", [f"{s.title} ({s.reproduces}): {s.status}" for s in not_measured])
    sections = doc.write(ctx["out"])
    # the contents as data, for checks that need no PDF parser (CI: every seed item of the coverage list rendered)
    ctx["tables_dir"].mkdir(parents=True, exist_ok=True)
    with atomic_path(ctx["tables_dir"] / "report_sections.json") as tmp:
        tmp.write_text(json.dumps([vars(s) for s in sections], indent=1))
    return sections
