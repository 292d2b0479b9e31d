"""Nearest neighbours of a few thousand queries in a training set of up to 10^5 - 10^6 images, and the statistics
built on them: the memorised fraction (Gu et al. 2023's d1/d2 < 1/3), Kadkhodaie et al.'s image correlation, and
bootstrap / Wilson intervals.

The search never holds the (queries x reference) distance matrix: the reference set is streamed in chunks (uint8
images are converted chunk by chunk, so a 10^6-image pool stays uint8 in host memory), each chunk is moved to the
device once, and a running top-k per query is merged with the chunk's top-k. L2 distances use
``||q||^2 + ||r||^2 - 2 q.r`` (one matrix product per chunk). In float32 that expansion has an absolute error of
about 1e-7 x ||q||^2 in d^2: for [-1, 1] images of D pixels at most ~1e-7 D, i.e. an RMS distance error below 3e-4
at any D, far below any threshold used here; d^2 is clamped at 0 so an exact copy has d = 0.

Distances are returned as RMS pixel distances, ``||a - b||_2 / sqrt(D)`` with images in [-1, 1] (so in [0, 2]):
Gu et al. (``sail-sg/DiffMemorize``, ``mem_ratio.py``) divide by sqrt(C H W) the same way; the ratio d1/d2 does not
depend on it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

__all__ = [
    "COPY_RATIO",
    "Rows",
    "as_vectors",
    "centred_unit",
    "nearest",
    "copy_ratio",
    "correlation",
    "bootstrap_interval",
    "wilson_interval",
]

COPY_RATIO = 1.0 / 3.0  # Gu et al. 2023 and Bonnaire et al.: a sample is a copy when d1 / d2 < 1/3


class Rows:
    """Rows ``idx`` of a pool (e.g. a run's training images) without copying them: the search reads one slice at a
    time, so a 10^6-image uint8 pool is never duplicated."""

    def __init__(self, pool, idx):
        self.pool, self.idx = pool, np.asarray(idx)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, key):
        return self.pool[self.idx[key]]


def as_vectors(images) -> torch.Tensor:
    """uint8 images (n, C, H, W) (numpy or torch) or float images in [-1, 1] -> float32 (n, D) in [-1, 1]."""
    x = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
    if not x.is_floating_point():
        x = x.to(torch.float32) / 127.5 - 1.0
    return x.reshape(len(x), -1).to(torch.float32)


def centred_unit(x: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean, divided by its norm: the inner product of two such rows is Kadkhodaie et al.'s image
    correlation (``im_set_corr``: mean removed over C, H, W, then cosine similarity). A constant image (norm 0) is
    kept at 0 (correlation 0 with everything) instead of dividing by zero."""
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(1e-12), torch.zeros_like(x))


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their norms (cosine similarity as an inner product)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def nearest(queries, reference, k: int = 2, *, metric: str = "l2", embed: Callable | None = None,
            device: str | torch.device = "cpu", reference_chunk: int = 16384, query_chunk: int = 4096,
            exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest reference items of every query: (values, indices), each (Q, k) numpy, best first.

    - ``metric="l2"``: values are RMS distances ``||q - r|| / sqrt(D)`` (ascending);
    - ``metric="cosine"``: values are cosine similarities (descending); pass unit rows (or ``embed=unit``), or
      :func:`centred_unit` rows for Kadkhodaie et al.'s correlation.

    ``queries`` and ``reference`` are anything :func:`as_vectors` reads (uint8 images, [-1, 1] floats, feature
    matrices) or, with ``embed``, whatever ``embed(chunk) -> (n, D) float tensor`` reads; a numpy memmap works (only
    the chunk in use is read). ``exclude_self``: queries are the first Q reference items themselves (train-to-train
    distances) and each query's own entry is skipped.
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    embed = embed or as_vectors
    dev = torch.device(device)
    q = embed(queries[:] if isinstance(queries, Rows) else queries).to(dev)
    n_ref = len(reference)
    if n_ref < k + (1 if exclude_self else 0):
        raise ValueError(f"need at least {k + int(exclude_self)} reference items for k={k}, got {n_ref}")
    dim = q.shape[1]
    largest = metric == "cosine"
    best_v = torch.full((len(q), k), -math.inf if largest else math.inf, device=dev)
    best_i = torch.full((len(q), k), -1, dtype=torch.long, device=dev)
    q_sq = (q * q).sum(1) if metric == "l2" else None
    for start in range(0, n_ref, reference_chunk):
        r = embed(reference[start:start + reference_chunk]).to(dev)
        if r.shape[1] != dim:
            raise ValueError(f"queries have {dim} dimensions, reference items {r.shape[1]}")
        r_sq = (r * r).sum(1) if metric == "l2" else None
        idx = torch.arange(start, start + len(r), device=dev)
        for qs in range(0, len(q), query_chunk):
            block = q[qs:qs + query_chunk] @ r.T
            if metric == "l2":  # squared distances from the expansion; negatives are rounding
                block = (q_sq[qs:qs + query_chunk, None] + r_sq[None, :] - 2.0 * block).clamp_min_(0.0)
            if exclude_self:
                own = torch.arange(qs, qs + len(block), device=dev)
                hit = (own >= start) & (own < start + len(r))
                block[hit.nonzero().squeeze(1), (own[hit] - start)] = -math.inf if largest else math.inf
            kk = min(k, block.shape[1])
            v, i = block.topk(kk, dim=1, largest=largest)
            merged_v = torch.cat([best_v[qs:qs + query_chunk], v], dim=1)
            merged_i = torch.cat([best_i[qs:qs + query_chunk], idx[i]], dim=1)
            keep_v, keep = merged_v.topk(k, dim=1, largest=largest)
            best_v[qs:qs + query_chunk] = keep_v
            best_i[qs:qs + query_chunk] = merged_i.gather(1, keep)
    if metric == "l2":
        best_v = (best_v / dim).sqrt()
    return best_v.cpu().numpy(), best_i.cpu().numpy()


def copy_ratio(distances: np.ndarray) -> np.ndarray:
    """d1 / d2 per query from :func:`nearest`'s (Q, >=2) L2 distances (0 when both are 0: an exact duplicate)."""
    d1, d2 = distances[:, 0], distances[:, 1]
    return np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1.0), 0.0)


def correlation(a, b) -> np.ndarray:
    """Kadkhodaie et al.'s correlation of paired images a[i], b[i] (mean removed, then cosine similarity)."""
    return (centred_unit(as_vectors(a)) * centred_unit(as_vectors(b))).sum(1).numpy()


def bootstrap_interval(values: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray] = None, *,
                       resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (default: the mean) over the items of ``values`` (first axis),
    from ``resamples`` resamples with replacement drawn by ``np.random.default_rng(seed)``.

    ``statistic`` takes a (resamples, n, ...) array and returns (resamples,) values. With 0 resamples, or a single
    item, the interval is (nan, nan)."""
    values = np.asarray(values)
    if resamples <= 0 or len(values) < 2:
        return float("nan"), float("nan")
    statistic = statistic or (lambda x: x.mean(axis=1))
    idx = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    reps = np.asarray(statistic(values[idx]), dtype=np.float64)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(low), float(high)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: valid at 0 and n successes, where a percentile bootstrap collapses to
    a single point ([0, 0] for 0 copies of 64, which would make 0/64 and 4/64 look different although Fisher's exact
    test does not)."""
    from scipy.stats import norm

    if n <= 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
