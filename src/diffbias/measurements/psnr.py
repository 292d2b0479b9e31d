"""PSNR gap (paper 004 eqs. 2-4, fig. 2): PSNR of one-step denoising on training vs held-out images per timestep.

The gap = PSNR(train) - PSNR(test) > 0 means the model denoises the images it was trained on better than unseen
ones: memorisation. MSE is averaged over the K images first, then PSNR with M = 2; x0_hat is the VP one-step
estimate, unclipped by default (the paper's eq. 3).

A latent run (papers 002/003's setting) is measured where it trains, on its cached latents (``space`` column
"latent"), with the same M = 2: the gap does not depend on M (it cancels in PSNR_train - PSNR_test), and the SD
scale factor 0.18215 was chosen to give the latents unit variance, the scale the noise schedule is calibrated for, as
for pixels in [-1, 1]; a data-dependent peak (the cache's max - min) would move with outliers and differ between data
sets. ``clip`` is not applied to latents (they have no [-1, 1] range); ``x0_clipped`` records what was done.

Uncertainty: a percentile bootstrap over the K training and the K test images (each resampled with replacement,
each image keeping its fixed noise) gives a 95 % interval of the gap at every t (``gap_low``/``gap_high``) and of the
run's mean gap over t (``mean_gap_low``/``mean_gap_high``). It covers evaluation noise only: which K images and
which noise; the spread over seeds (training data, initialisation) is the comparison tables' other interval.
"""

from __future__ import annotations

import numpy as np

from .. import analysis
from ..sections import (NotApplicable, datasets, display, layout_table, plt, reduced_variants, save_figure, section,
                        space_note, variants, write_table)
from . import Cost, Measurement, Quantity, Result, register_measurement

SETTINGS = {
    "num_images": {"type": "integer", "minimum": 1, "default": 300, "description": "K images per split (paper 004 A.3)"},
    "respacing": {"type": "integer", "minimum": 2, "default": 50, "description": "respaced timesteps of the curve"},
    "noise_seed": {"type": "integer", "default": 0, "description": "the same noise for every model (paired comparison)"},
    "batch_size": {"type": "integer", "minimum": 1, "default": 256},
    "clip": {"type": "boolean", "default": False,
             "description": "clip the one-step estimate x0_hat to [-1, 1]; paper 004 eq. 3 and Kadkhodaie et al. do "
                            "not (default), the DiT/ADM samplers do"},
    "bootstrap": {"type": "integer", "minimum": 0, "default": 1000,
                  "description": "bootstrap resamples of the K images for the gap's intervals (0: none)"},
    "confidence": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.95},
    "bootstrap_seed": {"type": "integer", "default": 0, "description": "draws the resampled image indices"},
}


def compute(run, cfg: dict) -> Result:
    from ..metrics.psnr import gap_bootstrap, psnr_gap

    k = cfg["num_images"]
    train, test = run.train_images(k), run.test_images(k)  # all N training images when N < K
    clip = cfg["clip"] and run.space == "pixel"  # [-1, 1] is the pixels' range; latents have none
    errors = {}
    df = psnr_gap(run.model, train.x, test.x, train_labels=train.y, test_labels=test.y, respacing=cfg["respacing"],
                  noise_seed=cfg["noise_seed"], batch_size=cfg["batch_size"], clip=clip, errors=errors)
    df["x0_clipped"] = clip
    df["space"] = run.space
    df["K_train"], df["K_test"] = len(train), len(test)
    df["bootstrap"] = cfg["bootstrap"]
    nan = float("nan")
    df["gap_low"] = df["gap_high"] = df["mean_gap_low"] = df["mean_gap_high"] = nan
    if cfg["bootstrap"] > 0:
        reps = gap_bootstrap(errors["train"], errors["test"], resamples=cfg["bootstrap"], seed=cfg["bootstrap_seed"])
        alpha = (1 - cfg["confidence"]) / 2
        df["gap_low"], df["gap_high"] = np.quantile(reps, [alpha, 1 - alpha], axis=0)
        df["mean_gap_low"], df["mean_gap_high"] = np.quantile(reps.mean(axis=1), [alpha, 1 - alpha])
    print(f"[psnr {run.run}] mean gap {df['gap'].mean():.3f} dB [{df['mean_gap_low'].iloc[0]:.3f}, "
          f"{df['mean_gap_high'].iloc[0]:.3f}] over {len(df)} steps (K={len(train)}/{len(test)}, "
          f"x0 clipped: {clip}, {run.space} space)")
    return Result(df, meta={"psnr": {"K_train": len(train), "K_test": len(test)}})


