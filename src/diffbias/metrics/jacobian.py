"""Jacobian eigenvectors of the denoiser (paper 004 section 2.2, figs. 1 and 3, appendix A.4).

Following Kadkhodaie et al. (2024), the object analysed is the Jacobian of the *denoiser*, the one-step
estimate of the clean image as a function of its noisy input,

    x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t),     J = d x0_hat / d x_t,

a (D, D) matrix with D = C * H * W (pixels and channels flattened in C, H, W order). The paper's
appendix A.4 writes the Jacobian of the eps network instead; the two differ by an affine map,

    J_denoiser = (I - sqrt(1 - abar_t) J_eps) / sqrt(abar_t),

so they share eigenvectors (for the symmetric parts) and their eigenvalues are related by
lambda_den = (1 - sqrt(1 - abar) lambda_eps) / sqrt(abar): the order is reversed, the leading denoiser
eigenvectors are the eps network's trailing ones. x0_hat is not clipped to [-1, 1] here (clipping is
not differentiable and would zero the Jacobian rows of saturated pixels).

A learned denoiser's Jacobian is close to, but not exactly, symmetric. We diagonalise its symmetric
part (J + J^T) / 2 with ``torch.linalg.eigh`` in float64 (real eigenvalues, orthonormal eigenvectors)
and report the asymmetry ||J - J^T||_F / ||J||_F alongside, so that the approximation is visible.

Two ways to the top eigenvectors (``method`` of :func:`jacobian_analysis`):

- ``"full"``: the Jacobian is assembled from D vector-Jacobian products, ``chunk_size`` at a time, which
  bounds the memory to about ``chunk_size`` copies of the model's activations: either with
  ``torch.func.jacrev`` (vmap over VJPs, ``rows="vmap"``) or, by default, by pushing ``chunk_size`` copies
  of x_t through the model as one batch (``rows="batch"``, faster because fused attention has no vmap rule
  for its backward; see :func:`denoiser_jacobian`); then ``eigh`` gives all D eigenpairs and the exact
  asymmetry. D products: 3072 for a 32x32x3 image.
- ``"lanczos"`` (matrix-free): block Lanczos with full reorthogonalisation on products
  S V = (J V + J^T V) / 2 for a block of vectors V at once (:func:`symmetric_jacobian_operator`): J^T V
  by one reverse pass over a batch of copies of x_t, J V by one forward-mode pass
  (``torch.autograd.forward_ad``; the fused CPU/CUDA attention kernels have no forward-mode rule, so that
  pass uses PyTorch's math attention). It stops when the top-k Ritz pairs have relative residuals
  ||S y - theta y|| / |theta_1| below ``tol`` (or after ``max_products``) and returns only those k pairs; the
  asymmetry is then a Hutchinson-style estimate ||(J - J^T) Q||_F / ||J Q||_F from the first block Q of
  random orthonormal probes (no extra products).
- ``"auto"`` (default): ``"full"`` up to D = 1024 (all D eigenvalues, exact asymmetry), ``"lanczos"`` above.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..diffusion import create_diffusion, q_sample

__all__ = [
    "noisy_input",
    "denoiser_jacobian",
    "eigendecompose",
    "symmetric_jacobian_operator",
    "block_lanczos",
    "jacobian_analysis",
    "plot_eigenvectors",
]

METHODS = ("auto", "full", "lanczos")
AUTO_FULL_MAX_D = 1024  # "auto" assembles the full Jacobian up to this dimension (16x16x3 = 768), else Lanczos


def _abar(t: int) -> float:
    diffusion = create_diffusion(None)  # the original 1000-step linear schedule
    if not 0 <= int(t) < diffusion.num_timesteps:
        raise ValueError(f"timestep {t} outside [0, {diffusion.num_timesteps})")
    return float(diffusion.alphas_cumprod[int(t)])


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def noisy_input(x0: Tensor, t: int, noise_seed: int = 0) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with eps drawn on the CPU from ``noise_seed``.

    ``t`` is an original timestep in [0, 1000). The noise depends only on the seed and the shape, so it is
    the same on every device and for every model (paired comparisons).
    """
    abar = _abar(t)
    gen = torch.Generator().manual_seed(int(noise_seed))
    noise = torch.randn(tuple(x0.shape), generator=gen, dtype=torch.float32)
    return q_sample(x0.detach().float().cpu(), abar, noise)



