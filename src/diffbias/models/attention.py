"""Global and 2-D neighbourhood (local) attention, and the per-layer attention spec.

Neighbourhood attention follows NATTEN semantics: on an axis of length n with odd window k (r = k // 2)
the window of query i starts at clamp(i - r, 0, n - k), so every query attends exactly k x k keys and
border windows slide inward (no clipping, no padding). A plain "distance <= r" mask is a different
operator (border queries would see fewer keys).

Two implementations share these semantics:
- ``dense``: fused scaled-dot-product attention with a cached boolean (L, L) mask; exact, same cost as
  global attention.
- ``tiled``: the grid is cut into query tiles; each tile attends only to its key halo through the fused
  kernel with a small mask, so the work scales with k^2 instead of L (chosen when it saves work).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator

import torch
import torch.nn.functional as F

GLOBAL = None  # spec entry for global attention


# ----------------------------------------------------------------------------------------------------
# Spec parsing
# ----------------------------------------------------------------------------------------------------


def parse_attention_spec(spec: str | list | tuple | None, depth: int) -> list[int | None]:
    """Parse e.g. ``"3,5,7,9,11,13,G,G,G,G,G,G"`` into ``[3, 5, 7, 9, 11, 13, None, ...]``.

    ``None`` / ``"G"`` everywhere means the vanilla DiT. Raises ValueError with the offending entry.
    """
    if spec is None:
        return [GLOBAL] * depth
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if len(items) != depth:
        raise ValueError(f"attention spec has {len(items)} entries but the model has depth {depth}: {spec!r}")
    out: list[int | None] = []
    for item in items:
        if isinstance(item, str) and item.upper() == "G":
            out.append(GLOBAL)
            continue
        try:
            k = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"attention spec entry {item!r} is neither 'G' nor an odd integer window") from None
        if k < 1 or k % 2 == 0:
            raise ValueError(f"attention window {k} must be a positive odd integer")
        out.append(k)
    return out


def check_windows_fit(windows: list[int | None], grid: tuple[int, int]) -> None:
    for i, k in enumerate(windows):
        if k is not None and k > min(grid):
            raise ValueError(f"layer {i + 1}: window {k} is larger than the {grid[0]}x{grid[1]} token grid")


# ----------------------------------------------------------------------------------------------------
# NATTEN window geometry
# ----------------------------------------------------------------------------------------------------


def window_start(n: int, k: int, device=None) -> torch.Tensor:
    """Start index of each query's window on an axis of length n (NATTEN: slides inward at borders)."""
    r = k // 2
    return (torch.arange(n, device=device) - r).clamp(0, n - k)


@functools.lru_cache(maxsize=64)
def _neighborhood_mask_cpu(height: int, width: int, k: int) -> torch.Tensor:
    sy = window_start(height, k)
    sx = window_start(width, k)
    ys = torch.arange(height)
    xs = torch.arange(width)
    in_y = (ys[None, :] >= sy[:, None]) & (ys[None, :] < sy[:, None] + k)  # (Hq, Hk)
    in_x = (xs[None, :] >= sx[:, None]) & (xs[None, :] < sx[:, None] + k)  # (Wq, Wk)
    mask = in_y[:, None, :, None] & in_x[None, :, None, :]  # (Hq, Wq, Hk, Wk)
    return mask.reshape(height * width, height * width)


def neighborhood_mask(height: int, width: int, k: int, device=None) -> torch.Tensor:
    """Boolean (L, L) mask, True where query (row) may attend key (column). Cached per size."""
    return _neighborhood_mask_cpu(height, width, k).to(device)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


