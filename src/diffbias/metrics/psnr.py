"""PSNR gap (paper 004 eqs. 2-4, appendix A.3).

For each respaced step t: noise K clean images, predict eps with the (EMA) model, take the one-step
estimate x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) (the VP inversion of
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the paper's eq. 3 writes it for a variance-exploding
parameterisation), then PSNR = 10 log10(M^2 / mean_k MSE_k) with M = 2 for data in [-1, 1]: the MSE is
averaged over the K images first, as the paper says (Kadkhodaie et al. average per-image PSNRs instead).
x0_hat is not clipped by default, as in the paper's eq. 3 and Kadkhodaie et al.; ``clip=True``
(config ``evaluation.psnr.clip``) clips it to the data range [-1, 1] as the DiT/ADM samplers do
(clip_denoised): near t = T the estimate divides by sqrt(abar_t) ~ 0.006 and the unclipped PSNR there
mostly measures that blow-up, for train and test alike. The table records which was used (x0_clipped).
A class-conditional model gets each image's own label (``labels``).
Gap = max(PSNR_train - PSNR_test, 0). The noise depends only on ``noise_seed``, K and the image shape,
so every model sees the same noisy inputs (paired comparison).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..diffusion import create_diffusion, q_sample

DATA_RANGE = 2.0  # M: data normalised to [-1, 1]


def psnr_from_mse(mse: float | np.ndarray, data_range: float = DATA_RANGE) -> float | np.ndarray:
    return 10.0 * np.log10(data_range**2 / np.asarray(mse))


@torch.no_grad()
def psnr_curve(model, images: torch.Tensor, *, respacing: int = 50, noise_seed: int = 0, batch_size: int = 256,
               labels: torch.Tensor | None = None, clip: bool = False, errors: list | None = None) -> pd.DataFrame:
    """PSNR of one-step denoising at each respaced step. images: (K, C, H, W) in [-1, 1].

    Returns rows (step index in the respaced chain, original timestep t, mse, psnr). ``errors``, when given, receives
    each step's per-image squared errors (K,) in order, for intervals over the K images (:func:`gap_bootstrap`).
    """
    diffusion = create_diffusion(respacing)
    device = next(model.parameters()).device
    K = images.shape[0]
    gen = torch.Generator().manual_seed(noise_seed)
    rows = []
    for i in range(diffusion.num_timesteps):
        noise = torch.randn(images.shape, generator=gen)  # drawn on CPU: identical on every device
        t_orig = int(diffusion.timestep_map[i])
        abar = float(diffusion.alphas_cumprod[i])  # respacing keeps the original abar at kept steps
        sq, sq1m = math.sqrt(abar), math.sqrt(1.0 - abar)
        se = torch.zeros(K, dtype=torch.float64)
        for s in range(0, K, batch_size):
            x0 = images[s : s + batch_size].to(device)
            eps = noise[s : s + batch_size].to(device)
            xt = q_sample(x0, abar, eps)
            t = torch.full((x0.shape[0],), t_orig, dtype=torch.long, device=device)
            y = None if labels is None else labels[s : s + batch_size].to(device)
            out = model(xt, t, y)
            eps_hat = out[:, : x0.shape[1]]
            x0_hat = (xt - sq1m * eps_hat) / sq
            if clip:
                x0_hat = x0_hat.clamp(-1.0, 1.0)
            se[s : s + batch_size] = ((x0_hat - x0) ** 2).flatten(1).mean(1).double().cpu()
        mse = float(se.mean())
        rows.append({"step": i, "t": t_orig, "mse": mse, "psnr": float(psnr_from_mse(mse))})
        if errors is not None:
            errors.append(se.numpy())
    return pd.DataFrame(rows)


def psnr_gap(model, train_images: torch.Tensor, test_images: torch.Tensor, *, respacing: int = 50, noise_seed: int = 0,
             batch_size: int = 256, train_labels: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
             clip: bool = False, errors: dict | None = None) -> pd.DataFrame:
    """Columns: step, t, psnr_train, psnr_test, gap (= max(train - test, 0)). ``errors``, when given, receives the
    per-image squared errors as (K, steps) arrays under "train" and "test"."""
    tr_err, te_err = [], []
    tr = psnr_curve(model, train_images, respacing=respacing, noise_seed=noise_seed, batch_size=batch_size,
                    labels=train_labels, clip=clip, errors=tr_err)
    te = psnr_curve(model, test_images, respacing=respacing, noise_seed=noise_seed + 1, batch_size=batch_size,
                    labels=test_labels, clip=clip, errors=te_err)
    df = pd.DataFrame({"step": tr["step"], "t": tr["t"], "psnr_train": tr["psnr"], "psnr_test": te["psnr"]})
    df["gap"] = (df["psnr_train"] - df["psnr_test"]).clip(lower=0.0)
    if errors is not None:
        errors["train"], errors["test"] = np.stack(tr_err, axis=1), np.stack(te_err, axis=1)
    return df


def gap_bootstrap(train_errors: np.ndarray, test_errors: np.ndarray, *, resamples: int = 1000, seed: int = 0,
                  chunk: int = 100) -> np.ndarray:
    """Bootstrap replicates of the gap curve over the K images: (resamples, steps).

    Each replicate resamples the training images and, independently, the test images with replacement (each image
    keeps its fixed noise), averages the squared errors over the resample per step, and forms the gap as
    :func:`psnr_gap` does (MSE first, then PSNR, then max(train - test, 0)). The replicate's mean over steps is one
    bootstrap draw of the mean gap. ``np.random.default_rng(seed)`` draws the indices."""
    rng = np.random.default_rng(seed)
    k_train, k_test = len(train_errors), len(test_errors)
    out = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        tr = train_errors[rng.integers(0, k_train, size=(b, k_train))].mean(axis=1)  # (b, steps)
        te = test_errors[rng.integers(0, k_test, size=(b, k_test))].mean(axis=1)
        out.append(np.clip(psnr_from_mse(tr) - psnr_from_mse(te), 0.0, None))
    return np.concatenate(out) if out else np.zeros((0, train_errors.shape[1]))
