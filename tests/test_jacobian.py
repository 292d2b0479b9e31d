import math

import pytest
import torch
import torch.nn as nn

from diffbias.diffusion import create_diffusion
from diffbias.metrics.jacobian import (
    block_lanczos,
    denoiser_jacobian,
    eigendecompose,
    jacobian_analysis,
    lanczos_eigenpairs,
    noisy_input,
    plot_eigenvectors,
    symmetric_jacobian_operator,
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


# ---------------------------------------------------------------- matrix-free top-k (no D x D Jacobian built)


def test_block_lanczos_finds_top_eigenpairs_of_an_explicit_matrix():
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([5.0, 4.0, 3.5, 3.0, 2.9]), torch.linspace(2.0, -3.0, 195)]).double()
    A = Q @ torch.diag(spectrum) @ Q.T
    out = block_lanczos(lambda X: A @ X, 200, 5, block_size=4, max_products=200, tol=1e-8)
    assert out["converged"] and out["products"] < 200
    torch.testing.assert_close(out["eigenvalues"], spectrum[:5])
    cos = (out["eigenvectors"].T @ Q[:, :5]).diagonal().abs()
    assert cos.min() > 1 - 1e-8
    torch.testing.assert_close(out["eigenvectors"].T @ out["eigenvectors"], torch.eye(5, dtype=torch.float64))


def test_symmetric_operator_gives_jv_and_jtv():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(18, 18, generator=g) * 0.3
    op = symmetric_jacobian_operator(LinearEps(A, SHAPE), torch.zeros(SHAPE), T)
    V = torch.randn(18, 3, generator=g, dtype=torch.float64)
    jv, jtv = op(V)
    Jc = closed_form(A, T)
    torch.testing.assert_close(jv, Jc @ V, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jtv, Jc.T @ V, rtol=1e-5, atol=1e-5)


def test_forward_mode_products_through_global_and_local_attention():
    # forward-mode AD through fused attention needs the math backend, local windows their own kernels
    model = tiny_dit(8, 1, attention="3,G,G,G,G,G")
    x0 = torch.rand(1, 8, 8) * 2 - 1
    J = denoiser_jacobian(model, x0, 300).double()
    V = torch.randn(64, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    jv, jtv = symmetric_jacobian_operator(model, x0, 300)(V)
    torch.testing.assert_close(jv, J @ V, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(jtv, J.T @ V, rtol=1e-4, atol=1e-4)


def test_lanczos_matches_the_full_jacobian_on_a_tiny_dit():
    """The reference: the same top eigenvectors (up to sign) as eigh of the full Jacobian, in fewer products."""
    model = tiny_dit(16, 1)  # D = 256
    x0 = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    full = eigendecompose(denoiser_jacobian(model, x0, 250))
    out = lanczos_eigenpairs(model, x0, 250, k=4, block_size=8, max_products=256, tol=1e-4)
    assert out["converged"] and out["products"] < 256
    torch.testing.assert_close(out["eigenvalues"], full["eigenvalues"][:4], rtol=1e-4, atol=1e-4)
    cos = (out["eigenvectors"].T @ full["eigenvectors"][:, :4]).diagonal().abs()
    assert cos.min() > 0.995, cos
    # the Hutchinson-style asymmetry from the start block is close to the exact one
    assert out["asymmetry"] == pytest.approx(full["asymmetry"], rel=0.15)


def test_jacobian_analysis_lanczos_and_auto():
    model = tiny_dit(8, 1)
    images = torch.rand(1, 1, 8, 8) * 2 - 1
    auto, _ = jacobian_analysis(model, images, [250], top_k=3)  # D = 64: auto = full, all eigenvalues
    assert len(auto) == 64 and set(auto["method"]) == {"full"} and (auto["products"] == 64).all()
    lz, vecs = jacobian_analysis(model, images, [250], top_k=3, method="lanczos", tol=1e-5)
    assert len(lz) == 3 and set(lz["method"]) == {"lanczos"} and (lz["residual"] < 1e-5).all()
    assert vecs.shape == (1, 1, 3, 1, 8, 8)
    np_full = auto.sort_values("rank")["eigenvalue"].to_numpy()[:3]
    assert lz.sort_values("rank")["eigenvalue"].to_numpy() == pytest.approx(np_full, abs=1e-4)
    with pytest.raises(ValueError, match="unknown method"):
        jacobian_analysis(model, images, [250], method="power")


def test_forward_mode_pass_avoids_flex_attention():
    """FlexAttention (the CUDA local-attention path) rejects dual tensors: the forward-mode pass uses the
    dense kernel instead (same values). Checked on CPU, where flex runs eagerly."""
    import torch.autograd.forward_ad as fwAD

    from diffbias.metrics.jacobian import _forward_mode_attention

    flex = tiny_dit(8, 1, attention="3,G,G,G,G,G", attention_impl="flex")
    dense = tiny_dit(8, 1, attention="3,G,G,G,G,G", attention_impl="dense")
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    v = torch.randn(2, 1, 8, 8)
    t = torch.full((2,), 300)
    with torch.no_grad(), _forward_mode_attention(), fwAD.dual_level():
        out = flex(fwAD.make_dual(x, v), t)
        tangent = fwAD.unpack_dual(out).tangent
    with torch.no_grad(), _forward_mode_attention(), fwAD.dual_level():
        expected = fwAD.unpack_dual(dense(fwAD.make_dual(x, v), t)).tangent
    torch.testing.assert_close(tangent, expected, rtol=1e-4, atol=1e-5)
