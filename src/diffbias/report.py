"""Paper-style figures, tables and a PDF report per study.

A report is a list of sections; each section renders from the study's tidy parquet files if they exist,
so a new measurement adds one section function here and one input to the report rule.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

from .analysis import format_table, gap_summary, gap_table  # noqa: E402
from .io import atomic_path, read_parquet_metadata  # noqa: E402

sns.set_theme(style="whitegrid", context="paper")


def _save(fig: plt.Figure, figures_dir: Path, name: str, pdf: PdfPages) -> None:
    figures_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(figures_dir / f"{name}.png") as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format="png")
    pdf.savefig(fig, bbox_inches="tight")
    plt.close(fig)


def _text_page(pdf: PdfPages, title: str, body: str) -> None:
    fig = plt.figure(figsize=(8.27, 11.69))
    fig.text(0.08, 0.95, title, fontsize=16, weight="bold", va="top")
    wrapped = "\n".join(textwrap.fill(line, 100) if len(line) > 100 else line for line in body.splitlines())
    fig.text(0.08, 0.90, wrapped, fontsize=8.5, va="top", family="monospace")
    pdf.savefig(fig)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


def section_title(ctx: dict) -> None:
    study, psnr = ctx["study"], ctx["psnr"]
    meta = read_parquet_metadata(ctx["study_dir"] / "psnr.parquet")
    runs = meta.get("runs", {})
    first = next(iter(runs.values()), None) or {}
    lines = [
        f"Study: {study['name']}",
        study.get("title", ""),
        "",
        f"Data set(s): {', '.join(sorted(psnr['dataset'].unique()))}",
        f"Variants:   {', '.join(study['variants'])}",
        f"N:          {', '.join(map(str, study['N']))}",
        f"Seeds:      {', '.join(map(str, study['seeds']))}",
        f"Runs:       {len(runs)}",
        "",
        "Scale: " + study.get("scale_note", ""),
        "",
        *(["What this study can and cannot show: " + study["summary"], ""] if study.get("summary") else []),
        *_findings(ctx),
        "Provenance (first run; every run's is in the parquet metadata):",
        f"  git commit {first.get('git_commit')}  dirty={first.get('git_dirty')}",
        f"  device {json.dumps(first.get('device'))}",
        f"  packages {json.dumps(first.get('packages'))}",
        "",
        "Variants and their model options:",
    ]
    for v, spec in study.get("variant_specs", {}).items():
        lines.append(f"  {v}: {json.dumps(spec)}")
    _text_page(ctx["pdf"], "diffbias report", "\n".join(lines))


def _findings(ctx: dict) -> list[str]:
    """What this run's own numbers say about memorisation (seed 004 fig. 2), as found, per variant and N."""
    psnr = ctx["psnr"]
    runs = psnr.groupby(["variant", "N", "seed"], as_index=False).agg(
        gap=("gap", "mean"), above=("psnr_train", "mean"), below=("psnr_test", "mean"))
    per = runs.groupby(["variant", "N"], as_index=False)[["gap", "above", "below"]].mean()
    lines = ["Measured here (mean PSNR gap over the respaced steps; train/test = mean PSNR of one-step denoising):"]
    for v in ctx["study"]["variants"]:
        parts = [f"N={int(r.N)}: gap {r.gap:.2f} dB (train {r.above:.1f} / test {r.below:.1f} dB)"
                 for r in per[per["variant"] == v].sort_values("N").itertuples()]
        lines.append(f"  {ctx['labels'].get(v, v)}: " + "; ".join(parts))
    return lines + [""]


