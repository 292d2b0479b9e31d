"""Attention maps: recording, locality metrics and figures (paper 004 sec. 2.3, app. B).

Recording. Every module that computes softmax attention inherits ``layers.RecordsAttention``; with
``record_attention`` set it stores its (B, heads, Lq, Lk) map softmax(QK^T / sqrt(d)) (eq. 5), after any
local-window mask, in ``attention_map``. :func:`attention_maps` collects these maps through forward
hooks in *call order*, which is block order for the DiT (a block that reuses another block's
parameters is called, and recorded, once per use). "Layer" below means the 1-based position in that
order.

Timesteps. ``attention_maps``/``attention_analysis`` take *original* timesteps t in [0, 1000) (what the
model sees).

Tokens. Maps may carry leading extra tokens (U-ViT's time/label tokens): a map with L = extra + H*W
tokens is split by :func:`infer_grid`; locality metrics and insets use only the H*W patch tokens
(attention paid to extra tokens counts as mass outside every radius and adds no distance).

Elsewhere. The PCA basis of these maps (paper 004 app. C, an input to training) is built by
:mod:`diffbias.pca_basis` with the recording here; the learned U-ViT Gaussian-mixture masks are
summarised by :mod:`diffbias.metrics.gmm_masks`.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..diffusion import create_diffusion, q_sample
from ..models.layers import RecordsAttention

__all__ = [
    "recording_attention",
    "attention_maps",
    "normalise_for_display",
    "infer_grid",
    "locality_metrics",
    "attention_analysis",
    "plot_attention_maps",
]

_UNSET = object()


# ----------------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------------


def _attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RecordsAttention)]


@contextlib.contextmanager
def recording_attention(model: torch.nn.Module) -> Iterator[list[tuple[str, torch.nn.Module]]]:
    """Set ``record_attention`` on every RecordsAttention module of ``model``; yield [(name, module)].

    On exit each module's flag is restored to what it was and its stored ``attention_map`` is dropped
    (read the maps inside the block, or use :func:`attention_maps`).
    """
    found = _attention_modules(model)
    saved = [m.__dict__.get("record_attention", _UNSET) for _, m in found]
    for _, m in found:
        m.record_attention = True
    try:
        yield found
    finally:
        for (_, m), previous in zip(found, saved):
            if previous is _UNSET:
                m.__dict__.pop("record_attention", None)
            else:
                m.record_attention = previous
            m.__dict__.pop("attention_map", None)


class _StopForward(Exception):
    """Raised by a hook once every wanted layer has been recorded (saves the rest of the forward)."""


def _as_timesteps(t, batch: int, device) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.long, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be an int or a ({batch},) tensor, got shape {tuple(t.shape)}")
    return t


def _record(model, x: Tensor, t: Tensor, y: Tensor | None, on_map: Callable[[int, Tensor], None],
            last_layer: int | None = None) -> None:
    """Run the model once; call ``on_map(layer, map)`` for every recorded map (layer 1-based, call order)."""
    counter = [0]

    def hook(module, inputs, output):
        amap = getattr(module, "attention_map", None)
        if amap is None:
            return
        counter[0] += 1
        on_map(counter[0], amap)
        module.attention_map = None  # free it; the callback keeps what it needs
        if last_layer is not None and counter[0] >= last_layer:
            raise _StopForward

    with recording_attention(model) as modules:
        if not modules:
            raise ValueError(f"{type(model).__name__} has no RecordsAttention modules")
        handles = [m.register_forward_hook(hook) for _, m in modules]
        try:
            with torch.no_grad():
                model(x, t, y)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def attention_maps(model, x_t: Tensor, t, y: Tensor | None = None) -> list[Tensor]:
    """Attention maps of one forward pass on the noisy batch ``x_t`` at original timestep(s) ``t``.

    Returns one detached float tensor (B, heads, Lq, Lk) per attention call, in call (block) order, on the
    model's device. t: an int or a (B,) tensor of original timesteps; y: labels or None.
    """
    device = _model_device(model)
    x_t = x_t.to(device)
    maps: list[Tensor] = []
    _record(model, x_t, _as_timesteps(t, x_t.shape[0], device), None if y is None else y.to(device),
            lambda layer, amap: maps.append(amap))
    return maps


def normalise_for_display(amap: Tensor) -> Tensor:
    """Scale a map linearly to [0, 1] (min -> 0, max -> 1; a constant map -> 0).

    Paper 004 (sec. 2.3, fig. 4) then shows it with a colour map on [0, 0.1], clipping above 0.1.
    """
    amap = torch.as_tensor(amap).float()
    lo, hi = amap.min(), amap.max()
    if hi <= lo:
        return torch.zeros_like(amap)
    return (amap - lo) / (hi - lo)


# Paper 004 figs. 9-11 and 13 use "logarithm normalization" without a base or a floor: we take log10 of the
# [0, 1]-normalised map over LOG_DECADES decades (values below 10^-LOG_DECADES clip) mapped back onto [0, 1].
LOG_DECADES = 4


def log_normalise_for_display(amap: Tensor, decades: int = LOG_DECADES) -> Tensor:
    """The linear [0, 1] normalisation (:func:`normalise_for_display`) on a log scale: ``1 + log10(m) / decades``,
    clipped to [0, 1], so the largest entry is 1 and entries 10^-decades of it or less are 0."""
    m = normalise_for_display(amap)
    return (1.0 + torch.log10(m.clamp_min(10.0 ** -decades)) / decades).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Locality metrics
# ----------------------------------------------------------------------------------------------------


def infer_grid(num_tokens: int, image_hw: tuple[int, int] = (1, 1), max_extra: int = 8) -> tuple[tuple[int, int], int]:
    """((H, W), extra): a token grid with the image's aspect ratio plus ``extra`` leading tokens.

    The fewest extra tokens win, e.g. 64 -> ((8, 8), 0) and 66 -> ((8, 8), 2) for a square image.
    """
    ih, iw = image_hw
    for extra in range(0, max_extra + 1):
        n = num_tokens - extra
        if n <= 0:
            break
        w = math.isqrt(max(1, round(n * iw / ih)))
        for gw in (w - 1, w, w + 1):
            if gw > 0 and n % gw == 0 and (n // gw) * iw == gw * ih:
                return (n // gw, gw), extra
    raise ValueError(f"cannot read {num_tokens} tokens as a grid with aspect {ih}:{iw} plus <= {max_extra} extra tokens")


def _as_4d(maps: Tensor) -> Tensor:
    maps = torch.as_tensor(maps)
    while maps.ndim < 4:
        maps = maps.unsqueeze(0)
    if maps.ndim != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps must be (B, heads, L, L), got {tuple(maps.shape)}")
    return maps


def _offsets(grid: tuple[int, int], device) -> tuple[Tensor, Tensor]:
    H, W = grid
    ys = torch.arange(H, device=device).repeat_interleave(W).double()
    xs = torch.arange(W, device=device).repeat(H).double()
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return torch.maximum(dy, dx), torch.sqrt(dy**2 + dx**2)


def _metric_names(radii: Sequence[int]) -> list[str]:
    return [f"mass_r{int(r)}" for r in radii] + ["mean_distance", "entropy"]


def _per_head_metrics(maps: Tensor, grid: tuple[int, int], radii: Sequence[int]) -> dict[str, Tensor]:
    """Per-head metrics (heads,) in float64, each averaged over queries and batch."""
    maps = _as_4d(maps)
    L = maps.shape[-1]
    extra = L - grid[0] * grid[1]
    if extra < 0:
        raise ValueError(f"maps have {L} tokens, fewer than the {grid[0]}x{grid[1]} grid")
    p = maps[..., extra:, extra:].float()  # float32 products, float64 averages
    cheb, eucl = _offsets(grid, p.device)
    out: dict[str, Tensor] = {}
    for r in radii:
        within = (cheb <= r).float()
        out[f"mass_r{int(r)}"] = torch.einsum("bhqk,qk->bhq", p, within).double().mean(dim=(0, 2))
    out["mean_distance"] = torch.einsum("bhqk,qk->bhq", p, eucl.float()).double().mean(dim=(0, 2))
    out["entropy"] = -torch.special.xlogy(p, p).sum(-1).double().mean(dim=(0, 2))
    return out


def locality_metrics(maps: Tensor, grid: tuple[int, int], radii: Sequence[int] = (1, 2, 3), *,
                     per_head: bool = False) -> dict[str, float] | dict[str, Tensor]:
    """Locality of attention maps (B, heads, L, L) (also (heads, L, L) or (L, L)) over an H x W token grid.

    Per query row p (over the H*W patch keys; leading extra tokens are dropped, see the module docstring):
    - ``mass_r{r}``: attention mass on keys within Chebyshev distance r of the query, sum_{max(|dy|,|dx|)<=r} p
      (r = 0 is the query itself; for a k x k local window every row has mass 1 at r = k // 2 away from borders);
    - ``mean_distance``: sum_k p_k * ||pos_k - pos_q||_2, in tokens;
    - ``entropy``: -sum_k p_k log p_k in nats (0 for a one-hot row, log L for a uniform row).
    Each is averaged over queries and batch, then over heads (floats), or returned per head as
    float64 tensors (heads,) when ``per_head`` (their mean over heads is the float).
    """
    per = _per_head_metrics(maps, tuple(grid), radii)
    if per_head:
        return {k: v.cpu() for k, v in per.items()}
    return {k: float(v.mean()) for k, v in per.items()}


def _labels(model, labels: Tensor | None, idx: slice, n: int, device) -> Tensor | None:
    if labels is not None:
        return torch.as_tensor(labels)[idx].to(device=device, dtype=torch.long)
    k = int(getattr(model, "num_classes", 0) or 0)
    return torch.full((n,), k, dtype=torch.long, device=device) if k > 0 else None  # the null label


def attention_analysis(
    model,
    images: Tensor,
    t_values: Sequence[int],
    noise_seed: int = 0,
    *,
    labels: Tensor | None = None,
    radii: Sequence[int] = (1, 2, 3),
    batch_size: int = 64,
) -> pd.DataFrame:
    """Locality metrics of every attention layer, per head and head-averaged, at each original timestep.

    images: (N, C, H, W) in [-1, 1], noised as x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with eps drawn
    on the CPU from ``noise_seed`` (the same eps at every t). labels: (N,) or None (a class-conditional
    model then gets the null label). Metrics are averaged over all N images.

    Returns a tidy DataFrame: layer (1-based call order), head (str: "0", "1", ... or "mean"), t, metric,
    value; plus the layer's token grid as grid_h, grid_w. ``head`` is a string so that the column has one
    type (parquet).
    """
    device = _model_device(model)
    images = torch.as_tensor(images).float()
    N, _, H, W = images.shape
    diffusion = create_diffusion(None)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(int(noise_seed)))
    rows = []
    for t in t_values:
        abar = float(diffusion.alphas_cumprod[int(t)])
        sums: dict[int, dict[str, Tensor]] = {}
        grids: dict[int, tuple[int, int]] = {}
        for s in range(0, N, batch_size):
            sl = slice(s, s + batch_size)
            x_t = q_sample(images[sl], abar, noise[sl]).to(device)
            n = x_t.shape[0]

            def on_map(layer: int, amap: Tensor) -> None:
                if layer not in grids:
                    grids[layer] = infer_grid(amap.shape[-1], (H, W))[0]
                per = _per_head_metrics(amap, grids[layer], radii)
                acc = sums.setdefault(layer, {})
                for k, v in per.items():
                    acc[k] = acc.get(k, 0.0) + v.cpu() * n

            _record(model, x_t, _as_timesteps(int(t), n, device), _labels(model, labels, sl, n, device), on_map)
        for layer in sorted(sums):
            gh, gw = grids[layer]
            for metric, total in sums[layer].items():
                per_head = total / N
                common = {"layer": layer, "t": int(t), "metric": metric, "grid_h": gh, "grid_w": gw}
                rows += [{**common, "head": str(h), "value": float(v)} for h, v in enumerate(per_head)]
                rows.append({**common, "head": "mean", "value": float(per_head.mean())})
    columns = ["layer", "head", "t", "metric", "value", "grid_h", "grid_w"]
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------------------------------
# Figure (paper 004 fig. 4)
# ----------------------------------------------------------------------------------------------------


def plot_attention_maps(
    maps_per_layer: Sequence[Tensor],
    grid: tuple[int, int] | None = None,
    layers: Sequence[int] | None = None,
    *,
    image: int | None = 0,
    vmax: float | None = None,
    scale: str = "linear",
    cmap: str = "viridis",
    titles: Sequence[str] | None = None,
    axes=None,
    path: str | Path | None = None,
    panel_size: float = 2.4,
):
    """Paper 004 fig. 4: one head-averaged L x L map per layer with an inset of the centre token's row.

    maps_per_layer: as returned by :func:`attention_maps` (each (B, heads, L, L); (heads, L, L) and (L, L)
    also work). layers: 1-based indices into that list (default all). image: which batch element
    (None: average over the batch). ``scale="linear"`` (fig. 4): each map is normalised to [0, 1]
    (:func:`normalise_for_display`) and drawn with the colour map on [0, vmax] (values above clip), vmax = 0.1 as
    in the paper. ``scale="log"`` (figs. 9-11, "logarithm normalization"): :func:`log_normalise_for_display`, the
    colour map on [0, vmax] with vmax = 1. The top-right
    inset is the row of the centre query token (H // 2, W // 2) of the normalised map reshaped to the
    H x W token grid, on the same colour scale, with the query outlined in red (``ax.images[1]``). ``grid``: the token grid
    (default: inferred as square from L). Returns the Figure; saves it to ``path`` when given.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if scale not in ("linear", "log"):
        raise ValueError(f"scale must be 'linear' or 'log', got {scale!r}")
    normalise = normalise_for_display if scale == "linear" else log_normalise_for_display
    vmax = (0.1 if scale == "linear" else 1.0) if vmax is None else vmax
    layers = list(layers) if layers is not None else list(range(1, len(maps_per_layer) + 1))
    if axes is None:
        fig, axes = plt.subplots(1, len(layers), figsize=(panel_size * len(layers), panel_size + 0.3), squeeze=False)
    else:
        fig = np.asarray(axes).flat[0].figure
    flat = list(np.asarray(axes).flat)
    if len(flat) < len(layers):
        raise ValueError(f"{len(layers)} layers but only {len(flat)} axes")
    image_obj = None
    for i, (ax, layer) in enumerate(zip(flat, layers)):
        m = _as_4d(maps_per_layer[layer - 1]).detach().float().cpu()
        m = m.mean(0) if image is None else m[image]
        m = normalise(m.mean(0))  # heads averaged, then [0, 1]
        L = m.shape[-1]
        (gh, gw), extra = (tuple(grid), L - grid[0] * grid[1]) if grid is not None else infer_grid(L)
        image_obj = ax.imshow(m.numpy(), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[i] if titles is not None else f"Layer {layer}", fontsize=9)
        qy, qx = gh // 2, gw // 2
        row = m[extra + qy * gw + qx, extra:].reshape(gh, gw)
        # The inset is a second image in the same axes (its top-right 38 %, framed in white), not an inset axes:
        # axes are most of the cost of a report's attention figures, dozens of panels each.
        x0, x1, top, bottom = -0.5 + 0.6 * L, -0.5 + 0.98 * L, -0.5 + 0.02 * L, -0.5 + 0.4 * L
        ax.imshow(row.numpy(), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest", extent=(x0, x1, bottom, top))
        cell_w, cell_h = (x1 - x0) / gw, (bottom - top) / gh
        ax.add_patch(Rectangle((x0, top), x1 - x0, bottom - top, fill=False, edgecolor="white", linewidth=1.0))
        ax.add_patch(Rectangle((x0 + qx * cell_w, top + qy * cell_h), cell_w, cell_h, fill=False, edgecolor="red",
                               linewidth=1.0))
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_ylim(L - 0.5, -0.5)
    for ax in flat[len(layers):]:
        ax.axis("off")
    if image_obj is not None:
        fig.colorbar(image_obj, ax=flat[: len(layers)], fraction=0.02, pad=0.01)
    if path is not None:
        from .jacobian import save_figure

        save_figure(fig, path)
    return fig
