"""FID against precomputed reference statistics (ADM's VIRTUAL_*.npz layout) on small synthetic features."""

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity")

from diffbias.metrics import fid  # noqa: E402


def _features(n, d, shift, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.1 * torch.randn(d, d, generator=g)) + shift


def test_statistics_file_and_features_give_the_same_fid(tmp_path):
    samples, reference = _features(300, 32, 0.0, 1), _features(400, 32, 0.3, 2)
    fid.save_fid_statistics(tmp_path / "ref.npz", reference)
    direct = fid.metrics_from_features(samples, reference, kid=False, prc=False)["fid"]
    assert direct > 1.0  # different distributions: a test that could fail
    assert fid.fid_from_statistics(samples, tmp_path / "ref.npz") == pytest.approx(direct, rel=1e-6)
    assert fid.fid_from_statistics(reference, tmp_path / "ref.npz") == pytest.approx(0.0, abs=1e-6)


def test_reads_an_adm_style_reference_file(tmp_path):
    """ADM's files also hold the images (arr_0) and sFID statistics (mu_s, sigma_s), all float64."""
    reference = _features(200, 16, 0.5, 3).double().numpy()
    mu, sigma = reference.mean(0), np.cov(reference, rowvar=False)
    np.savez(tmp_path / "VIRTUAL_test.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma,
             mu_s=np.zeros(7), sigma_s=np.eye(7))
    samples = _features(200, 16, 0.0, 4)
    expected = fid.metrics_from_features(samples, torch.from_numpy(reference).float(), kid=False, prc=False)["fid"]
    assert fid.fid_from_statistics(samples, tmp_path / "VIRTUAL_test.npz") == pytest.approx(expected, rel=1e-5)
    stats = fid.load_fid_statistics(tmp_path / "VIRTUAL_test.npz")
    assert stats["mu"].dtype == np.float64 and stats["sigma"].shape == (16, 16)
    with pytest.raises(ValueError, match="16-d"):
        fid.fid_from_statistics(_features(50, 8, 0.0, 5), stats)
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
    with pytest.raises(KeyError, match="mu and sigma"):
        fid.load_fid_statistics(tmp_path / "bad.npz")
