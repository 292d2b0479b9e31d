"""Attention maps and their locality per layer (paper 004 sec. 2.3, app. B, figs. 4 and 9-11), on held-out
images at the configured timesteps; the maps of the first timestep are kept (head-averaged) for the figures.

Applies to backbones that record attention (``records_attention``): attention-free ones (DICE, DiffuSSM) have no
maps to measure."""

from __future__ import annotations

import numpy as np

from .. import analysis
from ..sections import (NotApplicable, NotMeasured, by_variant_then_n, datasets, display, first_runs, plt, save_figure, section,
                        variants)
from . import Cost, Measurement, Result, register_measurement

SETTINGS = {
    "t": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "default": [250]},
    "num_images": {"type": "integer", "minimum": 1, "default": 6, "description": "paper 004 figs. 9-11 use 6 images"},
}
FIGURE_LAYERS = (1, 6, 12)  # paper 004 figs. 9, 10, 11


def compute(run, cfg: dict) -> Result:
    import torch

    from ..metrics.attention_maps import attention_analysis, attention_maps
    from ..metrics.jacobian import noisy_input

    images = run.test_images(cfg["num_images"])
    df = attention_analysis(run.model, images.x, cfg["t"], labels=images.y)
    df["space"] = run.space  # a latent run attends over its latent grid
    t0 = cfg["t"][0]
    x_t = torch.stack([noisy_input(img, t0, noise_seed=i) for i, img in enumerate(images.x)])
    with torch.no_grad():
        maps = attention_maps(run.model, x_t, t0, images.y)
    per_layer = {f"layer{i + 1}": m.mean(1).half().cpu().numpy() for i, m in enumerate(maps)}  # head-averaged
    arrays = {"t": np.array(t0), "images": run.to_pixels(images.x), **per_layer}  # latents: decoded images
    return Result(df, arrays=arrays, meta={"attention": cfg})


def cost(spec: dict, cfg: dict) -> Cost:
    return Cost(forwards=2.0 * cfg["num_images"] * len(cfg["t"]))


def rehearse(cfg: dict, r: dict) -> None:
    cfg.update(num_images=min(cfg["num_images"], r["attention_images"]))


@section("Attention maps", {"004": "fig. 4 (maps across N, every other layer) and figs. 9-11 (six images at layers "
         "1, 6 and 12)"}, needs=("attention",))
def section_attention(ctx: dict) -> None:
    import torch

    from ..metrics.attention_maps import LOG_DECADES, plot_attention_maps

    pyplot, att = plt(), ctx["attention"]
    packed = ctx["arrays"].get("attention") or {}
    drawn = False
    for d in datasets(ctx, att):
        runs = []
        for r in by_variant_then_n(ctx, att, first_runs(att[att["dataset"] == d])).itertuples():
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
            fig, axes = pyplot.subplots(len(mine), len(show), figsize=(1.9 * len(show) + 0.8, 1.9 * len(mine) + 0.5),
                                        squeeze=False)
            for i, (r, arrays, _, grid) in enumerate(mine):
                plot_attention_maps([torch.from_numpy(arrays[k][0].astype("float32")) for k in show], grid, axes=axes[i],
                                    titles=[f"layer {k[5:]}" for k in show], panel_size=1.9)
                axes[i][0].set_ylabel(f"N={r.N}", fontsize=8)
            fig.suptitle(f"{d}, {display(ctx, v)}: attention maps across N (image 0, normalised, colour map on [0, 0.1])",
                         fontsize=9)
            save_figure(ctx, fig, f"attention_maps_{d}_{v}")
        shown = figure_variants(ctx, runs)
        for layer in FIGURE_LAYERS:  # figs. 9-11: six images at one layer of the DiT baseline(s), rows N
            rows = [x for x in runs if f"layer{layer}" in x[1] and x[0].variant in shown]
            if not rows:
                continue
            n_img = min(6, min(len(x[1][f"layer{layer}"]) for x in rows))
            fig, axes = pyplot.subplots(len(rows), n_img, figsize=(1.8 * n_img + 0.8, 1.8 * len(rows) + 0.5),
                                        squeeze=False)
            for i, (r, arrays, _, grid) in enumerate(rows):  # one call per row: the images take the layers' place
                plot_attention_maps([torch.from_numpy(arrays[f"layer{layer}"][j].astype("float32")) for j in range(n_img)],
                                    grid, axes=axes[i], titles=[f"image {j + 1}" for j in range(n_img)], scale="log")
                axes[i][0].set_ylabel(f"{display(ctx, r.variant)}\nN={r.N}", fontsize=7)
            figure = 9 + FIGURE_LAYERS.index(layer)
            fig.suptitle(f"{d}: attention maps of block {layer} for {n_img} images, log-normalised over "
                         f"{LOG_DECADES} decades (paper 004 fig. {figure})", fontsize=9)
            save_figure(ctx, fig, f"attention_layer{layer}_{d}")
    if not drawn:
        raise NotMeasured("no attention-map arrays")


