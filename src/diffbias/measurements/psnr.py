"""PSNR gap (paper 004 eqs. 2-4, fig. 2): PSNR of one-step denoising on training vs held-out images per timestep.

The gap = PSNR(train) - PSNR(test) > 0 means the model denoises the images it was trained on better than unseen
ones: memorisation. MSE is averaged over the K images first, then PSNR with M = 2; x0_hat is the VP one-step
estimate, unclipped by default (the paper's eq. 3).

A latent run (papers 002/003's setting) is measured where it trains, on its cached latents (``space`` column
"latent"), with the same M = 2: the gap does not depend on M (it cancels in PSNR_train - PSNR_test), and the SD
scale factor 0.18215 was chosen to give the latents unit variance, the scale the noise schedule is calibrated for, as
for pixels in [-1, 1]; a data-dependent peak (the cache's max - min) would move with outliers and differ between data
sets. ``clip`` is not applied to latents (they have no [-1, 1] range); ``x0_clipped`` records what was done.
"""

from __future__ import annotations

import numpy as np

from .. import analysis
from ..sections import (NotApplicable, datasets, display, layout_table, plt, reduced_variants, save_figure, section,
                        space_note, variants, write_table)
from . import Cost, Measurement, Result, register_measurement

SETTINGS = {
    "num_images": {"type": "integer", "minimum": 1, "default": 300, "description": "K images per split (paper 004 A.3)"},
    "respacing": {"type": "integer", "minimum": 2, "default": 50, "description": "respaced timesteps of the curve"},
    "noise_seed": {"type": "integer", "default": 0, "description": "the same noise for every model (paired comparison)"},
    "batch_size": {"type": "integer", "minimum": 1, "default": 256},
    "clip": {"type": "boolean", "default": False,
             "description": "clip the one-step estimate x0_hat to [-1, 1]; paper 004 eq. 3 and Kadkhodaie et al. do "
                            "not (default), the DiT/ADM samplers do"},
}


def compute(run, cfg: dict) -> Result:
    from ..metrics.psnr import psnr_gap

    k = cfg["num_images"]
    train, test = run.train_images(k), run.test_images(k)  # all N training images when N < K
    clip = cfg["clip"] and run.space == "pixel"  # [-1, 1] is the pixels' range; latents have none
    df = psnr_gap(run.model, train.x, test.x, train_labels=train.y, test_labels=test.y, respacing=cfg["respacing"],
                  noise_seed=cfg["noise_seed"], batch_size=cfg["batch_size"], clip=clip)
    df["x0_clipped"] = clip
    df["space"] = run.space
    print(f"[psnr {run.run}] mean gap {df['gap'].mean():.3f} dB over {len(df)} steps (K={len(train)}/{len(test)}, "
          f"x0 clipped: {clip}, {run.space} space)")
    return Result(df, meta={"psnr": {"K_train": len(train), "K_test": len(test)}})


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
    lines = ["Measured here (mean PSNR gap over the respaced steps; train/test = mean PSNR of one-step denoising):"]
    for d in datasets(ctx, psnr):
        for v in variants(ctx, psnr):
            parts = [f"N={int(r.N)}: gap {r.gap:.2f} dB (train {r.above:.1f} / test {r.below:.1f} dB)"
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
    layout = analysis.layout_comparison(analysis.compare(analysis.per_run_mean(ctx["psnr"], "gap"), study, "gap"),
                                        study, digits=4, datasets=datasets(ctx, ctx["psnr"]))
    write_table(ctx, "psnr_gap", layout)
    ctx["pdf"].table("Mean PSNR gap (dB), lower is better", layout_table(layout),
                     caption=f"Mean over the respaced steps, then mean ± std over seeds {', '.join(map(str, study['seeds']))}. "
                             "Best value of each column within a block in bold; under each variant its change against "
                             "its own baseline (same backbone and preset). " + clip_note(ctx["psnr"]) + " "
                             + space_note(ctx["psnr"], "PSNR"))


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
                axes[1][j].fill_between(t, mean[("gap", "mean")] - mean[("gap", "std")].fillna(0),
                                        mean[("gap", "mean")] + mean[("gap", "std")].fillna(0), color=colour, alpha=0.2)
            axes[0][j].set_title(display(ctx, v), fontsize=8)
            axes[1][j].set_xlabel("diffusion step t")
        axes[0][0].set_ylabel("PSNR (dB)")
        axes[1][0].set_ylabel("PSNR gap (dB)")
        axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
        extra = " — UNet vs DiT at matched FLOPs" if "unet" in backbones and "dit" in backbones else ""
        fig.suptitle(f"{d}: (a) PSNR train (solid) / test (dashed), (b) PSNR gap, mean ± std over seeds{extra}")
        save_figure(ctx, fig, f"psnr_curves_{d}")


@section("PSNR gap per training-set size", {"004": "fig. 6 (panel per data set), figs. 7-8 (placement, window size)"},
         needs=("psnr",))
def section_gap_bars(ctx: dict) -> None:
    gap_bars(ctx, ctx["psnr"], "psnr_gap_bars", "mean PSNR gap over the respaced steps, mean ± std over seeds")


def gap_bars(ctx: dict, psnr, name: str, title: str) -> None:
    pyplot = plt()
    per_run = analysis.per_run_mean(psnr, "gap")
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
            stats = sub[sub["variant"] == v].groupby("N")["gap"].agg(["mean", "std"]).reindex(ns)
            ax.bar(np.arange(len(ns)) + (i - (len(shown) - 1) / 2) * bar, stats["mean"], bar,
                   yerr=stats["std"].fillna(0), color=colours[i], label=display(ctx, v), capsize=2)
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
))
