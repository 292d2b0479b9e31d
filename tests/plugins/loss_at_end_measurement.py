"""Example measurement plugin (docs/adding-a-measurement.md): the held-out denoising loss of a trained run's EMA
model at a few timesteps, "loss at the end of training".

Everything the measurement is lives in this one module: its settings, its compute function, its cost, how the
rehearsal shrinks it, its report section and its registry entry. Enable it with
``DIFFBIAS_MEASUREMENT_PLUGINS=loss_at_end_measurement`` (the module must be importable by Snakemake and its jobs,
e.g. through PYTHONPATH); a built-in is the same module under ``diffbias/measurements/`` plus its name in
``diffbias.measurements.BUILTIN``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from diffbias.diffusion import linear_betas
from diffbias.measurements import Cost, Measurement, register_measurement
from diffbias.sections import section, text_page, write_table

# Its settings under evaluation.loss_at_end, as JSON-schema properties with their defaults (the config schema
# gains them when the plugin is loaded, with an `N` list: null measures every N).
SETTINGS = {
    "t": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "default": [10, 100, 500],
          "description": "timesteps (of 1000) at which the loss is measured"},
    "num_images": {"type": "integer", "minimum": 1, "default": 8},
    "noise_seed": {"type": "integer", "default": 0},
}


def compute(run, cfg: dict) -> pd.DataFrame:
    """MSE between the true noise and the model's eps prediction on held-out images, per t (fixed noise).

    run: the trained run (diffbias.runs.TrainedRun: model, held-out images with their labels); cfg: its section
    evaluation.loss_at_end, completed with the defaults declared in SETTINGS."""
    images = run.test_images(cfg["num_images"])  # labels too, when the model is class-conditional
    abar = np.cumprod(1.0 - linear_betas(1000))
    gen = torch.Generator().manual_seed(cfg["noise_seed"])
    rows = []
    for t in cfg["t"]:
        eps = torch.randn(images.x.shape, generator=gen).to(images.x.device)
        x_t = float(np.sqrt(abar[t])) * images.x + float(np.sqrt(1 - abar[t])) * eps
        with torch.no_grad():
            out = run.model(x_t, torch.full((len(images),), t, dtype=torch.long, device=x_t.device), images.y)
        mse = torch.mean((out[:, : images.x.shape[1]] - eps) ** 2).item()
        rows.append({"t": int(t), "loss": mse, "num_images": len(images)})
    return pd.DataFrame(rows)


def cost(spec: dict, cfg: dict) -> Cost:
    """One forward per image and t (diffbias cost turns it into FLOPs with the run's model)."""
    return Cost(forwards=float(len(cfg["t"]) * cfg["num_images"]))


def rehearse(cfg: dict, r: dict) -> None:
    """At rehearsal size: as many images as the PSNR gap gets."""
    cfg["num_images"] = min(cfg["num_images"], r["psnr_images"])


@section("Held-out denoising loss at the end of training", "beyond the papers: the EMA model's eps-MSE on held-out "
         "images at a few timesteps", needs=("loss_at_end",))
def section_loss_at_end(ctx: dict) -> None:
    """Report page: held-out loss per variant and N (mean over seeds), one column per t."""
    table = ctx["loss_at_end"].pivot_table(index=["label", "N"], columns="t", values="loss", aggfunc="mean")
    frame = table.round(4).reset_index()
    frame.columns = [str(c) for c in frame.columns]
    write_table(ctx, "loss_at_end", frame)
    text_page(ctx, "Held-out denoising loss at the end of training", frame.to_markdown(index=False))


register_measurement(Measurement(
    name="loss_at_end",
    description="held-out eps-MSE of the EMA model at a few timesteps",
    compute=compute,
    settings=SETTINGS,
    cost=cost,
    rehearse=rehearse,
    sections=(section_loss_at_end,),
))