def section_psnr_curves(ctx: dict) -> None:
    """Seed 004 fig. 2 (a): train/test PSNR over diffusion steps, one panel per variant, colour = N."""
    psnr = ctx["psnr"]
    variants = ctx["study"]["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(3.2 * len(variants), 3), sharey=True, squeeze=False)
    long = psnr.melt(id_vars=["variant", "N", "seed", "t"], value_vars=["psnr_train", "psnr_test"], var_name="split", value_name="PSNR")
    long["split"] = long["split"].str.replace("psnr_", "")
    for ax, v in zip(axes[0], variants):
        sub = long[long["variant"] == v]
        sns.lineplot(data=sub, x="t", y="PSNR", hue="N", style="split", ax=ax, palette="viridis", errorbar="sd", legend=ax is axes[0][-1])
        ax.set_title(ctx["labels"].get(v, v))
        ax.set_xlabel("diffusion step t")
    if axes[0][-1].get_legend():
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1))
    fig.suptitle("PSNR of one-step denoising, training vs test images (seed 004 fig. 2a)")
    _save(fig, ctx["figures_dir"], "psnr_curves", ctx["pdf"])

    fig, axes = plt.subplots(1, len(variants), figsize=(3.2 * len(variants), 2.6), sharey=True, squeeze=False)
    for ax, v in zip(axes[0], variants):
        sub = psnr[psnr["variant"] == v]
        sns.lineplot(data=sub, x="t", y="gap", hue="N", ax=ax, palette="viridis", errorbar="sd", legend=ax is axes[0][-1])
        ax.set_title(ctx["labels"].get(v, v))
        ax.set_ylabel("PSNR gap (dB)")
    fig.suptitle("PSNR gap over diffusion steps (seed 004 fig. 2b)")
    _save(fig, ctx["figures_dir"], "psnr_gap_curves", ctx["pdf"])


