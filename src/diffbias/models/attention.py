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
- ``flex``: FlexAttention with a cached block mask (the CUDA path; on CPU it runs eagerly, for tests).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
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
    # A 4-D mask keeps the fused (flash) CPU kernel; a 2-D one sends SDPA to the unfused math path.
    mask = neighborhood_mask(height, width, kernel_size, q.device)[None, None]
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


@functools.lru_cache(maxsize=64)
def _tiled_plan_2d(height: int, width: int, k: int, ty: int, tx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raster indices of the queries in tile order, of every tile's key halo, and the (tiles, 1, q, halo) mask."""
    _, key_y, mask_y = _tile_plan(height, k, ty)
    _, key_x, mask_x = _tile_plan(width, k, tx)
    Ty, Tx, hy, hx = height // ty, width // tx, ty + k - 1, tx + k - 1
    query_order = torch.arange(height * width).view(Ty, ty, Tx, tx).permute(0, 2, 1, 3).reshape(-1)
    halo_keys = (key_y[:, None, :, None] * width + key_x[None, :, None, :]).reshape(-1)  # (Ty*Tx*hy*hx,)
    mask = mask_y[:, None, :, None, :, None] & mask_x[None, :, None, :, None, :]  # (Ty, Tx, ty, tx, hy, hx)
    return query_order, halo_keys, mask.reshape(Ty * Tx, 1, ty * tx, hy * hx)


# A query tile of >= 8 x 8 fills the fused CPU kernel's query blocks; 4 x 4 tiles measured up to 2x slower.
MIN_TILE = 8
# Tiling pays when a tile's key halo is at most this fraction of the grid (benchmark: 32x32 grid, k = 13,
# halo 20 x 20 = 0.39 of L runs 1.1-1.3x faster than global; 16x16, k = 5, 0.56 of L, no faster than dense).
MAX_HALO_FRACTION = 0.45


def tile_size_for(n: int, k: int) -> int | None:
    """Query-tile length on an axis of length n: the smallest divisor >= MIN_TILE whose key halo
    (tile + k - 1) is shorter than n, else the largest divisor with such a halo; None if none exists."""
    fits = [t for t in range(1, n + 1) if n % t == 0 and t + k - 1 < n]
    if not fits:
        return None
    big = [t for t in fits if t >= MIN_TILE]
    return min(big) if big else max(fits)


def _tiled_neighborhood_attention(q, k, v, height: int, width: int, kernel_size: int, ty: int, tx: int) -> torch.Tensor:
    """Each query tile attends its key halo (gathered rows) through the fused kernel, tiles as the batch."""
    B, h, L, d = q.shape
    query_order, halo_keys, mask = (t.to(q.device) for t in _tiled_plan_2d(height, width, kernel_size, ty, tx))
    tiles, tile_len, halo_len = mask.shape[0], mask.shape[2], mask.shape[3]

    # Token-major rows (L, B*h, d): gathering whole rows is a contiguous copy per index, and the
    # (tiles, B*h, len, d) views that SDPA gets need no further copy; the mask broadcasts over B*h.
    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(B * h, L, d).transpose(0, 1)

    qt = rows(q).index_select(0, query_order).view(tiles, tile_len, B * h, d).transpose(1, 2)
    kt = rows(k).contiguous().index_select(0, halo_keys).view(tiles, halo_len, B * h, d).transpose(1, 2)
    vt = rows(v).contiguous().index_select(0, halo_keys).view(tiles, halo_len, B * h, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)  # (tiles, B*h, tile_len, d)
    Ty, Tx = height // ty, width // tx
    return out.view(Ty, Tx, B, h, ty, tx, d).permute(2, 3, 0, 4, 1, 5, 6).reshape(B, h, L, d)


# ----------------------------------------------------------------------------------------------------
# CUDA: FlexAttention with a block-sparse mask (cached per size); compiled once per process.
# ----------------------------------------------------------------------------------------------------


def _natten_mask_mod(height: int, width: int, kernel_size: int):
    r = kernel_size // 2

    def mask_mod(b, h, q_idx, kv_idx):
        qy, qx, ky, kx = q_idx // width, q_idx % width, kv_idx // width, kv_idx % width
        y0 = (qy - r).clamp(0, height - kernel_size)
        x0 = (qx - r).clamp(0, width - kernel_size)
        return (ky >= y0) & (ky < y0 + kernel_size) & (kx >= x0) & (kx < x0 + kernel_size)

    return mask_mod


@functools.lru_cache(maxsize=64)
def _flex_block_mask(height: int, width: int, kernel_size: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    L = height * width
    return create_block_mask(_natten_mask_mod(height, width, kernel_size), None, None, L, L, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_neighborhood_attention(q, k, v, height: int, width: int, kernel_size: int, compiled: bool = True) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = _flex_block_mask(height, width, kernel_size, str(q.device))
    if compiled:
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():  # eager = the unfused reference; only tests run it on purpose
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask)


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------

IMPLEMENTATIONS = ("auto", "dense", "tiled", "flex", "reference")


def select_path(height: int, width: int, kernel_size: int, impl: str = "auto", device_type: str = "cpu") -> tuple[str, int | None, int | None]:
    """The kernel ``neighborhood_attention`` runs: ("tiled", ty, tx), ("dense", None, None), ("flex", ...).

    ``auto``: FlexAttention on CUDA; on CPU the tiled kernel where a tile's halo is small enough to save
    time, else the dense masked kernel (which costs what global attention costs)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown local attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    if impl in ("reference", "dense", "flex"):
        return impl, None, None
    if impl == "auto" and device_type == "cuda":
        return "flex", None, None
    ty, tx = tile_size_for(height, kernel_size), tile_size_for(width, kernel_size)
    if ty is None or tx is None:
        return "dense", None, None
    halo_fraction = (ty + kernel_size - 1) * (tx + kernel_size - 1) / (height * width)
    if impl == "tiled" or halo_fraction <= MAX_HALO_FRACTION:
        return "tiled", ty, tx
    return "dense", None, None


def neighborhood_attention(q, k, v, height: int, width: int, kernel_size: int, impl: str = "auto") -> torch.Tensor:
    """q, k, v: (B, heads, L = height*width, d) in raster order. Exact NATTEN semantics."""
    if FLOP_COUNTING and impl != "reference":
        return torch.ops.diffbias.neighborhood_attention(q, k, v, height, width, kernel_size)
    path, ty, tx = select_path(height, width, kernel_size, impl, q.device.type)
    if path == "reference":
        return neighborhood_attention_reference(q, k, v, height, width, kernel_size)
    if path == "flex":
        return _flex_neighborhood_attention(q, k, v, height, width, kernel_size, compiled=q.device.type == "cuda")
    if path == "tiled":
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
