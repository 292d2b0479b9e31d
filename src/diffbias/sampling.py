"""Sampling from a trained (EMA) model: one seed per sample, so results do not depend on batch size."""

from __future__ import annotations

import numpy as np
import torch

from .data import from_model_range
from .diffusion import create_diffusion


@torch.no_grad()
def sample_images(model, num_samples: int, *, image_shape: tuple[int, int, int], steps: int = 250, seed: int = 0,
                  batch_size: int = 64, labels: torch.Tensor | None = None, method: str = "ddpm") -> np.ndarray:
    """uint8 (num_samples, C, H, W) samples; sample i uses seed ``seed * 1_000_003 + i``."""
    diffusion = create_diffusion(steps)
    device = next(model.parameters()).device
    out = []
    for start in range(0, num_samples, batch_size):
        idx = list(range(start, min(start + batch_size, num_samples)))
        seeds = [seed * 1_000_003 + i for i in idx]
        kwargs = {"y": None if labels is None else labels[idx].to(device)}
        loop = diffusion.p_sample_loop if method == "ddpm" else diffusion.ddim_sample_loop
        x = loop(model, (len(idx), *image_shape), seeds=seeds, device=device, model_kwargs=kwargs)
        out.append(from_model_range(x).cpu().numpy())
    return np.concatenate(out)
