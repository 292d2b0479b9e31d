"""The learned Gaussian-mixture attention masks of a U-ViT, per head and block (paper 000 appendix, figs. 8-20):
each block's mask of the centre token over the token grid, and the kernels' parameters."""

from __future__ import annotations

from .. import analysis
from ..sections import display, first_runs, frame_table, save_figure, section
from . import Measurement, Result, register_measurement


def compute(run, cfg: dict) -> Result:
    from ..metrics.gmm_masks import gmm_mask_summary

    df, centre_maps = gmm_mask_summary(run.model)
    if df.empty:  # capability and option say it has masks: an empty summary is a broken model, not a result
        raise SystemExit(f"{run.run}: the model has no Gaussian-mixture masks (set options.gmm: true)")
    return Result(df, arrays=centre_maps)


@section("Gaussian-mixture masks", {"000": "figs. 8-20 (learned masks per head and block)"}, needs=("gmm_masks",))
def section_gmm_masks(ctx: dict) -> None:
    from ..metrics.gmm_masks import plot_gmm_masks

    gmm = ctx["gmm_masks"]
    packed = ctx["arrays"].get("gmm_masks") or {}
    for r in first_runs(gmm).itertuples():
        arrays = packed.get(analysis.run_key(r.dataset, r.variant, r.N, r.seed))
        if not arrays:
            continue
        sub = gmm[(gmm["variant"] == r.variant) & (gmm["N"] == r.N) & (gmm["dataset"] == r.dataset)]
        maps = {name: arrays[name] for name in sub.sort_values("block_index")["block"].unique() if name in arrays}
        fig = plot_gmm_masks(maps, f"{r.dataset}, {display(ctx, r.variant)}, N={r.N}: learned Gaussian-mixture mask of "
                                   "the centre token, per block (rows) and head (columns)")
        save_figure(ctx, fig, f"gmm_masks_{r.dataset}_{r.variant}_N{r.N}")
    kernels = gmm.groupby(["label", "block"], as_index=False, sort=False).agg(
        alpha_mean=("alpha", "mean"), sigma_median=("sigma", "median"), mask_at_0=("mask_at_0", "mean"))
    ctx["pdf"].table("Gaussian-mixture mask parameters", frame_table(kernels, formats={c: ".3f" for c in kernels.columns[2:]}),
                     caption="Per block: mean alpha, median |sigma| (tokens) over heads and kernels, and the mask at "
                             "distance 0 (mean over heads).")


register_measurement(Measurement(
    name="gmm_masks",
    description="the learned Gaussian-mixture masks per head and block of every U-ViT run with masks (paper 000)",
    compute=compute,
    N=None,
    capability="has_gmm_masks",
    option="gmm",
    arrays=True,
    sections=(section_gmm_masks,),
))
