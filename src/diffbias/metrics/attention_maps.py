"""Attention maps: recording, locality metrics, figures and the PCA basis (seed 004 sec. 2.3, app. B, C).

Recording. Every module that computes softmax attention inherits ``layers.RecordsAttention``; with
``record_attention`` set it stores its (B, heads, Lq, Lk) map softmax(QK^T / sqrt(d)) (eq. 5), after any
local-window mask, in ``attention_map``. :func:`attention_maps` collects these maps through forward
hooks in *call order*, which is block order for the DiT (a block that reuses another block's
parameters is called, and recorded, once per use). "Layer" below means the 1-based position in that
order.

Timesteps. ``attention_maps``/``attention_analysis`` take *original* timesteps t in [0, 1000) (what the
model sees); :func:`collect_pca_basis` takes *respaced* step indices (seed 004 app. C: steps 10, 25, 40
of 50) and maps them to original timesteps through the respaced diffusion's ``timestep_map``.

Tokens. Maps may carry leading extra tokens (U-ViT's time/label tokens): a map with L = extra + H*W
tokens is split by :func:`infer_grid`; locality metrics and insets use only the H*W patch tokens
(attention paid to extra tokens counts as mass outside every radius and adds no distance).

PCA basis (app. C). The seed composes an attention map as ``coefficients x PCs + delta`` with
delta = 1/L and says delta "ensures that the attention weights of a token sum to 1". Every recorded row
sums to 1, so the mean map's rows sum to 1 and the rows of every *centred* map sum to 0; the principal
components of the centred maps lie in the span of the centred maps, so their rows sum to 0 as well.
Then each composed row sums to 0 + L * (1/L) = 1 whatever the coefficients: this is why delta works,
and why the PCA is taken on centred maps (``torch.pca_lowrank(center=True)``). Uncentred components
would not have zero row sums and the composed rows would not sum to 1. (The mean map itself is not
kept: the uniform map delta stands in for it, and the learned coefficients absorb the difference as far
as the components span it.)
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

from ..diffusion import create_diffusion
from ..models.layers import RecordsAttention

__all__ = [
    "recording_attention",
    "attention_maps",
    "normalise_for_display",
    "infer_grid",
    "locality_metrics",
    "attention_analysis",
    "plot_attention_maps",
    "collect_pca_basis",
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

    Seed 004 (sec. 2.3, fig. 4) then shows it with a colour map on [0, 0.1], clipping above 0.1.
    """
    amap = torch.as_tensor(amap).float()
    lo, hi = amap.min(), amap.max()
    if hi <= lo:
        return torch.zeros_like(amap)
    return (amap - lo) / (hi - lo)


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
            x_t = (math.sqrt(abar) * images[sl] + math.sqrt(1.0 - abar) * noise[sl]).to(device)
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
# Figure (seed 004 fig. 4)
# ----------------------------------------------------------------------------------------------------