def figure_variants(ctx: dict, runs: list) -> set[str]:
    """Whose maps figs. 9-11 draw: the study's baselines; without one, the variants with a map at every figure layer
    (the DiTs: a UNet has one attention layer), else every variant."""
    baselines = {b.baseline for b in ctx["blocks"] if b.baseline}
    if baselines:
        return baselines
    deep = {r.variant for r, arrays, *_ in runs if all(f"layer{k}" in arrays for k in FIGURE_LAYERS)}
    return deep or {r.variant for r, *_ in runs}


@section("Principal components of attention maps", {"004": "fig. 13 (PCs of the first layers' maps of the baseline "
         "the PCA variant takes them from, log-normalised)"}, needs=("attention",))
def section_attention_pcs(ctx: dict) -> None:
    """The basis a PCA-attention variant trains from (rule pca_basis): per layer, its first principal components as
    L x L maps, log-normalised as the paper draws them. Drawn from the basis file; no measurement recomputes it."""
    import torch

    from ..metrics.attention_maps import LOG_DECADES, log_normalise_for_display

    bases = ctx.get("pca_bases") or {}
    if not bases:
        raise NotApplicable("no PCA-attention variant")
    pyplot = plt()
    for variant, path in bases.items():
        basis = torch.load(path, map_location="cpu", weights_only=False)
        layers = sorted(basis["components"])
        shown = min(8, min(len(basis["components"][k]) for k in layers))
        fig, axes = pyplot.subplots(len(layers), shown, figsize=(1.5 * shown + 0.6, 1.5 * len(layers) + 0.6),
                                    squeeze=False)
        for i, layer in enumerate(layers):
            for j in range(shown):
                ax = axes[i][j]
                ax.imshow(log_normalise_for_display(basis["components"][layer][j]).numpy(), cmap="viridis", vmin=0,
                          vmax=1, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(f"PC {j + 1}", fontsize=7) if i == 0 else None
            axes[i][0].set_ylabel(f"layer {layer}", fontsize=7)
        src, req = basis.get("source", {}), basis.get("request", {})
        fig.suptitle(f"{display(ctx, variant)}: attention PCs of {src.get('dataset')}/{src.get('variant')} N={src.get('N')} "
                     f"seed {src.get('seed')} ({req.get('num_images')} images, timesteps {req.get('timesteps')} of "
                     f"{req.get('respacing')}; log-normalised over {LOG_DECADES} decades)", fontsize=8)
        save_figure(ctx, fig, f"attention_pcs_{variant}")


@section("Attention locality per layer", "beyond the papers: attention mass within radius 1, mean distance and "
         "entropy per layer against N", needs=("attention",))
def section_attention_locality(ctx: dict) -> None:
    pyplot = plt()
    mean = ctx["attention"][ctx["attention"]["head"] == "mean"]
    if mean.empty:
        raise NotMeasured("no head-averaged locality rows")
    metrics = [m for m in ("mass_r1", "mean_distance", "entropy") if m in set(mean["metric"])]
    shown = variants(ctx, mean)
    fig, axes = pyplot.subplots(len(metrics), len(shown), figsize=(2.4 * len(shown) + 1.2, 2.2 * len(metrics) + 0.4),
                                squeeze=False, sharey="row", layout="constrained")
    for i, metric in enumerate(metrics):
        for j, v in enumerate(shown):
            sub = mean[(mean["metric"] == metric) & (mean["variant"] == v)]
            for n, line in sub.groupby("N"):
                m = line.groupby("layer")["value"].mean()
                axes[i][j].plot(m.index, m.to_numpy(), marker="o", ms=2, lw=1, label=f"N={n}")
            axes[i][j].set_title(display(ctx, v), fontsize=7) if i == 0 else None
            axes[i][0].set_ylabel(metric)
            axes[-1][j].set_xlabel("layer")
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Locality per layer (head-averaged maps, mean over data sets and seeds)")
    save_figure(ctx, fig, "attention_locality")


register_measurement(Measurement(
    name="attention",
    description="attention maps and their locality per layer at held-out images (paper 004 sec. 2.3)",
    compute=compute,
    settings=SETTINGS,
    N=None,
    capability="records_attention",
    arrays=True,
    preview_items=6,  # paper 004 figs. 9-11 draw six images; a map is L x L per layer (1024^2 at 32x32, patch 1)
    cost=cost,
    rehearse=rehearse,
    sections=(section_attention, section_attention_pcs, section_attention_locality),
))