def gap_per_run(psnr):
    """The psnr_gap quantity: each run's mean gap over the respaced steps, with its bootstrap interval over the K
    images when the table has one."""
    per = psnr.groupby(analysis.RUN_KEYS, as_index=False)["gap"].mean().rename(columns={"gap": "value"})
    if {"mean_gap_low", "mean_gap_high"} <= set(psnr):
        bounds = psnr.groupby(analysis.RUN_KEYS, as_index=False).agg(low=("mean_gap_low", "first"),
                                                                    high=("mean_gap_high", "first"))
        per = per.merge(bounds, on=analysis.RUN_KEYS, how="left")
    return per


def ci_note(psnr) -> str:
    """What the gap's intervals are, as the captions say it."""
    if "mean_gap_low" not in psnr or psnr["mean_gap_low"].isna().all():
        return "No interval over the K images (evaluation.psnr.bootstrap = 0, or a table written before it existed)."
    k_train, k_test = int(psnr["K_train"].min()), int(psnr["K_test"].min())
    return (f"With one seed the bracket is a bootstrap 95 % interval over the run's K images ({int(psnr['bootstrap'].iloc[0])} "
            f"resamples of its {k_train}+ training and {k_test} test images): evaluation noise only.")


def cost(spec: dict, cfg: dict) -> Cost:
    return Cost(forwards=2.0 * cfg["num_images"] * cfg["respacing"])


def rehearse(cfg: dict, r: dict) -> None:
    cfg.update(num_images=min(cfg["num_images"], r["psnr_images"]), respacing=min(cfg["respacing"], r["respacing"]))


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def findings(ctx: dict) -> list[str]:
    """What this study's own numbers say about memorisation (paper 004 fig. 2), per data set, variant and N."""
    psnr = ctx.get("psnr")
    if psnr is None or psnr.empty:
        return []
    runs = psnr.groupby(analysis.RUN_KEYS, as_index=False).agg(gap=("gap", "mean"), above=("psnr_train", "mean"),
                                                               below=("psnr_test", "mean"))
    per = runs.groupby(["dataset", "variant", "N"], as_index=False)[["gap", "above", "below"]].mean()
    cells = analysis.summarise(gap_per_run(psnr)).set_index(["dataset", "variant", "N"])
    lines = ["Measured here (mean PSNR gap over the respaced steps [95 % interval: over the K images with one seed, "
             "over seeds with several]; train/test = mean PSNR of one-step denoising):"]

    def bracket(d, v, n) -> str:
        c = cells.loc[(d, v, n)]
        return f" [{c['low']:.2f}, {c['high']:.2f}]" if np.isfinite(c["low"]) else ""

    for d in datasets(ctx, psnr):
        for v in variants(ctx, psnr):
            parts = [f"N={int(r.N)}: gap {r.gap:.2f}{bracket(d, v, r.N)} dB (train {r.above:.1f} / test {r.below:.1f} dB)"
                     for r in per[(per["variant"] == v) & (per["dataset"] == d)].sort_values("N").itertuples()]
            if parts:
                lines.append(f"  {d}, {display(ctx, v)}: " + "; ".join(parts))
    return lines


def clip_note(psnr) -> str:
    """Which one-step estimate the PSNR used (evaluation.psnr.clip): the paper's unclipped one or the clipped."""
    if "x0_clipped" not in psnr:
        return "x0_hat clipping not recorded (a table written before evaluation.psnr.clip existed)."
    used = set(psnr["x0_clipped"].astype(bool))
    if used == {False}:
        return "x0_hat not clipped, as paper 004 eq. 3 (evaluation.psnr.clip: false)."
    if used == {True}:
        return "x0_hat clipped to [-1, 1] as the DiT/ADM samplers do (evaluation.psnr.clip: true; the paper does not clip)."
    return "Mixed: some runs clipped x0_hat and some did not (evaluation.psnr.clip changed between runs)."