def _denoiser_point(model, x0: Tensor, t: int, noise_seed: int, y):
    """Where a Jacobian of the denoiser is taken: device, dtype, sqrt(abar_t), sqrt(1 - abar_t), the image
    shape, the flattened noisy input x_t and the (1,) label tensor or None."""
    if x0.ndim != 3:
        raise ValueError(f"x0 must be one (C, H, W) image, got shape {tuple(x0.shape)}")
    device, dtype = _model_device_dtype(model)
    abar = _abar(t)
    x_t = noisy_input(x0, t, noise_seed).to(device=device, dtype=dtype).reshape(-1)
    y_one = None if y is None else torch.as_tensor(y, dtype=torch.long, device=device).reshape(1)
    return device, dtype, math.sqrt(abar), math.sqrt(1.0 - abar), tuple(x0.shape), x_t, y_one

def denoiser_jacobian(
    model,
    x0: Tensor,
    t: int,
    *,
    noise_seed: int = 0,
    chunk_size: int | None = 256,
    y: int | Tensor | None = None,
    method: str = "batch",
) -> Tensor:
    """Jacobian (D, D) of the denoiser x0_hat(x_t) with respect to x_t, at x_t built from ``x0``.

    model: a backbone obeying the model contract (first C output channels are eps); put it in eval mode.
    x0: (C, H, W) clean image in [-1, 1]. t: original timestep in [0, 1000).
    noise_seed: seed of the noise that builds x_t (see :func:`noisy_input`).
    chunk_size: number of Jacobian rows computed together (memory bound); None = all D at once.
    y: class label (int or 0-d/1-element tensor) for a class-conditional model, else None.
    method: "batch" (default) or "vmap", two ways to batch the D vector-Jacobian products:
      - "vmap": ``torch.func.jacrev(..., chunk_size)``, one forward, vmapped backwards. PyTorch has no
        vmap batching rule for the backward of fused attention (SDPA), so it falls back to a per-sample
        loop: on CPU a 32x32x3 Jacobian of DiT-T/2 took > 300 s against 110-130 s for "batch".
      - "batch": ``chunk_size`` copies of x_t go through the model as one batch and one backward gives
        one Jacobian row per copy. Needs a model that treats batch elements independently (true of every
        backbone of the contract in eval mode: no batch norm).
      Both give the same matrix up to float32 round-off (tested).

    Entry [i, j] is d x0_hat_i / d x_t_j with both images flattened in (C, H, W) order. Float32 on the
    model's device; see the module docstring for the relation to the eps-network Jacobian.
    """
    device, dtype, sq, sq1m, shape, x_t, y_batch = _denoiser_point(model, x0, t, noise_seed, y)
    C = shape[0]
    t_batch = torch.full((1,), int(t), dtype=torch.long, device=device)

    def denoise(x_flat: Tensor) -> Tensor:
        x = x_flat.reshape(1, *shape)
        eps = model(x, t_batch, y_batch)[:, :C]
        return ((x - sq1m * eps) / sq).reshape(-1)

    if method == "vmap":
        with warnings.catch_warnings():  # the missing SDPA-backward batching rule (see the docstring)
            warnings.filterwarnings("ignore", message=".*have not yet implemented the batching rule.*")
            return torch.func.jacrev(denoise, chunk_size=chunk_size)(x_t).detach()
    if method != "batch":
        raise ValueError(f"unknown method {method!r}; use 'vmap' or 'batch'")
    # Replicated batch: n copies of x_t go through the model as a batch of n independent images; the
    # backward of sum_i <e_{r_i}, x0_hat(copy_i)> puts row r_i of J in the gradient of copy i.
    D = x_t.numel()
    n_max = D if chunk_size is None else max(1, int(chunk_size))
    J = torch.empty(D, D, device=device, dtype=dtype)
    for start in range(0, D, n_max):
        rows = torch.arange(start, min(start + n_max, D), device=device)
        n = rows.numel()
        x = x_t.detach().expand(n, D).clone().requires_grad_(True)
        with torch.enable_grad():
            eps = model(x.view(n, *shape), t_batch.expand(n), None if y_batch is None else y_batch.expand(n))[:, :C]
            out = (x - sq1m * eps.reshape(n, D)) / sq
            picked = out.gather(1, rows[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, x)
        J[start : start + n] = grad
    return J


@contextlib.contextmanager
def _forward_mode_attention():
    """Attention kernels with a forward-mode AD rule: PyTorch's math SDPA backend (the fused CPU/CUDA kernels
    have none) and, for local attention, the dense masked kernel instead of FlexAttention (which rejects
    dual tensors). The values are the same; only the speed differs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..models import attention as attention_lib

    select = attention_lib.select_path

    def no_flex(*args, **kwargs):
        path = select(*args, **kwargs)
        return ("dense", None, None) if path[0] == "flex" else path

    attention_lib.select_path = no_flex
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        attention_lib.select_path = select


def symmetric_jacobian_operator(model, x0: Tensor, t: int, *, noise_seed: int = 0, y: int | Tensor | None = None):
    """Matrix-free products with the denoiser Jacobian J at x_t built from ``x0`` (as :func:`denoiser_jacobian`).

    Returns ``products(V) -> (J V, J^T V)`` for a (D, b) block V (any float dtype; results float64 on the
    CPU). One call pushes b copies of x_t through the model twice: a forward-mode pass (tangents V) gives
    J V, a reverse pass (cotangents V) gives J^T V. Needs a model that treats batch elements independently
    (every backbone of the contract in eval mode). Fused scaled-dot-product attention and FlexAttention
    have no forward-mode rule in PyTorch, so the forward-mode pass runs the math attention backend and the
    dense local-attention kernel (same values, see :func:`_forward_mode_attention`).
    """
    import torch.autograd.forward_ad as fwAD

    device, dtype, sq, sq1m, shape, x_t, y_one = _denoiser_point(model, x0, t, noise_seed, y)
    C = shape[0]
    D = int(np.prod(shape))

    def denoise(x: Tensor) -> Tensor:  # (n, D) -> (n, D)
        n = x.shape[0]
        t_batch = torch.full((n,), int(t), dtype=torch.long, device=device)
        eps = model(x.view(n, *shape), t_batch, None if y_one is None else y_one.expand(n))[:, :C]
        return (x - sq1m * eps.reshape(n, D)) / sq

    def products(V: Tensor) -> tuple[Tensor, Tensor]:
        if V.ndim != 2 or V.shape[0] != D:
            raise ValueError(f"need a ({D}, b) block, got {tuple(V.shape)}")
        Vt = V.T.to(device=device, dtype=dtype).contiguous()
        n = Vt.shape[0]
        with torch.no_grad(), _forward_mode_attention(), fwAD.dual_level():
            out = denoise(fwAD.make_dual(x_t.expand(n, D).contiguous(), Vt))
            jv = fwAD.unpack_dual(out).tangent
        x = x_t.detach().expand(n, D).clone().requires_grad_(True)
        with torch.enable_grad():
            (jtv,) = torch.autograd.grad(denoise(x), x, grad_outputs=Vt)
        return jv.T.double().cpu(), jtv.T.double().cpu()

    products.dim = D
    return products


def block_lanczos(
    matmul,
    dim: int,
    k: int,
    *,
    block_size: int = 8,
    max_products: int = 512,
    tol: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Top-k (algebraically largest) eigenpairs of a symmetric operator from block products only.

    ``matmul(X)`` maps a (dim, b) float64 block to S X. Block Lanczos with full (twice-applied)
    reorthogonalisation: the Krylov basis Q and S Q are kept, the Ritz pairs of Q^T S Q are computed after
    every block, and the iteration stops when the top-k relative residuals ||S y - theta y|| / |theta_1|
    are all below ``tol``, when ``max_products`` products are spent, or when the basis spans the space.
    The residuals are exact (S Q is stored), so no extra products check convergence.

    Returns eigenvalues (k,) descending, eigenvectors (dim, k) orthonormal, residuals (k,), products
    (how many single-vector products were spent), converged (bool), and first_block / first_products, the
    random orthonormal start block and S applied to it.
    """
    k = min(int(k), dim)
    b = max(1, min(int(block_size), dim))
    gen = torch.Generator().manual_seed(int(seed))
    X, _ = torch.linalg.qr(torch.randn(dim, b, generator=gen, dtype=torch.float64))
    Q = torch.empty(dim, 0, dtype=torch.float64)
    SQ = torch.empty(dim, 0, dtype=torch.float64)
    T = torch.empty(0, 0, dtype=torch.float64)  # Q^T S Q, grown by one block row and column per step
    products, first = 0, None
    while True:
        SX = matmul(X).to(torch.float64)
        products += X.shape[1]
        if first is None:
            first = (X.clone(), SX.clone())
        Q, SQ = torch.cat([Q, X], 1), torch.cat([SQ, SX], 1)
        col = Q.T @ SX
        T = torch.cat([torch.cat([T, col[: T.shape[0]].T], 0), col], 1)
        theta, C = torch.linalg.eigh(0.5 * (T + T.T))
        theta, C = theta.flip(0)[:k], C.flip(1)[:, :k]
        Y = Q @ C
        scale = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
        residuals = torch.linalg.vector_norm(SQ @ C - Y * theta, dim=0) / scale
        full = Q.shape[1] >= dim
        converged = bool(Q.shape[1] >= k and (residuals < tol).all()) or full
        if converged or products + b > max_products:
            break
        W = SX - Q @ (Q.T @ SX)
        W = W - Q @ (Q.T @ W)
        X, R = torch.linalg.qr(W)
        # deflate: a direction already in the basis (tiny diagonal of R) is replaced by a fresh random one
        weak = R.diagonal().abs() < 1e-10 * max(1.0, float(SX.abs().max()))
        if weak.any():
            fresh = torch.randn(dim, int(weak.sum()), generator=gen, dtype=torch.float64)
            fresh = fresh - Q @ (Q.T @ fresh)
            X = torch.cat([X[:, ~weak], fresh], 1)
            X = X - Q @ (Q.T @ X)
            X, _ = torch.linalg.qr(X)
        X = X[:, : max(0, dim - Q.shape[1])]
        if X.shape[1] == 0:
            break
    return {"eigenvalues": theta, "eigenvectors": Y, "residuals": residuals, "products": products,
            "converged": converged, "first_block": first[0], "first_products": first[1]}


def lanczos_eigenpairs(model, x0: Tensor, t: int, *, k: int, noise_seed: int = 0, y=None, block_size: int = 8,
                       max_products: int = 512, tol: float = 1e-3, seed: int = 0) -> dict:
    """Top-k eigenpairs of (J + J^T)/2 of the denoiser at x_t (matrix-free), and the estimated asymmetry."""
    op = symmetric_jacobian_operator(model, x0, t, noise_seed=noise_seed, y=y)
    probes = {}

    def sym(X: Tensor) -> Tensor:
        jv, jtv = op(X)
        if not probes:  # the random start block: a Hutchinson-style estimate of ||J - J^T|| / ||J||
            probes["asym"] = float(torch.linalg.matrix_norm(jv - jtv) / torch.linalg.matrix_norm(jv).clamp_min(1e-300))
        return 0.5 * (jv + jtv)

    out = block_lanczos(sym, op.dim, k, block_size=block_size, max_products=max_products, tol=tol, seed=seed)
    out["asymmetry"] = probes["asym"]
    return out


def eigendecompose(J: Tensor) -> dict[str, Tensor | float]:
    """Eigen-decomposition of the symmetric part of a square Jacobian, in float64.

    Returns ``eigenvalues`` (D,) in descending order, ``eigenvectors`` (D, D) with eigenvector k in
    column k (orthonormal), and ``asymmetry`` = ||J - J^T||_F / ||J||_F (0 for a symmetric J; a float).
    The symmetric part S = (J + J^T) / 2 equals eigenvectors @ diag(eigenvalues) @ eigenvectors^T.
    """
    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"need a square matrix, got shape {tuple(J.shape)}")
    J64 = J.detach().to(torch.float64)
    norm = torch.linalg.matrix_norm(J64)
    asym = float(torch.linalg.matrix_norm(J64 - J64.T) / norm) if norm > 0 else 0.0
    S = 0.5 * (J64 + J64.T)
    values, vectors = torch.linalg.eigh(S)  # ascending
    return {"eigenvalues": values.flip(0), "eigenvectors": vectors.flip(1), "asymmetry": asym}


