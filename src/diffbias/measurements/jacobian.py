"""Jacobian eigenvectors of the denoiser at held-out images (paper 004 sec. 2.2, A.4, figs. 1 and 3): the top
eigenvectors of the symmetrised Jacobian of x0_hat with respect to x_t, by full assembly or block Lanczos
(:mod:`diffbias.metrics.jacobian`)."""

from __future__ import annotations

import numpy as np

from .. import analysis
from ..sections import (by_variant_then_n, datasets, display, first_runs, frame_table, plt, save_figure, section,
                        space_note, text_page)
from . import Cost, Measurement, Result, register_measurement

SETTINGS = {
    "t": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "default": [250],
          "description": "original timesteps"},
    "num_images": {"type": "integer", "minimum": 1, "default": 1},
    "top_k": {"type": "integer", "minimum": 1, "default": 8},
    "chunk_size": {"type": "integer", "minimum": 1, "default": 256, "description": "rows per batch of the full method"},
    "method": {"enum": ["auto", "full", "lanczos"], "default": "auto",
               "description": "full: all D vector-Jacobian products + eigh (exact, all eigenvalues); lanczos: "
                              "matrix-free block Lanczos on (J v + J^T v)/2, top_k pairs only; auto: full up to "
                              "D = 1024, else lanczos"},
    "block_size": {"type": "integer", "minimum": 1, "default": 8, "description": "lanczos: vectors per batched product"},
    "max_products": {"type": "integer", "minimum": 1, "default": 512,
                     "description": "lanczos: at most this many symmetric products per image and t"},
    "tol": {"type": "number", "exclusiveMinimum": 0, "default": 1.0e-3,
            "description": "lanczos: stop when the top_k relative residuals are below this"},
}


def compute(run, cfg: dict) -> Result:
    from ..metrics.jacobian import jacobian_analysis

    images = run.test_images(cfg["num_images"])  # held-out: none of the models has seen them
    df, vecs = jacobian_analysis(run.model, images.x, cfg["t"], labels=images.y, chunk_size=cfg["chunk_size"],
                                 top_k=cfg["top_k"], method=cfg["method"], block_size=cfg["block_size"],
                                 max_products=cfg["max_products"], tol=cfg["tol"])
    df["space"] = run.space  # a latent run's Jacobian is the denoiser's in latent space (4 channels)
    return Result(df, arrays={"eigenvectors": vecs.numpy(), "t": np.array(cfg["t"])}, meta={"jacobian": cfg})


def cost(spec: dict, cfg: dict) -> Cost:
    """Per image and t: "full" = D vector-Jacobian products (3 forwards each); "lanczos" = at most max_products
    symmetric products (a forward-mode and a reverse pass, 6 forwards each; an upper bound)."""
    from ..metrics.jacobian import AUTO_FULL_MAX_D

    from ..latents import model_input

    channels, side = model_input(spec["dataset"])  # a latent run differentiates in latent space
    d = channels * side ** 2
    method = cfg["method"] if cfg["method"] != "auto" else ("full" if d <= AUTO_FULL_MAX_D else "lanczos")
    per = 3.0 * d if method == "full" else 6.0 * cfg["max_products"]
    return Cost(forwards=per * cfg["num_images"] * len(cfg["t"]))


def rehearse(cfg: dict, r: dict) -> None:
    cfg.update(num_images=1, top_k=min(cfg["top_k"], r["jacobian_top_k"]), max_products=r["jacobian_products"],
               block_size=min(cfg["block_size"], r["jacobian_products"]))


@section("Jacobian eigenvectors and spectra", {"004": "fig. 3 (rows: models x N, columns: top eigenvectors) and "
         "fig. 1 (b, c; (a) where a UNet sees one-channel data, at toy scale)"}, needs=("jacobian",))
def section_jacobian(ctx: dict) -> None:
    import torch

    from ..metrics.jacobian import plot_eigenvectors

    pyplot, jac = plt(), ctx["jacobian"]
    spectra = jac[jac["image"] == 0]
    fig, ax = pyplot.subplots(figsize=(6, 3.2))
    for (v, n), sub in spectra.groupby(["variant", "N"]):
        line = sub.groupby("rank")["eigenvalue"].mean()
        ax.plot(line.index, line.to_numpy(), label=f"{display(ctx, v)}, N={n}", lw=1)
    ax.set_xscale("symlog")
    ax.set_xlabel("rank"), ax.set_ylabel("eigenvalue")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    ax.set_title("Eigenvalues of the symmetrised denoiser Jacobian (image 0, mean over runs)")
    save_figure(ctx, fig, "jacobian_spectra")
    packed = ctx["arrays"].get("jacobian") or {}
    for d in datasets(ctx, jac):
        first = by_variant_then_n(ctx, jac, first_runs(jac[jac["dataset"] == d]))
        rows = [r for r in first.itertuples() if analysis.run_key(r.dataset, r.variant, r.N, r.seed) in packed]
        if not rows:
            text_page(ctx, None, [f"{d}: Jacobian eigenvectors not measured in this study (no arrays)."])
            continue
        vecs = [packed[analysis.run_key(r.dataset, r.variant, r.N, r.seed)]["eigenvectors"][0, 0] for r in rows]
        k = min(min(len(v) for v in vecs), 6)
        channels = vecs[0].shape[-3] if vecs[0].ndim == 4 else 1  # channels are laid side by side in a panel
        fig, axes = pyplot.subplots(len(rows), k, figsize=(1.5 * k * channels ** 0.5 + 1.5, 1.5 * len(rows) + 0.5),
                                    squeeze=False)
        for i, (r, v) in enumerate(zip(rows, vecs)):
            sub = jac[(jac["dataset"] == r.dataset) & (jac["variant"] == r.variant) & (jac["N"] == r.N)
                      & (jac["seed"] == r.seed)]
            vals = sub[(sub["image"] == 0) & (sub["t"] == sub["t"].min())].sort_values("rank")["eigenvalue"].to_numpy()[:k]
            plot_eigenvectors(torch.as_tensor(np.asarray(v[:k], dtype=np.float32)), vals if len(vals) == k else None,
                              axes=axes[i])
            axes[i][0].set_ylabel(f"{display(ctx, r.variant)}\nN={r.N}", fontsize=7)
        fig.suptitle(f"{d}: top-{k} Jacobian eigenvectors at t={int(jac['t'].min())} (image 0; rows: model x N)", fontsize=9)
        save_figure(ctx, fig, f"jacobian_eigvecs_{d}")
    asym = jac.groupby(["dataset", "variant", "N", "t"], as_index=False)["asymmetry"].mean()
    asym.insert(1, "model", asym.pop("variant").map(lambda v: display(ctx, v)))
    ctx["pdf"].table("Jacobian asymmetry", frame_table(asym, formats={"asymmetry": ".4f"}),
                     caption="||J - J^T||_F / ||J||_F of the denoiser Jacobian (eigenvectors are those of the symmetrised "
                             "Jacobian), mean over images and seeds. " + space_note(jac, "Jacobians"))


register_measurement(Measurement(
    name="jacobian",
    description="Jacobian eigenvectors and spectrum of the denoiser at held-out images (paper 004 sec. 2.2)",
    compute=compute,
    settings=SETTINGS,
    N=[10, 100000],  # paper 004 fig. 3 compares N = 10 with N = 1e5
    arrays=True,
    cost=cost,
    rehearse=rehearse,
    sections=(section_jacobian,),
))
