"""Example measurement plugin (docs/adding-a-measurement.md): the held-out denoising loss of a trained run's
EMA model at a few timesteps, "loss at the end of training".

Everything the measurement needs is in this one module: the compute function, the report section and the
registry entry. Enable it with ``DIFFBIAS_MEASUREMENT_PLUGINS=loss_at_end_measurement`` (the module must be
importable by Snakemake and by its jobs, e.g. through PYTHONPATH).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from diffbias.diffusion import linear_betas
from diffbias.measurements import Measurement, register_measurement

# Its settings under evaluation.loss_at_end, as JSON-schema properties with their defaults (the config schema
# gains them when the plugin is loaded; `N` is always allowed).
SETTINGS = {
    "t": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "default": [10, 100, 500],
          "description": "timesteps (of 1000) at which the loss is measured"},
    "num_images": {"type": "integer", "minimum": 1, "default": 8},
    "noise_seed": {"type": "integer", "default": 0},
}


def compute(run, cfg: dict) -> pd.DataFrame:
    """MSE between the true noise and the model's eps prediction on held-out images, per t (fixed noise).

    run: the trained run (diffbias.runs.TrainedRun: model, held-out images with their labels); cfg: its section
    evaluation.loss_at_end, completed with the defaults declared in SETTINGS below."""
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


def section_loss_at_end(ctx: dict) -> None:
    """Report page: held-out loss per variant and N (mean over seeds), one column per t."""
    from diffbias.report import _text_page

    df = ctx.get("loss_at_end")
    if df is None or df.empty:
        return
    table = df.pivot_table(index=["label", "N"], columns="t", values="loss", aggfunc="mean").round(4)
    md = table.to_markdown()
    tables_dir = ctx["study_dir"] / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    (tables_dir / "loss_at_end.md").write_text(md + "\n")
    _text_page(ctx["pdf"], "Held-out denoising loss at the end of training", md)


register_measurement(Measurement(
    name="loss_at_end",
    config_key="loss_at_end",  # its settings: evaluation.loss_at_end (schema from SETTINGS)
    command="measure",
    outputs=("loss_at_end.parquet",),
    section=section_loss_at_end,
    builtin=False,
    compute=compute,
    settings=SETTINGS,
))
