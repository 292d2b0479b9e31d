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

T = (10, 100, 500)  # timesteps (of 1000) at which the loss is measured


def compute(model: torch.nn.Module, ckpt: dict, images: torch.Tensor, cfg: dict) -> pd.DataFrame:
    """MSE between the true noise and the model's eps prediction on held-out images, per t (fixed noise)."""
    abar = np.cumprod(1.0 - linear_betas(1000))
    gen = torch.Generator().manual_seed(int(cfg.get("noise_seed", 0)))
    k = ckpt["num_classes"]
    y = torch.full((len(images),), k, dtype=torch.long) if k else None  # the null label when conditional
    rows = []
    for t in cfg.get("t", T):
        eps = torch.randn(images.shape, generator=gen)
        x_t = float(np.sqrt(abar[t])) * images + float(np.sqrt(1 - abar[t])) * eps
        with torch.no_grad():
            out = model(x_t, torch.full((len(images),), t, dtype=torch.long), y)
        mse = torch.mean((out[:, : images.shape[1]] - eps) ** 2).item()
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
    config_key="loss_at_end",  # evaluation.loss_at_end when the schema has it; {} (all runs) otherwise
    command="measure",
    outputs=("loss_at_end.parquet",),
    section=section_loss_at_end,
    builtin=False,
    compute=compute,
))