def jacobian_analysis(
    model,
    images: Tensor,
    t_values: Sequence[int],
    *,
    noise_seed: int = 0,
    chunk_size: int | None = 256,
    top_k: int = 16,
    labels: Tensor | None = None,
    method: str = "auto",
    rows: str = "batch",
    block_size: int = 8,
    max_products: int = 512,
    tol: float = 1e-3,
) -> tuple[pd.DataFrame, Tensor]:
    """Eigen-analysis of the denoiser Jacobian for every image and original timestep.

    images: (N, C, H, W) in [-1, 1]; t_values: original timesteps in [0, 1000); labels: (N,) or None.
    Image i is noised with seed ``noise_seed + i`` (the same noise at every t, scaled by the schedule).
    method: "full", "lanczos" or "auto" (see the module docstring; "batch"/"vmap" mean "full" with those
    rows). rows: how "full" computes its rows. block_size, max_products, tol: the Lanczos settings.

    Returns
    - a tidy DataFrame with one row per (image, t, rank) and columns image, t, rank (0 = largest),
      eigenvalue, asymmetry (of that (image, t) Jacobian, repeated on its rows; estimated by "lanczos"),
      method, products (Jacobian products spent: D for "full", vector products for "lanczos"), residual
      (relative residual of the eigenpair, 0 for "full"): all D eigenvalues for "full", the top k for
      "lanczos";
    - the top-k eigenvectors as a float32 CPU tensor (N, len(t_values), k, C, H, W), ordered like the
      eigenvalues (eigenvector signs are arbitrary).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if method in ("batch", "vmap"):
        method, rows = "full", method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    N, C, H, W = images.shape
    D = C * H * W
    k = min(int(top_k), D)
    if method == "auto":
        method = "full" if D <= AUTO_FULL_MAX_D else "lanczos"
    vecs = torch.zeros(N, len(t_values), k, C, H, W)
    frames = []
    for i in range(N):
        y = None if labels is None else labels[i]
        for j, t in enumerate(t_values):
            if method == "full":
                J = denoiser_jacobian(model, images[i], int(t), noise_seed=noise_seed + i, chunk_size=chunk_size, y=y,
                                      method=rows)
                eig = eigendecompose(J)
                vals, vectors, products = eig["eigenvalues"].cpu().numpy(), eig["eigenvectors"][:, :k], D
                residual = np.zeros(D)
            else:
                eig = lanczos_eigenpairs(model, images[i], int(t), k=k, noise_seed=noise_seed + i, y=y,
                                         block_size=block_size, max_products=max_products, tol=tol, seed=noise_seed + i)
                vals, vectors, products = eig["eigenvalues"].numpy(), eig["eigenvectors"], eig["products"]
                residual = eig["residuals"].numpy()
                if not eig["converged"]:
                    warnings.warn(f"Lanczos stopped after {products} products with residuals up to "
                                  f"{residual.max():.2g} > tol={tol} (image {i}, t={t}); raise max_products")
            frames.append(pd.DataFrame({
                "image": i, "t": int(t), "rank": np.arange(len(vals)), "eigenvalue": vals,
                "asymmetry": eig["asymmetry"], "method": method, "products": int(products), "residual": residual,
            }))
            vecs[i, j] = vectors.T.reshape(k, C, H, W).float().cpu()
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["image", "t", "rank", "eigenvalue", "asymmetry", "method", "products", "residual"])
    return df, vecs


# ----------------------------------------------------------------------------------------------------
# Figure (paper 004 fig. 1b / fig. 3: split-channel eigenvectors with R/G/B box outlines)
# ----------------------------------------------------------------------------------------------------

_CHANNEL_COLOURS = ("red", "green", "blue")


def plot_eigenvectors(
    eigvecs: Tensor,
    eigenvalues: Sequence[float] | Tensor | None = None,
    *,
    ncols: int | None = None,
    axes=None,
    path: str | Path | None = None,
    cmap: str = "gray",
    panel_size: float = 1.6,
):
    """Plot eigenvectors (k, C, H, W) as images; returns the matplotlib Figure.

    Each eigenvector's channels are laid side by side (split-channel view, paper 004 fig. 1b) and each
    channel is outlined with a coloured box: red, green, blue for C = 3 (further channels black); a
    one-channel eigenvector gets a single black box. Every eigenvector is shown on a symmetric colour
    scale [-m, m], m = its largest absolute entry (the sign of an eigenvector is arbitrary).
    ``eigenvalues`` (k,) become the panel titles. Draws into ``axes`` (an array of >= k Axes) when
    given, else into a new figure with ``ncols`` columns; saves to ``path`` when given.
    """
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    v = torch.as_tensor(eigvecs).detach().float().cpu()
    if v.ndim == 3:
        v = v[:, None]
    if v.ndim != 4:
        raise ValueError(f"eigvecs must be (k, C, H, W), got {tuple(v.shape)}")
    k, C, H, W = v.shape
    gap = max(1, W // 8)
    if axes is None:
        ncols = ncols or min(k, 8)
        nrows = math.ceil(k / ncols)
        aspect = (C * W + (C - 1) * gap) / H
        fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * aspect * ncols, panel_size * nrows + 0.3), squeeze=False)
    else:
        axes = np.asarray(axes)
        fig = axes.flat[0].figure
    flat = list(np.asarray(axes).flat)
    if len(flat) < k:
        raise ValueError(f"{k} eigenvectors but only {len(flat)} axes")
    for idx, ax in enumerate(flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if idx >= k:
            ax.axis("off")
            continue
        m = float(v[idx].abs().max()) or 1.0
        canvas = np.full((H, C * W + (C - 1) * gap), np.nan)
        for c in range(C):
            x0 = c * (W + gap)
            canvas[:, x0 : x0 + W] = v[idx, c].numpy()
        cm = matplotlib.colormaps[cmap].with_extremes(bad="white")
        ax.imshow(canvas, cmap=cm, vmin=-m, vmax=m, interpolation="nearest")
        for c in range(C):
            colour = _CHANNEL_COLOURS[c] if C == 3 else "black"
            ax.add_patch(Rectangle((c * (W + gap) - 0.5, -0.5), W, H, fill=False, edgecolor=colour, linewidth=1.5))
        for spine in ax.spines.values():
            spine.set_visible(False)
        if eigenvalues is not None:
            ax.set_title(f"$\\lambda_{{{idx + 1}}}$ = {float(eigenvalues[idx]):.3g}", fontsize=8)
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig, path: str | Path, dpi: int = 150) -> None:
    """Save a figure atomically; the format follows the file extension (png when there is none)."""
    from ..io import atomic_path

    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, bbox_inches="tight", dpi=dpi)