@section("Mean PSNR gap per data set", {"004": "figs. 6-8 as numbers, in the layout of tables 1-3"}, needs=("psnr",))
def section_gap_table(ctx: dict) -> None:
    study = ctx["study"]
    long = analysis.compare(gap_per_run(ctx["psnr"]).rename(columns={"value": "gap"}), study, "gap")
    layout = analysis.layout_comparison(long, study, digits=4, datasets=datasets(ctx, ctx["psnr"]))
    write_table(ctx, "psnr_gap", layout)
    ctx["pdf"].table("Mean PSNR gap (dB), lower is better", layout_table(layout),
                     caption=f"Mean over the respaced steps, then mean ± std over seeds {', '.join(map(str, study['seeds']))}. "
                             "Best value of each column within a block in bold; under each variant its change against "
                             f"its own baseline (same backbone and preset), marked {analysis.RESOLVED_MARK} when the "
                             "comparison rule resolves it. " + ci_note(ctx["psnr"]) + " " + clip_note(ctx["psnr"])
                             + " " + space_note(ctx["psnr"], "PSNR"),
                     notes=["Comparison rule: " + analysis.COMPARISON_RULE, analysis.basis_note(long)])


@section("PSNR of one-step denoising, train vs test",
         {"004": "fig. 2 (a, b; UNet vs DiT when the study has both) and figs. 14-19 (one figure per data set)"},
         needs=("psnr",))
def section_psnr_curves(ctx: dict) -> None:
    pyplot, psnr = plt(), ctx["psnr"]
    backbones = {s.get("backbone") for s in ctx["study"].get("variant_specs", {}).values()}
    for d in datasets(ctx, psnr):
        sub = psnr[psnr["dataset"] == d]
        shown = variants(ctx, sub)
        ns = sorted(sub["N"].unique())
        colours = pyplot.cm.viridis(np.linspace(0, 0.9, len(ns)))
        fig, axes = pyplot.subplots(2, len(shown), figsize=(2.6 * len(shown) + 1.2, 4.6), sharey="row", squeeze=False)
        for j, v in enumerate(shown):
            for n, colour in zip(ns, colours):
                runs = sub[(sub["variant"] == v) & (sub["N"] == n)]
                if runs.empty:
                    continue
                mean = runs.groupby("t")[["psnr_train", "psnr_test", "gap"]].agg(["mean", "std"])
                t = mean.index.to_numpy()
                for col, style, name in (("psnr_train", "-", "train"), ("psnr_test", "--", "test")):
                    axes[0][j].plot(t, mean[(col, "mean")], style, color=colour, lw=1.1,
                                    label=f"N={n} {name}" if j == len(shown) - 1 else None)
                axes[1][j].plot(t, mean[("gap", "mean")], color=colour, lw=1.1)
                low = mean[("gap", "mean")] - mean[("gap", "std")].fillna(0)
                high = mean[("gap", "mean")] + mean[("gap", "std")].fillna(0)
                if runs["seed"].nunique() == 1 and "gap_low" in runs and runs["gap_low"].notna().all():
                    band = runs.groupby("t")[["gap_low", "gap_high"]].first()  # one seed: the bootstrap interval
                    low, high = band["gap_low"], band["gap_high"]
                axes[1][j].fill_between(t, low, high, color=colour, alpha=0.2)
            axes[0][j].set_title(display(ctx, v), fontsize=8)
            axes[1][j].set_xlabel("diffusion step t")
        axes[0][0].set_ylabel("PSNR (dB)")
        axes[1][0].set_ylabel("PSNR gap (dB)")
        axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
        extra = " — UNet vs DiT at matched FLOPs" if "unet" in backbones and "dit" in backbones else ""
        spread = ("95 % bootstrap interval over the K images (one seed)" if psnr["seed"].nunique() == 1
                  and "gap_low" in psnr and psnr["gap_low"].notna().all() else "mean ± std over seeds")
        fig.suptitle(f"{d}: (a) PSNR train (solid) / test (dashed), (b) PSNR gap, {spread}{extra}")
        save_figure(ctx, fig, f"psnr_curves_{d}")


