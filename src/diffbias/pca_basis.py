"""The PCA basis of a trained baseline's attention maps (paper 004 appendix C): an input to training.

A PCA-attention variant (``PCAAttention``, ``DiT.load_pca_basis``) composes each attention map from the
principal components of a trained baseline's maps; :func:`collect_pca_basis` computes those components.
It lives outside ``models/`` because it runs a trained model through the attention recording of
:mod:`diffbias.metrics.attention_maps` (models never import metrics), and outside ``metrics/`` because its
result is not a measurement but what a later training run loads.

Timesteps. :func:`collect_pca_basis` takes *respaced* step indices (paper 004 app. C: steps 10, 25, 40 of
50) and maps them to original timesteps through the respaced diffusion's ``timestep_map``.

PCA basis (app. C). The paper composes an attention map as ``coefficients x PCs + delta`` with
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

import math
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .diffusion import create_diffusion, q_sample
from .metrics.attention_maps import _as_timesteps, _labels, _model_device, _record

__all__ = ["streaming_pca", "collect_pca_basis"]


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
    """Principal components of the attention maps of a trained baseline (paper 004 appendix C).

    For every image (N, C, H, W) in [-1, 1] and every *respaced* step s in ``steps`` of a ``respacing``-step
    chain, x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps (eps drawn on the CPU from ``noise_seed``,
    independently per step) goes through the model at its original timestep; the map of every head of
    each requested layer (1-based, call order) is one sample, flattened to a vector of L * L
    (row-major: entry q * L + k is query q's weight on key k). The paper's setting: 2048 test images x 3
    steps x 4 heads = 24,576 maps per layer of DiT-XS/1, 50 components.

    PCA is on the centred maps (see the module docstring: this is what makes ``coefficients x PCs + 1/L``
    rows sum to 1). When all maps of all layers fit in ``max_memory_bytes`` (float32) they are stacked on
    the model's device and passed to ``torch.pca_lowrank(A, q=num_components + oversample, center=True,
    niter=niter)`` (random sketch seeded with ``pca_seed``), keeping the first ``num_components``
    directions: the extra sketch columns make the last kept components accurate (with q = num_components
    exactly, the trailing ones of a randomised PCA are visibly off). Otherwise (the paper's setting needs
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
                x = q_sample(images[sl], abar, noise[j, sl]).to(device)
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


def basis_for_run(model: str, data: str, out: str, request: dict, device: str = "auto", threads: int | None = None) -> None:
    """The basis a PCA-attention variant asks of a trained baseline run (``request``: layers, components,
    num_images, timesteps, respacing; diffbias.plan.pca_request), from held-out images as paper 004 app. C does."""
    from .device import set_threads
    from .io import provenance, save_torch
    from .runs import TrainedRun

    set_threads(threads)
    run = TrainedRun.load(model, data, device, threads=threads)
    test = run.test_images(request["num_images"])
    components = collect_pca_basis(run.model, test.x, layers=tuple(request["layers"]), steps=tuple(request["timesteps"]),
                                   respacing=request["respacing"], num_components=request["components"], labels=test.y)
    save_torch({"components": components, "request": request, "source": run.run,
                "provenance": provenance(None, str(run.device))}, out)