def plot_attention_maps(
    maps_per_layer: Sequence[Tensor],
    grid: tuple[int, int] | None = None,
    layers: Sequence[int] | None = None,
    *,
    image: int | None = 0,
    vmax: float = 0.1,
    cmap: str = "viridis",
    titles: Sequence[str] | None = None,
    axes=None,
    path: str | Path | None = None,
    panel_size: float = 2.4,
):
    """Seed 004 fig. 4: one head-averaged L x L map per layer with an inset of the centre token's row.

    maps_per_layer: as returned by :func:`attention_maps` (each (B, heads, L, L); (heads, L, L) and (L, L)
    also work). layers: 1-based indices into that list (default all). image: which batch element
    (None: average over the batch). Each map is normalised to [0, 1] (:func:`normalise_for_display`) and
    drawn with the colour map on [0, vmax] (values above clip), vmax = 0.1 as in the seed. The top-right
    inset is the row of the centre query token (H // 2, W // 2) of the normalised map reshaped to the
    H x W token grid, on the same colour scale, with the query outlined in red. ``grid``: the token grid
    (default: inferred as square from L). Returns the Figure; saves it to ``path`` when given.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

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
        m = normalise_for_display(m.mean(0))  # heads averaged, then [0, 1]
        L = m.shape[-1]
        (gh, gw), extra = (tuple(grid), L - grid[0] * grid[1]) if grid is not None else infer_grid(L)
        image_obj = ax.imshow(m.numpy(), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[i] if titles is not None else f"Layer {layer}", fontsize=9)
        qy, qx = gh // 2, gw // 2
        row = m[extra + qy * gw + qx, extra:].reshape(gh, gw)
        inset = ax.inset_axes([0.6, 0.6, 0.38, 0.38])
        inset.imshow(row.numpy(), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        inset.add_patch(Rectangle((qx - 0.5, qy - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.0))
        inset.set_xticks([])
        inset.set_yticks([])
        for spine in inset.spines.values():
            spine.set_edgecolor("white")
    for ax in flat[len(layers):]:
        ax.axis("off")
    if image_obj is not None:
        fig.colorbar(image_obj, ax=flat[: len(layers)], fraction=0.02, pad=0.01)
    if path is not None:
        from .jacobian import save_figure

        save_figure(fig, path)
    return fig


# ----------------------------------------------------------------------------------------------------
# PCA basis (seed 004 appendix C)
# ----------------------------------------------------------------------------------------------------


def _orth(a: Tensor) -> Tensor:
    return torch.linalg.qr(a, mode="reduced")[0]


def streaming_pca(
    passes: Callable[[], Iterator[dict[int, Tensor]]],
    num_components: int,
    *,
    niter: int = 2,
    oversample: int = 10,
    seed: int = 0,
) -> dict[int, tuple[Tensor, Tensor]]:
    """Randomised PCA of centred data that never holds the data matrix (Halko, Martinsson & Tropp 2011).

    ``passes()`` must yield, each time it is called, the same sequence of dicts key -> row chunk (n_b, F)
    (several data matrices, e.g. one per layer, share the passes). It is called 2 * niter + 2 times.
    With A_c = A - 1 mu^T (mu the column mean): Q = orth(A_c Omega) for a Gaussian Omega (F, p),
    p = q + oversample; niter power iterations Q <- orth(A_c orth(A_c^T Q)); then the thin SVD of
    A_c^T Q gives the leading right singular vectors. Centring is applied implicitly
    (A_c X = A X - 1 (mu^T X)), so the first pass can collect A Omega and mu together.
    Returns key -> (V (F, q) principal directions as columns, S (q,) singular values), as
    ``torch.pca_lowrank(A, q, center=True)`` returns V and S.
    """
    keys: list[int] | None = None
    n_rows: dict[int, int] = {}
    sums: dict[int, Tensor] = {}
    sketch: dict[int, list[Tensor]] = {}
    omega: dict[int, Tensor] = {}
    gen = torch.Generator().manual_seed(int(seed))
    for chunks in passes():  # pass 1: mean and A @ Omega
        if keys is None:
            keys = sorted(chunks)
        for key in keys:
            a = chunks[key]
            if key not in omega:
                F = a.shape[1]
                p = min(num_components + oversample, F)
                omega[key] = torch.randn(F, p, generator=gen, dtype=torch.float64).to(a.device)
                sums[key] = torch.zeros(F, dtype=torch.float64, device=a.device)
                n_rows[key] = 0
                sketch[key] = []
            a = a.double()
            sums[key] += a.sum(0)
            n_rows[key] += a.shape[0]
            sketch[key].append(a @ omega[key])
    if keys is None:
        raise ValueError("no data")
    mu = {k: sums[k] / n_rows[k] for k in keys}
    for k in keys:
        if num_components > min(n_rows[k], mu[k].numel()):
            raise ValueError(f"{num_components} components need at least as many rows ({n_rows[k]}) and features")
    Q = {k: _orth(torch.cat(sketch[k]) - mu[k] @ omega[k]) for k in keys}
    del sketch

    def times_transpose(Qd: dict[int, Tensor]) -> dict[int, Tensor]:  # A_c^T Q, (F, p)
        acc = {k: torch.zeros(mu[k].numel(), Qd[k].shape[1], dtype=torch.float64, device=mu[k].device) for k in keys}
        offset = 0
        for chunks in passes():
            n = None
            for k in keys:
                a = chunks[k].double()
                n = a.shape[0]
                acc[k] += a.T @ Qd[k][offset : offset + n]
            offset += n
        return {k: acc[k] - mu[k][:, None] * Qd[k].sum(0)[None] for k in keys}

    def times(Z: dict[int, Tensor]) -> dict[int, Tensor]:  # A_c Z, (n, p)
        parts: dict[int, list[Tensor]] = {k: [] for k in keys}
        for chunks in passes():
            for k in keys:
                parts[k].append(chunks[k].double() @ Z[k])
        return {k: torch.cat(parts[k]) - mu[k] @ Z[k] for k in keys}

    for _ in range(niter):
        Z = {k: _orth(v) for k, v in times_transpose(Q).items()}
        Q = {k: _orth(v) for k, v in times(Z).items()}
    Bt = times_transpose(Q)  # (F, p) = (Q^T A_c)^T
    out = {}
    for k in keys:
        U, S, _ = torch.linalg.svd(Bt[k], full_matrices=False)
        out[k] = (U[:, :num_components].float(), S[:num_components].float())
    return out


def collect_pca_basis(
    model,
    images: Tensor,
    *,
    layers: Sequence[int] = (1, 2, 3),
    steps: Sequence[int] = (10, 25, 40),
    respacing: int = 50,
    num_components: int = 50,
    noise_seed: int = 0,
    batch_size: int = 64,
    labels: Tensor | None = None,
    niter: int = 2,
    oversample: int = 10,
    pca_seed: int = 0,
    max_memory_bytes: int = 4 << 30,
) -> dict[int, Tensor]:
    """Principal components of the attention maps of a trained baseline (seed 004 appendix C).

    For every image (N, C, H, W) in [-1, 1] and every *respaced* step s in ``steps`` of a ``respacing``-step
    chain, x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps (eps drawn on the CPU from ``noise_seed``,
    independently per step) goes through the model at its original timestep; the map of every head of
    each requested layer (1-based, call order) is one sample, flattened to a vector of L * L
    (row-major: entry q * L + k is query q's weight on key k). The seed's setting: 2048 test images x 3
    steps x 4 heads = 24,576 maps per layer of DiT-XS/1, 50 components.

    PCA is on the centred maps (see the module docstring: this is what makes ``coefficients x PCs + 1/L``
    rows sum to 1). When all maps of all layers fit in ``max_memory_bytes`` (float32) they are stacked on
    the model's device and passed to ``torch.pca_lowrank(A, q=num_components + oversample, center=True,
    niter=niter)`` (random sketch seeded with ``pca_seed``), keeping the first ``num_components``
    directions: the extra sketch columns make the last kept components accurate (with q = num_components
    exactly, the trailing ones of a randomised PCA are visibly off). Otherwise (the seed's setting needs
    24,576 x 1024^2 floats, ~100 GB, per layer) the same randomised algorithm runs out of core
    (:func:`streaming_pca`), recomputing the maps (deterministically) on each of its 2 * niter + 2 passes.

    Returns {layer: (num_components, L, L) float32 CPU tensor} with component c at [c] and its entry for
    (query, key) at [c, query, key]: the layout of ``PCAAttention.components`` / ``DiT.load_pca_basis``.
    Component signs are arbitrary.
    """
    device = _model_device(model)
    images = torch.as_tensor(images).float()
    N = images.shape[0]
    layers = sorted({int(layer) for layer in layers})
    if not layers or layers[0] < 1:
        raise ValueError(f"layers must be 1-based, got {layers}")
    diffusion = create_diffusion(respacing)
    gen = torch.Generator().manual_seed(int(noise_seed))
    noise = torch.randn((len(steps), *images.shape), generator=gen)
    schedule = []
    for s in steps:
        if not 0 <= int(s) < diffusion.num_timesteps:
            raise ValueError(f"step {s} outside the {diffusion.num_timesteps}-step chain")
        schedule.append((float(diffusion.alphas_cumprod[int(s)]), int(diffusion.timestep_map[int(s)])))

    def batches() -> Iterator[dict[int, Tensor]]:
        """Per batch: layer -> (n_b * heads, L * L) flattened maps; rows ordered step, image, head."""
        for j, (abar, t_orig) in enumerate(schedule):
            for start in range(0, N, batch_size):
                sl = slice(start, start + batch_size)
                x = (math.sqrt(abar) * images[sl] + math.sqrt(1.0 - abar) * noise[j, sl]).to(device)
                n = x.shape[0]
                got: dict[int, Tensor] = {}

                def on_map(layer: int, amap: Tensor) -> None:
                    if layer in layers:
                        got[layer] = amap.float().reshape(-1, amap.shape[-1] * amap.shape[-2])

                _record(model, x, _as_timesteps(t_orig, n, device), _labels(model, labels, sl, n, device),
                        on_map, last_layer=layers[-1])
                missing = [layer for layer in layers if layer not in got]
                if missing:
                    raise ValueError(f"the model recorded no attention map for layer(s) {missing}")
                yield got

    first = next(batches())
    per_map = {layer: first[layer].shape[1] for layer in layers}
    rows_per_image = {layer: first[layer].shape[0] // min(N, batch_size) for layer in layers}  # heads
    total_bytes = sum(N * len(steps) * rows_per_image[layer] * per_map[layer] * 4 for layer in layers)

    if total_bytes <= max_memory_bytes:
        data: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        for got in batches():
            for layer in layers:
                data[layer].append(got[layer])
        result = {}
        for layer in layers:
            A = torch.cat(data[layer])
            data[layer] = []
            if num_components > min(A.shape):
                raise ValueError(f"{num_components} components need at least as many maps ({A.shape[0]}) and features")
            devices = [A.device] if A.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(pca_seed))
                q = min(num_components + oversample, *A.shape)
                _, _, V = torch.pca_lowrank(A, q=q, center=True, niter=niter)
            result[layer] = V[:, :num_components]
    else:
        result = {k: v for k, (v, _) in streaming_pca(batches, num_components, niter=niter, oversample=oversample,
                                                                 seed=pca_seed).items()}

    out = {}
    for layer in layers:
        L = math.isqrt(per_map[layer])
        out[layer] = result[layer].T.reshape(num_components, L, L).float().cpu().contiguous()
    return out


# ----------------------------------------------------------------------------------------------------
# Learned Gaussian-mixture masks (U-ViT, seed 000 section 3.1 and appendix)
# ----------------------------------------------------------------------------------------------------


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