@section("PSNR gap per training-set size", {"004": "fig. 6 (panel per data set), figs. 7-8 (placement, window size)"},
         needs=("psnr",))
def section_gap_bars(ctx: dict) -> None:
    gap_bars(ctx, ctx["psnr"], "psnr_gap_bars", "mean PSNR gap over the respaced steps: error bars are 95 % intervals "
             "(over seeds with several, over the K images with one)")


def gap_bars(ctx: dict, psnr, name: str, title: str) -> None:
    pyplot = plt()
    per_run = gap_per_run(psnr)
    cells = analysis.summarise(per_run)
    per_run = per_run.rename(columns={"value": "gap"})
    shown_datasets, shown = datasets(ctx, per_run), variants(ctx, per_run)
    ncols = min(3, len(shown_datasets))  # one panel per data set, as paper 004 fig. 6 (a panel grid beyond three)
    nrows = -(-len(shown_datasets) // ncols)
    width = max(3.2, 0.18 * len(shown) * len(ctx["study"]["N"]) + 1.0)
    fig, axes = pyplot.subplots(nrows, ncols, figsize=(width * ncols + 1.8, 2.8 * nrows + 0.4), squeeze=False)
    colours = pyplot.cm.tab20(np.linspace(0, 1, 20))[: max(len(shown), 1)]
    for ax in axes.flat[len(shown_datasets):]:
        ax.axis("off")
    for ax, d in zip(axes.flat, shown_datasets):
        sub = per_run[per_run["dataset"] == d]
        ns = sorted(sub["N"].unique())
        bar = 0.8 / max(len(shown), 1)
        for i, v in enumerate(shown):
            stats = cells[(cells["dataset"] == d) & (cells["variant"] == v)].set_index("N").reindex(ns)
            yerr = np.vstack([(stats["mean"] - stats["low"]).fillna(0), (stats["high"] - stats["mean"]).fillna(0)])
            ax.bar(np.arange(len(ns)) + (i - (len(shown) - 1) / 2) * bar, stats["mean"], bar,
                   yerr=yerr, color=colours[i], label=display(ctx, v), capsize=2)
        ax.set_xticks(np.arange(len(ns)), [f"N={n}" for n in ns])
        ax.set_title(d)
        ax.set_ylabel("PSNR gap (dB), lower = better")
    axes.flat[min(len(shown_datasets), ncols) - 1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(title)
    save_figure(ctx, fig, name)


@section("Appendix C: weight sharing and PCA attention", {"004": "app. C, fig. 12 (PSNR gap of baseline, local, "
         "weight sharing and PCA attention)"}, needs=("psnr",))
def section_appendix_c(ctx: dict) -> None:
    keep = reduced_variants(ctx)
    if not keep:
        raise NotApplicable("no weight-sharing or PCA-attention variant")
    gap_bars(ctx, ctx["psnr"][ctx["psnr"]["variant"].isin(keep)], "appendix_c_gap_bars",
             "Weight sharing and PCA attention vs local attention (paper 004 fig. 12 b)")


register_measurement(Measurement(
    name="psnr",
    description="PSNR gap: one-step denoising PSNR on training vs held-out images per timestep (paper 004 eqs. 2-4)",
    compute=compute,
    settings=SETTINGS,
    N=None,
    cost=cost,
    rehearse=rehearse,
    sections=(section_gap_table, section_psnr_curves, section_gap_bars, section_appendix_c),
    findings=findings,
    quantities=(Quantity("psnr_gap", "mean PSNR gap over the respaced steps (dB)", gap_per_run, lower_is_better=True,
                         interval="bootstrap 95 % CI over the run's K training and K test images"),),
))
