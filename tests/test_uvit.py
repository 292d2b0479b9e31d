"""U-ViT backbone with GMM-S options (paper 000): shapes, Gaussian mixture masks, FreeU-style scaling."""

from __future__ import annotations

import math

import pytest
import torch

from diffbias.models.attention import flop_counting
from diffbias.models import PRESETS, build_model
from diffbias.models import uvit
from diffbias.models.uvit import (
    UViTAttention,
    backbone_scale,
    fourier_lowfreq_scale,
    freeu_scaling,
    gmm_mask,
    grid_sq_distances,
)


def tiny(gmm: bool = False, num_classes: int = 0, **kw):
    torch.manual_seed(0)
    name = "UViT-T/2-GMM" if gmm else "UViT-T/2"
    return build_model(preset=name, options=kw, input_size=16, in_channels=1, num_classes=num_classes)


def inputs(B: int = 2, num_classes: int = 0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1, 16, 16, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, num_classes, (B,), generator=g) if num_classes else None
    return x, t, y


def test_presets_registered():
    assert PRESETS["UViT-T/2"].tiny and PRESETS["UViT-T/2-GMM"].tiny
    assert PRESETS["UViT-S/2"].options == dict(patch_size=2, embed_dim=512, depth=12, num_heads=8)
    assert PRESETS["UViT-S/2-GMM"].options["gmm"] is True


@pytest.mark.parametrize("gmm", [False, True])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_shape(gmm, num_classes):
    model = tiny(gmm, num_classes)
    x, t, y = inputs(2, num_classes)
    out = model(x, t, y)
    assert out.shape == (2, 2, 16, 16)
    assert torch.isfinite(out).all()
    assert model.extras == (2 if num_classes else 1)
    assert len(model.in_blocks) == len(model.out_blocks) == 2  # depth 4: 2 + 1 + 2 blocks


def test_output_shape_without_learned_sigma():
    model = build_model(preset="UViT-T/2", input_size=16, in_channels=3, learn_sigma=False)
    assert model(torch.randn(1, 3, 16, 16), torch.tensor([5])).shape == (1, 3, 16, 16)


def test_gmm_mask_matches_algorithm_1_double_loop():
    torch.manual_seed(3)
    heads, K, grid, eps = 2, 5, 4, 1e-5
    sigma = torch.randn(heads, K) * 10 + 10
    alpha = torch.randn(heads, K) * 2
    mask = gmm_mask(alpha, sigma, grid_sq_distances(grid), eps)
    N = grid * grid
    root = int(math.isqrt(N))
    brute = torch.zeros(heads, N, N, dtype=torch.float64)
    for h in range(heads):
        for i in range(N):
            for j in range(N):
                dx = i % root - j % root
                dy = i // root - j // root
                for k in range(K):
                    s = float(sigma[h, k])
                    brute[h, i, j] += float(alpha[h, k]) * math.exp(-(dx * dx + dy * dy) / (2 * s * s + eps))
    torch.testing.assert_close(mask.double(), brute, rtol=1e-5, atol=1e-5)


def _explicit_gmm_attention(attn: UViTAttention, x: torch.Tensor, extras: int) -> torch.Tensor:
    B, L, D = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).view(B, L, 3, h, D // h).permute(2, 0, 3, 1, 4)
    M = torch.ones(h, L, L)
    M[:, extras:, extras:] = gmm_mask(attn.gmm_alpha, attn.gmm_sigma, attn.gmm_dist2)
    a = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(D // h) * M, dim=-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(B, L, D))


def test_mask_multiplies_scaled_logits_and_extra_tokens_are_unmasked():
    torch.manual_seed(4)
    attn = UViTAttention(16, 2, gmm=True, grid=3)
    x = torch.randn(2, 2 + 9, 16)  # 2 extra tokens + 3x3 patches
    want = _explicit_gmm_attention(attn, x, extras=2)
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)
    with flop_counting():  # the custom op used for FLOP counting computes the same thing
        torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)


def test_gmm_finite_at_32x32_grid_with_small_sigmas():
    torch.manual_seed(5)
    attn = UViTAttention(8, 2, gmm=True, grid=32)
    with torch.no_grad():
        attn.gmm_sigma.copy_(torch.tensor([[1e-4, 1e-2, 0.3, 1.0, 40.0], [0.0, 5e-3, 0.1, 2.0, -3.0]]))
        attn.gmm_alpha.copy_(torch.tensor([[3.0, -2.0, 1.0, 0.5, -1.0], [-4.0, 2.0, 1.0, -0.5, 1.0]]))
    mask = attn.gmm_mask()
    assert torch.isfinite(mask).all()
    # diagonal: d = 0 gives exp(0) = 1 for every kernel; far pairs keep only the wide kernels
    torch.testing.assert_close(mask[:, 0, 0], attn.gmm_alpha.detach().sum(1))
    x = torch.randn(1, 1 + 32 * 32, 8, requires_grad=True)
    out = attn(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    for p in (x, attn.gmm_alpha, attn.gmm_sigma):
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("gmm", [False, True])
def test_recorded_attention_rows_sum_to_one(gmm):
    model = tiny(gmm, num_classes=10).eval()
    x, t, y = inputs(2, 10)
    with torch.no_grad():
        plain = model(x, t, y)
        for _, blk in model.named_blocks():
            blk.attn.record_attention = True
        recorded = model(x, t, y)
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)  # recording path == fused path
    for _, blk in model.named_blocks():
        a = blk.attn.attention_map
        assert a.shape == (2, 2, 2 + 64, 2 + 64)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 66))