def neighborhood_attention_reference(q, k, v, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """Brute force, one query at a time, for tests: gathers exactly the k x k keys of each query."""
    B, h, L, d = q.shape
    sy = window_start(height, kernel_size).tolist()
    sx = window_start(width, kernel_size).tolist()
    out = torch.empty_like(q)
    for i in range(height):
        for j in range(width):
            keys = [(y * width + x) for y in range(sy[i], sy[i] + kernel_size) for x in range(sx[j], sx[j] + kernel_size)]
            kk, vv = k[:, :, keys], v[:, :, keys]
            logits = (q[:, :, i * width + j, None] @ kk.transpose(-1, -2)) / math.sqrt(d)
            out[:, :, i * width + j] = (logits.softmax(-1) @ vv)[:, :, 0]
    return out


def _dense_neighborhood_attention(q, k, v, height: int, width: int, kernel_size: int) -> torch.Tensor:
    mask = neighborhood_mask(height, width, kernel_size, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@functools.lru_cache(maxsize=64)
def _tile_plan(n: int, k: int, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one axis: per tile, the halo start, and the (tile, halo) in-window mask. All tiles equal size."""
    num_tiles = n // tile
    starts = window_start(n, k)
    halo = tile + k - 1
    q_idx = torch.arange(n).view(num_tiles, tile)
    halo_start = starts[q_idx[:, 0]].clamp(max=n - halo)  # (T,)
    key_pos = halo_start[:, None] + torch.arange(halo)[None]  # (T, halo)
    win = starts[q_idx]  # (T, tile)
    mask = (key_pos[:, None, :] >= win[:, :, None]) & (key_pos[:, None, :] < win[:, :, None] + k)  # (T, tile, halo)
    return halo_start, key_pos, mask


def tile_size_for(n: int, k: int) -> int | None:
    """Query-tile length on an axis of length n: the largest divisor of n not above max(k, 4) whose key
    halo (tile + k - 1) is shorter than n. Per query, work grows with the halo; the gathered keys per
    query grow with halo / tile, so tiles near k balance the two. None if no tile helps."""
    fits = [t for t in range(1, n + 1) if n % t == 0 and t + k - 1 < n and t <= max(k, 4)]
    return max(fits) if fits else None


def _tiled_neighborhood_attention(q, k, v, height: int, width: int, kernel_size: int, ty: int, tx: int) -> torch.Tensor:
    B, h, L, d = q.shape
    hy, hx = ty + kernel_size - 1, tx + kernel_size - 1
    _, key_y, mask_y = _tile_plan(height, kernel_size, ty)
    _, key_x, mask_x = _tile_plan(width, kernel_size, tx)
    Ty, Tx = height // ty, width // tx
    dev = q.device
    key_y, key_x, mask_y, mask_x = key_y.to(dev), key_x.to(dev), mask_y.to(dev), mask_x.to(dev)
    # queries: (B, h, Ty, ty, Tx, tx, d) -> (B, h, Ty, Tx, ty*tx, d)
    qt = q.view(B, h, Ty, ty, Tx, tx, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, h, Ty, Tx, ty * tx, d)
    # key halos gathered with index tensors: (B, h, Ty, Tx, hy*hx, d)
    flat = (key_y[:, None, :, None] * width + key_x[None, :, None, :]).reshape(Ty, Tx, hy * hx)
    kt = k[:, :, flat]
    vt = v[:, :, flat]
    mask = (mask_y[:, None, :, None, :, None] & mask_x[None, :, None, :, None, :]).reshape(Ty, Tx, ty * tx, hy * hx)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.view(B, h, Ty, Tx, ty, tx, d).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, h, L, d)


def neighborhood_attention(q, k, v, height: int, width: int, kernel_size: int, impl: str = "auto") -> torch.Tensor:
    """q, k, v: (B, heads, L = height*width, d) in raster order. Exact NATTEN semantics."""
    if impl == "reference":
        return neighborhood_attention_reference(q, k, v, height, width, kernel_size)
    if FLOP_COUNTING:
        return torch.ops.diffbias.neighborhood_attention(q, k, v, height, width, kernel_size)
    ty, tx = tile_size_for(height, kernel_size), tile_size_for(width, kernel_size)
    tiling_possible = ty is not None and tx is not None
    # Tiles pay off only when each query's halo is well below the full grid (else dense is as cheap).
    worth_it = tiling_possible and (ty + kernel_size - 1) * (tx + kernel_size - 1) * 2 <= height * width
    if tiling_possible and (impl == "tiled" or (impl == "auto" and worth_it)):
        return _tiled_neighborhood_attention(q, k, v, height, width, kernel_size, ty, tx)
    return _dense_neighborhood_attention(q, k, v, height, width, kernel_size)


def attention_weights(q, k, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) with an optional boolean mask; used only to record attention maps."""
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(-1)


# ----------------------------------------------------------------------------------------------------
# FLOP counting: in counting mode local attention runs as one opaque operator that fvcore can price.
# ----------------------------------------------------------------------------------------------------

FLOP_COUNTING = False


@contextlib.contextmanager
def flop_counting() -> Iterator[None]:
    global FLOP_COUNTING
    previous, FLOP_COUNTING = FLOP_COUNTING, True
    try:
        yield
    finally:
        FLOP_COUNTING = previous


@torch.library.custom_op("diffbias::neighborhood_attention", mutates_args=())
def _neighborhood_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int, kernel_size: int
) -> torch.Tensor:
    return _dense_neighborhood_attention(q, k, v, height, width, kernel_size)


@_neighborhood_attention_op.register_fake
def _(q, k, v, height, width, kernel_size):
    return torch.empty_like(q)