def section_gap_bars(ctx: dict) -> None:
    """Seed 004 figs. 6-8: mean PSNR gap per N and variant (mean and spread over seeds)."""
    psnr = ctx["psnr"]
    per_run = psnr.groupby(["variant", "label", "N", "seed"], as_index=False)["gap"].mean()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    order = [ctx["labels"].get(v, v) for v in ctx["study"]["variants"]]
    sns.barplot(data=per_run, x="N", y="gap", hue="label", hue_order=order, errorbar="sd", ax=ax, palette="Set2")
    ax.set_ylabel("mean PSNR gap (dB), lower = better generalisation")
    ax.set_title("PSNR gap per training-set size (seed 004 figs. 6-7)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1))
    _save(fig, ctx["figures_dir"], "psnr_gap_bars", ctx["pdf"])


def section_gap_table(ctx: dict) -> None:
    study = ctx["study"]
    summary = gap_summary(ctx["psnr"])
    table = gap_table(summary, study["variants"], study.get("baseline"))
    tables_dir = ctx["study_dir"] / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    md, tex = format_table(table, "markdown"), format_table(table, "latex")
    for name, text in (("psnr_gap.md", md), ("psnr_gap.tex", tex)):
        with atomic_path(tables_dir / name) as tmp:
            tmp.write_text(text)
    seeds = ", ".join(map(str, study["seeds"]))
    _text_page(ctx["pdf"], "Mean PSNR gap (dB)", f"Mean over the respaced steps and over seeds {seeds}; "
               f"in brackets the change against the baseline row ({study.get('baseline')}). Lower is better.\n\n" + md)


def section_loss_curves(ctx: dict) -> None:
    log = ctx.get("train_log")
    if log is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    sns.lineplot(data=log, x="step", y="loss", hue="label", style="N", ax=axes[0], errorbar=None)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (mse + vb)")
    sns.lineplot(data=log, x="step", y="images_per_s", hue="label", ax=axes[1], errorbar=None, legend=False)
    axes[1].set_title("training throughput (images/s)")
    sns.move_legend(axes[0], "upper left", bbox_to_anchor=(2.25, 1))
    _save(fig, ctx["figures_dir"], "loss_curves", ctx["pdf"])


def section_counts(ctx: dict) -> None:
    """Parameters and FLOPs per variant (seed 002 table 2 / seed 004 fig. 3 captions), beside published counts."""
    counts = ctx.get("counts")
    if counts is None:
        return
    view = counts[["label", "backbone", "preset", "input", "params", "gmacs", "reference_params", "reference_gflops"]].copy()
    view["params"] = view["params"].map(lambda p: f"{p / 1e6:.3f}M")
    view = view.rename(columns={"gmacs": "GFLOPs (MACs, fvcore)", "reference_params": "published params",
                                "reference_gflops": "published GFLOPs"})
    md = view.to_markdown(index=False, floatfmt=".4f")
    # Published counts of the paper presets, each beside ours at its own input and under its own convention.
    published = [f"- {r.label}: {r.published}" for r in counts.itertuples() if getattr(r, "published", "")]
    if published:
        md += ("\n\nPublished counts, ours at the published input (source [convention, input]: published (ours)); conventions: diffbias = the above "
               "(the DiT paper's), fvcore-as-shipped = fvcore without handles (fused attention matmuls and the "
               "signal function cost 0), torchinfo-mult-adds = conv params x positions + other params once:\n"
               + "\n".join(published))
    _text_page(ctx["pdf"], "Parameters and FLOPs", "Multiply-accumulates per image as fvcore counts them, with handles "
               "for fused/local attention, masks, FFTs and the DICE signal function.\n\n" + md)


def section_fid(ctx: dict) -> None:
    """Seed 004 tables 1-3 layout: KID and FID per variant and N (lower is better), with the sample counts used.

    KID leads: it is unbiased at any sample count and its spread over random subsets (smaller than the
    sample set) is a real uncertainty; FID from a few hundred samples or fewer is biased upwards.
    """
    fid = ctx.get("fid")
    if fid is None:
        return
    study = ctx["study"]
    if "kid_subset_size" not in fid:  # tables written before KID subsets were recorded
        fid = fid.assign(kid_subset_size=fid["num_samples"])
    per = fid.groupby(["variant", "N"], as_index=False).agg(
        kid=("kid_mean", "mean"), kid_std=("kid_std", "mean"), fid=("fid", "mean"), fid_std=("fid", "std"),
        precision=("precision", "mean"), recall=("recall", "mean"), samples=("num_samples", "first"),
        subset=("kid_subset_size", "first"), reference=("num_reference", "first"), steps=("sampling_steps", "first"),
        seeds=("seed", "count"))
    per["variant"] = pd.Categorical(per["variant"], study["variants"], ordered=True)
    per = per.sort_values(["N", "variant"])
    per.insert(0, "model", per["variant"].map(lambda v: ctx["labels"].get(v, v)))
    per["KID x1e3"] = [f"{k * 1e3:.2f} +- {s * 1e3:.2f}" for k, s in zip(per["kid"], per["kid_std"])]
    per["FID"] = [f"{f:.1f}" + (f" +- {s:.1f}" if s == s else "") for f, s in zip(per["fid"], per["fid_std"])]
    cols = ["model", "N", "KID x1e3", "FID", "precision", "recall", "samples", "subset", "reference", "steps", "seeds"]
    md = per[cols].to_markdown(index=False, floatfmt=".3f")
    tables_dir = ctx["study_dir"] / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(tables_dir / "fid.md") as tmp:
        tmp.write_text(md)
    # the page shows the columns that fit its width; the counts common to every row go into the note
    page = per[["model", "N", "KID x1e3", "FID", "precision", "recall"]].rename(columns={"precision": "prec."})
    counts = per[["samples", "subset", "reference", "steps", "seeds"]].drop_duplicates()
    shown = page.to_markdown(index=False, floatfmt=".3f")
    if len(counts) == 1:
        c = counts.iloc[0]
        shown += (f"\n\nEvery row: {c['samples']} samples of {c['steps']} sampling steps, KID subsets of {c['subset']}, "
                  f"{c['reference']} reference images, {c['seeds']} seed(s).")
    else:
        shown = md
    small = int(per["samples"].min()) < 10_000
    note = ("KID leads this table: it is an unbiased estimate at any sample count, and its +- is the standard deviation "
            "over 100 random subsets of 'subset' samples and reference images (subsets smaller than the sets, so the "
            "spread is real). FID +- is the spread over seeds (blank with one seed). "
            + ("With so few samples FID is biased upwards and ranks little: compare rows with equal 'samples' only. "
               if small else "")
            + "All through torch-fidelity (Inception-v3, offline weights); Inception Score is not available with those "
            "weights (no classifier logits) and is reported as missing.\n\n")
    _text_page(ctx["pdf"], "KID and FID (seed 004 table 1 layout)", note + shown)


def section_freeu(ctx: dict) -> None:
    """Seed 000 figs. 5-7 and its FID grid: FreeU-style (b, s) scaling evaluated on one trained U-ViT per run."""
    import numpy as np

    freeu = ctx.get("freeu")
    if freeu is None:
        return
    results_root = ctx["study_dir"].parent.parent
    for (dataset, variant, n, seed), sub in freeu.groupby(["dataset", "variant", "N", "seed"]):
        grid = sub.pivot_table(index="b", columns="s", values="fid")
        fig, ax = plt.subplots(figsize=(4.2, 3.2))
        sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis_r", ax=ax, cbar_kws={"label": "FID"})
        ax.set_title(f"{ctx['labels'].get(variant, variant)} N={n}: FID over (b, s)\n"
                     f"{int(sub['num_samples'].iloc[0])} samples, {int(sub['sampling_steps'].iloc[0])} steps")
        _save(fig, ctx["figures_dir"], f"freeu_fid_{variant}_N{n}_seed{seed}", ctx["pdf"])
        path = results_root / "runs" / dataset / variant / f"N{n}" / f"seed{seed}" / f"freeu-{ctx['study']['name']}-samples.npz"
        if not path.exists():
            continue
        samples = np.load(path)
        bs, ss = sorted(sub["b"].unique()), sorted(sub["s"].unique(), reverse=True)
        fig, axes = plt.subplots(len(bs), len(ss), figsize=(1.9 * len(ss), 1.9 * len(bs)), squeeze=False)
        for i, b in enumerate(bs):
            for j, s_ in enumerate(ss):
                imgs = samples[f"b{b}_s{s_}"][:16]
                k = int(np.ceil(np.sqrt(len(imgs))))
                c, h, w = imgs.shape[1:]
                tile = np.zeros((k * h, k * w, c), dtype=np.uint8)
                for idx, im in enumerate(imgs):
                    tile[(idx // k) * h:(idx // k + 1) * h, (idx % k) * w:(idx % k + 1) * w] = im.transpose(1, 2, 0)
                axes[i][j].imshow(tile.squeeze(-1) if c == 1 else tile, cmap="gray" if c == 1 else None)
                axes[i][j].set_xticks([]), axes[i][j].set_yticks([])
                axes[i][j].set_title(f"b={b}, s={s_}", fontsize=7)
        fig.suptitle(f"{ctx['labels'].get(variant, variant)} N={n}: samples per (b, s), same seeds (seed 000 figs. 5-7)")
        _save(fig, ctx["figures_dir"], f"freeu_samples_{variant}_N{n}_seed{seed}", ctx["pdf"])


def section_fid_curve(ctx: dict) -> None:
    """Seed 002 figs. 11-12: FID of the EMA snapshots over training, one line per variant, one panel per N."""
    curve = ctx.get("fid_curve")
    if curve is None or curve.empty:
        return
    g = sns.relplot(data=curve, x="step", y="fid", hue="label", col="N", kind="line", marker="o", errorbar=None,
                    height=3.0, aspect=1.2, facet_kws={"sharey": False})
    g.set_axis_labels("training step", "FID")
    samples = int(curve["num_samples"].iloc[0])
    g.figure.suptitle(f"FID over training (EMA snapshots; {samples} samples, "
                      f"{int(curve['sampling_steps'].iloc[0])} steps, same sample seeds at every step)", y=1.05)
    _save(g.figure, ctx["figures_dir"], "fid_curve", ctx["pdf"])


def section_costs(ctx: dict) -> None:
    """Seed 002 table 2 style: training throughput, sampling throughput and peak memory per variant."""
    log = ctx.get("train_log")
    if log is None or "peak_memory_mb" not in log:
        return
    last = log.sort_values("step").groupby(["dataset", "variant", "N", "seed"], as_index=False).last()
    per = last.groupby(["label", "variant"], as_index=False).agg(
        train_images_per_s=("images_per_s", "median"), peak_memory_mb=("peak_memory_mb", "max"),
        memory=("memory_kind", "first"), device=("device", "first"))
    fid = ctx.get("fid")
    if fid is not None and "sampling_images_per_s" in fid:
        sampling = fid.groupby("variant", as_index=False).agg(
            sampling_images_per_s=("sampling_images_per_s", "median"), sampling_steps=("sampling_steps", "first"))
        per = per.merge(sampling, on="variant", how="left")
    order = {v: i for i, v in enumerate(ctx["study"]["variants"])}
    per = per.sort_values("variant", key=lambda s: s.map(order)).drop(columns="variant")
    _text_page(ctx["pdf"], "Throughput and memory", "Training images/s: median over runs of the last logged interval; "
               "peak memory: cuda_max_allocated on a GPU, the process's peak RSS on a CPU (an upper bound); sampling "
               "images/s from the FID runs.\n\n" + per.to_markdown(index=False, floatfmt=".1f"))


def section_gmm_masks(ctx: dict) -> None:
    """Seed 000 appendix: the learned Gaussian-mixture masks per head and block (centre token's row)."""
    import numpy as np

    from .metrics.gmm_masks import plot_gmm_masks

    gmm = ctx.get("gmm_masks")
    if gmm is None or gmm.empty:
        return
    for (dataset, variant, n, seed), sub in gmm.groupby(["dataset", "variant", "N", "seed"]):
        path = _run_dir(ctx, dataset, variant, n, seed) / "gmm_masks.npz"
        if not path.exists():
            continue
        data = np.load(path)
        maps = {name: data[name] for name in sub.sort_values("block_index")["block"].unique()}
        fig = plot_gmm_masks(maps, f"{ctx['labels'].get(variant, variant)}, N={n}: learned Gaussian-mixture mask of the "
                                   "centre token, per block (rows) and head (columns)")
        _save(fig, ctx["figures_dir"], f"gmm_masks_{variant}_N{n}_seed{seed}", ctx["pdf"])
    kernels = gmm.groupby(["label", "block"], as_index=False, sort=False).agg(
        alpha_mean=("alpha", "mean"), sigma_median=("sigma", "median"), mask_at_0=("mask_at_0", "mean"))
    _text_page(ctx["pdf"], "Gaussian-mixture mask parameters", "Per block: mean alpha, median |sigma| (tokens) over heads "
               "and kernels, and the mask at distance 0 (mean over heads).\n\n" + kernels.to_markdown(index=False, floatfmt=".3f"))


def _run_dir(ctx: dict, dataset, variant, n, seed) -> Path:
    return ctx["study_dir"].parent.parent / "runs" / str(dataset) / str(variant) / f"N{n}" / f"seed{seed}"


def section_jacobian(ctx: dict) -> None:
    """Seed 004 figs. 1 and 3: Jacobian eigenvalue spectra and top eigenvectors (channels split) per variant and N."""
    import numpy as np

    from .metrics.jacobian import plot_eigenvectors

    jac = ctx.get("jacobian")
    if jac is None or jac.empty:
        return
    spectra = jac[jac["image"] == 0]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    sns.lineplot(data=spectra, x="rank", y="eigenvalue", hue="label", style="N", ax=ax, errorbar=None)
    ax.set_xscale("symlog")
    ax.set_title("Eigenvalues of the symmetrised denoiser Jacobian (image 0)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1))
    _save(fig, ctx["figures_dir"], "jacobian_spectra", ctx["pdf"])
    asym = jac.groupby(["label", "N", "t"], as_index=False)["asymmetry"].mean()
    for (dataset, variant, n, seed), sub in jac.groupby(["dataset", "variant", "N", "seed"]):
        path = _run_dir(ctx, dataset, variant, n, seed) / "jacobian_vectors.npz"
        if not path.exists():
            continue
        vecs = np.load(path)["eigenvectors"][0, 0]  # image 0, first t
        vals = sub[(sub["image"] == 0) & (sub["t"] == sub["t"].min())].sort_values("rank")["eigenvalue"].to_numpy()[: len(vecs)]
        fig = plot_eigenvectors(vecs, vals)
        a = float(sub["asymmetry"].iloc[0])
        fig.suptitle(f"{ctx['labels'].get(variant, variant)}, N={n}: top Jacobian eigenvectors at t={int(sub['t'].min())} "
                     f"(||J-J^T||/||J|| = {a:.3f})", fontsize=9)
        _save(fig, ctx["figures_dir"], f"jacobian_eigvecs_{variant}_N{n}_seed{seed}", ctx["pdf"])
    _text_page(ctx["pdf"], "Jacobian asymmetry", "||J - J^T||_F / ||J||_F of the denoiser Jacobian (eigenvectors "
               "are those of the symmetrised Jacobian).\n\n" + asym.to_markdown(index=False, floatfmt=".4f"))


def section_attention(ctx: dict) -> None:
    """Seed 004 fig. 4 / figs. 9-11 (maps) and, beyond the seed, attention locality per layer against N."""
    import numpy as np

    from .metrics.attention_maps import plot_attention_maps

    att = ctx.get("attention")
    if att is None or att.empty:
        return
    mean = att[(att["head"] == "mean")]
    for metric, title in (("mass_r1", "attention mass within radius 1"), ("mean_distance", "mean attention distance (tokens)"),
                          ("entropy", "attention entropy (nats)")):
        sub = mean[mean["metric"] == metric]
        if sub.empty:
            continue
        g = sns.relplot(data=sub, x="layer", y="value", hue="N", col="label", kind="line", marker="o", palette="viridis",
                        height=2.6, aspect=1.0, facet_kws={"sharey": True})
        g.set_titles("{col_name}")
        g.set_axis_labels("layer", metric)
        g.figure.suptitle(f"Locality per layer: {title}", y=1.04)
        _save(g.figure, ctx["figures_dir"], f"attention_{metric}", ctx["pdf"])
    for (dataset, variant, n, seed), sub in att.groupby(["dataset", "variant", "N", "seed"]):
        path = _run_dir(ctx, dataset, variant, n, seed) / "attention_maps.npz"
        if not path.exists():
            continue
        data = np.load(path)
        layers = sorted((k for k in data.files if k.startswith("layer")), key=lambda k: int(k[5:]))
        if not layers:
            continue
        show = layers[1::2] if len(layers) > 6 else layers  # seed fig. 4 shows every other layer
        maps = [torch_from(data[k][0]) for k in show]  # image 0, head-averaged
        grid = (int(sub["grid_h"].iloc[0]), int(sub["grid_w"].iloc[0]))
        fig = plot_attention_maps(maps, grid, titles=[f"layer {k[5:]}" for k in show])
        fig.suptitle(f"{ctx['labels'].get(variant, variant)}, N={n}: attention maps (normalised, colour map on [0, 0.1]) "
                     f"at t={int(data['t'])}", fontsize=9)
        _save(fig, ctx["figures_dir"], f"attention_maps_{variant}_N{n}_seed{seed}", ctx["pdf"])


def torch_from(array):
    import torch

    return torch.from_numpy(array.astype("float32"))


SECTIONS: list[Callable[[dict], None]] = [
    section_title, section_gap_table, section_psnr_curves, section_gap_bars, section_fid, section_fid_curve, section_freeu,
    section_jacobian, section_attention, section_gmm_masks, section_counts, section_costs, section_loss_curves,
]


def measurement_tables() -> list[str]:
    from .measurements import report_tables

    return report_tables()


def plugin_sections() -> list[Callable[[dict], None]]:
    """Report sections of registered plugin measurements (after the built-in ones, in registration order)."""
    from .measurements import plugins

    return [m.section if callable(m.section) else globals()[m.section] for m in plugins().values() if m.section]


def build_report(study: dict, study_dir: str | Path, out: str | Path) -> None:
    study_dir = Path(study_dir)
    ctx = {
        "study": study,
        "study_dir": study_dir,
        "figures_dir": study_dir / "figures",
        "labels": study.get("labels", {}),
        "psnr": pd.read_parquet(study_dir / "psnr.parquet"),
    }
    for table in ("train_log", "counts", *measurement_tables()):  # the registry's tables (diffbias.measurements)
        if table != "psnr" and (study_dir / f"{table}.parquet").exists():
            ctx[table] = pd.read_parquet(study_dir / f"{table}.parquet")
    with atomic_path(out) as tmp:
        with PdfPages(tmp) as pdf:
            ctx["pdf"] = pdf
            for section in [*SECTIONS, *plugin_sections()]:
                section(ctx)
            info = pdf.infodict()
            info["Title"] = f"diffbias report: {study['name']}"