def test_gradients_reach_alpha_and_sigma_and_masks_exported():
    model = tiny(gmm=True)
    x, t, _ = inputs(2)
    model(x, t).square().mean().backward()
    for _, blk in model.named_blocks():
        for p in (blk.attn.gmm_alpha, blk.attn.gmm_sigma):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    masks = model.gmm_masks()
    assert list(masks) == ["in.0", "in.1", "mid", "out.0", "out.1"]
    assert all(m.shape == (2, 64, 64) for m in masks.values())


def test_gmm_flop_handle_counts_matmuls_and_mask():
    fvcore = pytest.importorskip("fvcore.nn")
    from diffbias.metrics.flops import flop_handles

    model = tiny(gmm=True).eval()
    x, t, _ = inputs(1)
    with flop_counting():
        fa = fvcore.FlopCountAnalysis(model, (x, t))
        fa.set_op_handle(**flop_handles())
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        counted = fa.by_operator()["gmm_attention"]
    B, h, L, N, d, K, blocks = 1, 2, 65, 64, 32, 5, 5
    assert counted == blocks * (2 * B * h * L * L * d + K * h * N * N + B * h * L * L)


def test_freeu_identity_at_b1_s1():
    model = tiny(gmm=False).eval()
    x, t, _ = inputs(2)
    with torch.no_grad():
        ref = model(x, t)
        with freeu_scaling(model, b=1.0, s=1.0, tau=1):
            same = model(x, t)
        with freeu_scaling(model, b=1.4, s=0.6):
            changed = model(x, t)
        after = model(x, t)
    assert torch.equal(same, ref) and torch.equal(after, ref)
    assert not torch.allclose(changed, ref)
    assert (model.freeu_b, model.freeu_s) == (1.0, 1.0)  # restored
    h = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(fourier_lowfreq_scale(h, 1.0), h, rtol=1e-5, atol=1e-5)
    tok = torch.randn(2, 64, 4)
    assert torch.equal(backbone_scale(tok, 1.0), tok)


def test_freeu_skip_filter_scales_dc_by_s_and_keeps_high_frequencies():
    const = torch.full((2, 3, 8, 8), 1.7)
    torch.testing.assert_close(fourier_lowfreq_scale(const, 0.25, tau=1), const * 0.25)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2.0 - 1.0  # Nyquist frequency
    checker = checker.expand(1, 1, 8, 8)
    torch.testing.assert_close(fourier_lowfreq_scale(checker, 0.25, tau=1), checker, rtol=1e-5, atol=1e-5)


def test_freeu_backbone_scaling_and_extra_tokens_untouched():
    tok = torch.randn(3, 16, 5)
    out = backbone_scale(tok, 1.5)
    mean = tok.mean(-1)
    lo, hi = mean.argmin(1), mean.argmax(1)
    for i in range(3):  # alpha = 1 at the min-mean token, b at the max-mean token
        torch.testing.assert_close(out[i, lo[i]], tok[i, lo[i]])
        torch.testing.assert_close(out[i, hi[i]], 1.5 * tok[i, hi[i]])
    model = tiny(num_classes=10)
    x, skip = torch.randn(2, 2 + 64, 64), torch.randn(2, 2 + 64, 64)
    x2, skip2 = model._freeu(x, skip, b=1.6, s=0.3)
    assert torch.equal(x2[:, :2], x[:, :2]) and torch.equal(skip2[:, :2], skip[:, :2])
    assert not torch.allclose(x2[:, 2:], x[:, 2:]) and not torch.allclose(skip2[:, 2:], skip[:, 2:])


def test_gmm_mask_summary_table_and_centre_maps():
    from diffbias.metrics.gmm_masks import gmm_mask_summary, plot_gmm_masks

    torch.manual_seed(0)
    model = build_model(preset="UViT-T/2-GMM", input_size=16, in_channels=1, num_classes=0)
    df, maps = gmm_mask_summary(model)
    masks = model.gmm_masks()
    blocks = dict(model.named_blocks())
    heads, kernels = next(iter(blocks.values())).attn.gmm_alpha.shape
    assert list(maps) == list(masks) and len(df) == len(masks) * heads * kernels
    g = model.grid
    centre = (g // 2) * g + g // 2
    for name, mask in masks.items():
        torch.testing.assert_close(torch.from_numpy(maps[name]), mask[:, centre].reshape(heads, g, g))
        row = df[(df["block"] == name) & (df["head"] == 1) & (df["kernel"] == 2)].iloc[0]
        assert row["alpha"] == pytest.approx(float(blocks[name].attn.gmm_alpha[1, 2]))
        assert row["mask_at_0"] == pytest.approx(float(mask[1, centre, centre]))
    fig = plot_gmm_masks(maps, "test")
    assert len(fig.axes) >= len(maps) * heads
    plain, none = gmm_mask_summary(build_model(preset="UViT-T/2", input_size=16, in_channels=1, num_classes=0))
    assert plain.empty and none == {}
