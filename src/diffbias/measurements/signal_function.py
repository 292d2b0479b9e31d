"""DICE's signal extraction function (paper 002 sec. 3.2, figs. 5-9): f(l, r) = (l + r) / (1 + exp(lambda (l - r)^2)).

The paper's figures are analytic, at lambda = 1: the surface f(l, r) (figs. 5 and 9) and normally sampled left and
right feature maps with the features f makes of them (figs. 6-8). The report draws those, and beside them what a
trained run learned: each block's per-channel lambda, and the left/right hand outputs and the joined features of
one block on a held-out noisy image (the first image of the run's test set, at t).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..sections import NotMeasured, display, plt, save_figure, section
from . import Cost, Measurement, Result, register_measurement

SETTINGS = {
    "t": {"type": "integer", "minimum": 0, "maximum": 999, "default": 250,
          "description": "timestep of the noisy held-out image whose hand outputs are kept"},
    "block": {"type": "integer", "minimum": 0, "default": 0, "description": "which block with hands (in model order, "
              "finest stage first as the model lists them) gives the feature maps"},
    "channels": {"type": "integer", "minimum": 1, "default": 4, "description": "feature channels kept"},
}


def signal(left: np.ndarray, right: np.ndarray, lam: float | np.ndarray = 1.0) -> np.ndarray:
    """The paper's f(l, r) on numpy arrays, through the model's own operator (diffbias.models.dice.dice_signal)."""
    import torch

    from ..models.dice import dice_signal

    as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    return dice_signal(as_t(left), as_t(right), as_t(lam)).numpy()


def compute(run, cfg: dict) -> Result:
    import torch

    from ..metrics.jacobian import noisy_input
    from ..models.dice import dice_signal

    blocks = [m for m in run.model.modules() if type(m).__name__ == "DiceBlock" and m.hands]
    rows = [{"block": i, "channels": int(b.hands_lambda.numel()), "lambda_mean": float(b.hands_lambda.mean()),
             "lambda_median": float(b.hands_lambda.median()), "lambda_min": float(b.hands_lambda.min()),
             "lambda_max": float(b.hands_lambda.max())} for i, b in enumerate(blocks)]
    arrays = {"lambdas": np.concatenate([b.hands_lambda.detach().flatten().cpu().numpy() for b in blocks])
              if blocks else np.zeros(0, np.float32),
              "lambda_block": np.concatenate([np.full(b.hands_lambda.numel(), i) for i, b in enumerate(blocks)])
              if blocks else np.zeros(0, np.int64)}
    if blocks:
        block = blocks[min(cfg["block"], len(blocks) - 1)]
        seen = {}
        hooks = [block.dwconv_l.register_forward_hook(lambda m, a, out: seen.setdefault("left", out.detach())),
                 block.dwconv_r.register_forward_hook(lambda m, a, out: seen.setdefault("right", out.detach()))]
        image = run.test_images(1)
        x_t = noisy_input(image.x[0], cfg["t"], noise_seed=0)[None]
        with torch.no_grad():
            try:
                run.model(x_t, torch.full((1,), cfg["t"], device=x_t.device), image.y)
            finally:
                for h in hooks:
                    h.remove()
            k = cfg["channels"]
            left, right = seen["left"][0, :k], seen["right"][0, :k]
            joined = dice_signal(left, right, block.hands_lambda[:k])
        arrays.update(left=left.cpu().numpy(), right=right.cpu().numpy(), joined=joined.cpu().numpy(),
                      block_lambdas=block.hands_lambda[:k].detach().flatten().cpu().numpy())
    return Result(pd.DataFrame(rows, columns=["block", "channels", "lambda_mean", "lambda_median", "lambda_min",
                                              "lambda_max"]), arrays=arrays, meta={"signal_function": cfg})


def cost(spec: dict, cfg: dict) -> Cost:
    return Cost(forwards=1.0)


@section("DICE signal extraction function", {"002": "figs. 5-9 (the function's surface and left/right/denoised "
         "features at lambda = 1, analytic as in the paper; beside them the trained runs' lambdas and hand outputs)"},
         needs=("signal_function",))
def section_signal_function(ctx: dict) -> None:
    pyplot = plt()
    # figs. 5 and 9: the surface at lambda = 1 (and at a larger lambda: steeper, keeps only matching signals)
    grid = np.linspace(-3, 3, 121)
    left, right = np.meshgrid(grid, grid, indexing="xy")
    fig, axes = pyplot.subplots(1, 2, figsize=(8, 3.4), subplot_kw={"projection": "3d"})
    for ax, lam in zip(axes, (1.0, 4.0)):
        ax.plot_surface(left, right, signal(left, right, lam), cmap="coolwarm", linewidth=0, antialiased=True)
        ax.set_xlabel("left"), ax.set_ylabel("right"), ax.set_zlabel("f")
        ax.set_title(f"lambda = {lam:g}", fontsize=8)
    fig.suptitle("f(l, r) = (l + r) / (1 + exp(lambda (l - r)^2)): a hill for matching positive signals, a trough "
                 "for matching negative ones, flat where they differ (paper 002 figs. 5, 9)", fontsize=8)
    save_figure(ctx, fig, "signal_function_surface")
    # figs. 6-8: normally sampled left/right maps and the denoised features, lambda = 1
    rng = np.random.default_rng(0)
    sim_l, sim_r = rng.normal(size=(16, 16)), rng.normal(size=(16, 16))
    panels = [("left features (fig. 6)", sim_l), ("right features (fig. 7)", sim_r),
              ("denoised f(l, r) (fig. 8)", signal(sim_l, sim_r, 1.0))]
    packed = ctx["arrays"].get("signal_function") or {}
    trained = next(((run, a) for run, a in sorted(packed.items()) if "left" in list(a)), None)
    rows = 2 if trained else 1
    fig, axes = pyplot.subplots(rows, 3, figsize=(8, 2.8 * rows), squeeze=False)
    for ax, (title, image) in zip(axes[0], panels):
        ax.imshow(image, cmap="coolwarm", vmin=-3, vmax=3, interpolation="nearest")
        ax.set_title(f"simulated {title}", fontsize=7), ax.set_xticks([]), ax.set_yticks([])
    if trained:
        run, a = trained
        scale = float(np.abs(np.concatenate([a["left"][0].ravel(), a["right"][0].ravel()])).max()) or 1.0
        for ax, (title, key) in zip(axes[1], (("left hand", "left"), ("right hand", "right"), ("joined", "joined"))):
            ax.imshow(a[key][0], cmap="coolwarm", vmin=-scale, vmax=scale, interpolation="nearest")
            ax.set_title(f"trained: {title}, channel 0", fontsize=7), ax.set_xticks([]), ax.set_yticks([])
        axes[1][0].set_ylabel(run.replace("/", "\n", 1), fontsize=6)
    fig.suptitle("Left/right features and what the signal function keeps (top: normal samples, lambda = 1, as the "
                 "paper; bottom: a trained block on a held-out noisy image)", fontsize=8)
    save_figure(ctx, fig, "signal_function_features")
    table = ctx["signal_function"]
    if table.empty:
        raise NotMeasured("no DICE block with hands in the study's runs")
    fig, ax = pyplot.subplots(figsize=(6, 3))
    for variant, sub in table.groupby("variant"):
        per = sub.groupby("block")["lambda_median"].mean()
        ax.plot(per.index, per.to_numpy(), marker="o", ms=3, label=display(ctx, variant))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("block (model order)"), ax.set_ylabel("median lambda over channels")
    ax.legend(fontsize=6)
    fig.suptitle("Learned lambda per block (initialised to 1; mean over runs)", fontsize=8)
    save_figure(ctx, fig, "signal_function_lambdas")


register_measurement(Measurement(
    name="signal_function",
    description="DICE's signal extraction function: learned lambdas and one block's hand outputs on a held-out image",
    compute=compute,
    settings=SETTINGS,
    N=None,
    capability="has_signal_function",
    arrays=True,
    cost=cost,
    sections=(section_signal_function,),
))
