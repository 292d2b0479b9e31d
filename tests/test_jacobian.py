import math

import pytest
import torch
import torch.nn as nn

from diffbias.diffusion import create_diffusion
from diffbias.metrics.jacobian import (
    denoiser_jacobian,
    eigendecompose,
    jacobian_analysis,
    noisy_input,
    plot_eigenvectors,
)
from diffbias.models.registry import build_model

T = 400


class LinearEps(nn.Module):
    """eps(x) = A x per image (flattened C, H, W); a second block of zero channels plays learned sigma."""

    def __init__(self, A: torch.Tensor, shape: tuple[int, int, int]):
        super().__init__()
        self.shape = shape
        self.A = nn.Parameter(A.clone())

    def forward(self, x, t, y=None):
        B = x.shape[0]
        eps = (x.reshape(B, -1) @ self.A.T).reshape(B, *self.shape)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


def closed_form(A: torch.Tensor, t: int) -> torch.Tensor:
    abar = float(create_diffusion(None).alphas_cumprod[t])
    return (torch.eye(A.shape[0], dtype=torch.float64) - math.sqrt(1 - abar) * A.double()) / math.sqrt(abar)


def tiny_dit(size: int = 8, channels: int = 1, **options) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(preset="DiT-T/2", input_size=size, in_channels=channels, options=options).eval()
    with torch.no_grad():  # adaLN-Zero makes eps = 0 at init: perturb so that the Jacobian is not trivial
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0.0, 0.05)
    return model


SHAPE = (2, 3, 3)  # D = 18


@pytest.mark.parametrize("method", ["batch", "vmap"])
def test_linear_model_matches_closed_form(method):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(18, 18, generator=g) * 0.3
    model = LinearEps(A, SHAPE)
    x0 = torch.rand(SHAPE, generator=g) * 2 - 1
    J = denoiser_jacobian(model, x0, T, chunk_size=5, method=method)
    assert J.shape == (18, 18)
    torch.testing.assert_close(J.double(), closed_form(A, T), rtol=1e-5, atol=1e-5)


def test_asymmetry_symmetric_and_not():
    g = torch.Generator().manual_seed(2)
    B = torch.randn(18, 18, generator=g) * 0.3
    x0 = torch.zeros(SHAPE)
    sym = eigendecompose(denoiser_jacobian(LinearEps((B + B.T) / 2, SHAPE), x0, T))
    assert sym["asymmetry"] < 1e-6
    J = denoiser_jacobian(LinearEps(B, SHAPE), x0, T)
    Jc = closed_form(B, T)
    expected = float(torch.linalg.matrix_norm(Jc - Jc.T) / torch.linalg.matrix_norm(Jc))
    assert eigendecompose(J)["asymmetry"] == pytest.approx(expected, rel=1e-4)
    # a hand example: ||[[0,1],[-1,0]]||_F / ||[[1,1],[0,1]]||_F = sqrt(2/3)
    assert eigendecompose(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))["asymmetry"] == pytest.approx(math.sqrt(2 / 3))


def test_eigendecompose_reconstructs_symmetric_part():
    g = torch.Generator().manual_seed(3)
    J = torch.randn(12, 12, generator=g)
    out = eigendecompose(J)
    vals, vecs = out["eigenvalues"], out["eigenvectors"]
    assert vals.dtype == torch.float64 and vecs.shape == (12, 12)
    assert torch.all(vals[:-1] >= vals[1:])  # descending
    S = (J.double() + J.double().T) / 2
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, S)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(S @ vecs[:, 0], vals[0] * vecs[:, 0])


def test_noise_seed_is_deterministic():
    x0 = torch.rand(1, 4, 4)
    torch.testing.assert_close(noisy_input(x0, 10, 5), noisy_input(x0, 10, 5))
    assert not torch.equal(noisy_input(x0, 10, 5), noisy_input(x0, 10, 6))
    abar = float(create_diffusion(None).alphas_cumprod[0])
    assert (noisy_input(x0, 0, 5) - math.sqrt(abar) * x0).abs().max() < 0.2


def test_tiny_dit_chunked_equals_unchunked_and_methods_agree():
    model = tiny_dit(8, 1)
    x0 = torch.rand(1, 8, 8) * 2 - 1
    full = denoiser_jacobian(model, x0, 600, chunk_size=None)
    chunked = denoiser_jacobian(model, x0, 600, chunk_size=24)
    vmapped = denoiser_jacobian(model, x0, 600, chunk_size=32, method="vmap")
    assert full.shape == (64, 64)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vmapped, full, rtol=1e-4, atol=1e-5)
    # not the trivial I / sqrt(abar) of an all-zero eps network
    abar = float(create_diffusion(None).alphas_cumprod[600])
    assert (full - torch.eye(64) / math.sqrt(abar)).abs().max() > 1e-3
    # matches a finite difference along one direction
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    xt = noisy_input(x0, 600, 0)
    tt = torch.tensor([600])

    def den(x):
        return ((x - math.sqrt(1 - abar) * model(x, tt)[:, :1]) / math.sqrt(abar)).reshape(-1)

    h = 1e-3
    with torch.no_grad():
        fd = (den((xt.reshape(-1) + h * v).reshape(1, 1, 8, 8)) - den((xt.reshape(-1) - h * v).reshape(1, 1, 8, 8))) / (2 * h)
    torch.testing.assert_close(full @ v, fd, rtol=2e-2, atol=2e-2)


def test_jacobian_analysis_and_plots(tmp_path):
    model = tiny_dit(8, 1)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    df, vecs = jacobian_analysis(model, images, [100, 700], top_k=4, chunk_size=64)
    assert len(df) == 2 * 2 * 64
    assert set(df.columns) >= {"image", "t", "rank", "eigenvalue", "asymmetry"}
    assert vecs.shape == (2, 2, 4, 1, 8, 8)
    for _, group in df.groupby(["image", "t"]):
        ev = group.sort_values("rank")["eigenvalue"].to_numpy()
        assert (ev[:-1] >= ev[1:]).all()
        assert group["asymmetry"].nunique() == 1 and group["asymmetry"].iloc[0] >= 0
    # eigenvectors are unit vectors
    torch.testing.assert_close(vecs.flatten(3).norm(dim=-1), torch.ones(2, 2, 4), rtol=1e-4, atol=1e-4)

    first = df[(df.image == 0) & (df.t == 100)].sort_values("rank")["eigenvalue"].to_numpy()[:4]
    fig = plot_eigenvectors(vecs[0, 0], first, path=tmp_path / "grey.png")
    assert (tmp_path / "grey.png").stat().st_size > 0
    assert len(fig.axes[0].patches) == 1  # one box for a grey eigenvector

    rgb = torch.randn(3, 3, 6, 6)
    fig = plot_eigenvectors(rgb, [3.0, 2.0, 1.0], ncols=3, path=tmp_path / "rgb.pdf")
    colours = [tuple(round(c, 3) for c in p.get_edgecolor()[:3]) for p in fig.axes[0].patches]
    assert colours == [(1.0, 0.0, 0.0), (0.0, 0.502, 0.0), (0.0, 0.0, 1.0)]
    assert (tmp_path / "rgb.pdf").stat().st_size > 0
    import matplotlib.pyplot as plt

    plt.close("all")
