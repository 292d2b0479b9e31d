"""Sampling from a trained (EMA) model: one seed per sample, so results do not depend on batch size."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .data import from_model_range
from .diffusion import create_diffusion


def sample_batches(model, num_samples: int, *, shape: tuple[int, int, int], steps: int = 250, seed: int = 0,
                   batch_size: int = 64, labels: torch.Tensor | None = None, method: str = "ddpm",
                   clip_denoised: bool = True) -> Iterator[torch.Tensor]:
    """Float samples (B, *shape) on the model's device, batch by batch; sample i uses seed ``seed * 1_000_003 + i``.

    ``clip_denoised``: clip each step's x0 prediction to [-1, 1], right for pixels (ADM); latents have no such range,
    so latent sampling passes False, as DiT's ``sample.py`` does."""
    diffusion = create_diffusion(steps)
    device = next(model.parameters()).device
    loop = diffusion.p_sample_loop if method == "ddpm" else diffusion.ddim_sample_loop
    for start in range(0, num_samples, batch_size):
        idx = list(range(start, min(start + batch_size, num_samples)))
        seeds = [seed * 1_000_003 + i for i in idx]
        kwargs = {"y": None if labels is None else labels[idx].to(device)}
        yield loop(model, (len(idx), *shape), seeds=seeds, device=device, model_kwargs=kwargs,
                   clip_denoised=clip_denoised)


@torch.no_grad()
def sample_images(model, num_samples: int, *, image_shape: tuple[int, int, int], steps: int = 250, seed: int = 0,
                  batch_size: int = 64, labels: torch.Tensor | None = None, method: str = "ddpm") -> np.ndarray:
    """uint8 (num_samples, C, H, W) samples of a pixel-space model; sample i uses seed ``seed * 1_000_003 + i``."""
    out = [from_model_range(x).cpu().numpy()
           for x in sample_batches(model, num_samples, shape=image_shape, steps=steps, seed=seed,
                                   batch_size=batch_size, labels=labels, method=method)]
    return np.concatenate(out)
