"""The learned Gaussian-mixture attention masks of U-ViT (paper 000 section 3.1 and appendix): table and figure.

A backbone that learns such masks exposes ``gmm_masks()`` ({block name: (heads, N, N) mask}) and
``named_blocks()`` (see ``docs/model-contract.md``); every other model gives an empty table.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

__all__ = ["gmm_mask_summary", "plot_gmm_masks"]


def gmm_mask_summary(model: torch.nn.Module) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The learned masks of every GMM block: a tidy table of each kernel's alpha and sigma (per block,
    head, kernel) plus, per head, the mask at distance 0 and its mean, and the centre token's mask row
    as a (heads, g, g) map per block. Empty when the model has no masks."""
    masks = model.gmm_masks() if hasattr(model, "gmm_masks") else {}
    rows: list[dict] = []
    centre_maps: dict[str, np.ndarray] = {}
    blocks = dict(model.named_blocks()) if masks else {}
    for order, (name, mask) in enumerate(masks.items()):
        attn = blocks[name].attn
        heads, n, _ = mask.shape
        g = math.isqrt(n)
        centre = (g // 2) * g + g // 2
        centre_maps[name] = mask[:, centre].reshape(heads, g, g).float().cpu().numpy()
        for h in range(heads):
            for k in range(attn.gmm_alpha.shape[1]):
                rows.append({"block": name, "block_index": order, "head": h, "kernel": k,
                             "alpha": float(attn.gmm_alpha[h, k].detach()), "sigma": float(attn.gmm_sigma[h, k].detach().abs()),
                             "mask_at_0": float(mask[h, centre, centre]), "mask_mean": float(mask[h].mean())})
    columns = ["block", "block_index", "head", "kernel", "alpha", "sigma", "mask_at_0", "mask_mean"]
    return pd.DataFrame(rows, columns=columns), centre_maps


def plot_gmm_masks(centre_maps: dict[str, np.ndarray], title: str = ""):
    """One row per block, one column per head: the centre token's learned mask over the token grid."""
    import matplotlib.pyplot as plt

    names = list(centre_maps)
    heads = max(m.shape[0] for m in centre_maps.values())
    fig, axes = plt.subplots(len(names), heads, figsize=(1.5 * heads + 0.8, 1.4 * len(names) + 0.6), squeeze=False)
    for i, name in enumerate(names):
        norm = _symmetric_norm(centre_maps[name])  # one colour scale per block: heads compare directly
        for h in range(heads):
            ax = axes[i][h]
            ax.set_xticks([]), ax.set_yticks([])
            if h >= centre_maps[name].shape[0]:
                ax.axis("off")
                continue
            im = ax.imshow(centre_maps[name][h], cmap="coolwarm", norm=norm)
            if i == 0:
                ax.set_title(f"head {h}", fontsize=7)
            if h == 0:
                ax.set_ylabel(name, fontsize=7)
        fig.colorbar(im, ax=axes[i].tolist(), fraction=0.02, pad=0.01)
    fig.suptitle(title, fontsize=9)
    return fig


def _symmetric_norm(values: np.ndarray):
    from matplotlib.colors import Normalize, TwoSlopeNorm

    lo, hi = float(values.min()), float(values.max())
    if lo < 0 < hi:  # masks multiply the logits: the sign matters, so 0 sits at the centre of the colour map
        return TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi)
    return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
