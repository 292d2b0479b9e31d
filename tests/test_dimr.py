"""Tests for diffbias.models.dimr: the official two-branch DiMR (/2R), paper 002's DiMR baseline."""

import pytest
import torch
import torch.nn.functional as F

from diffbias.diffusion import create_diffusion
from diffbias.models import BACKBONES, PRESETS, build_model
from diffbias.models.dimr import (
    ConvNeXtBlock,
    PixelShuffleUpsample,
    TDLayerNorm,
    TDRMSNorm,
    TimeDependentParameter,
    TransformerBlock,
    time_condition,
)
from diffbias.train import diffusion_loss

H, C = 16, 1


def tiny(num_classes=0, learn_sigma=True, seed=0):
    torch.manual_seed(seed)
    return build_model(preset="DiMR-T/2R", input_size=H, in_channels=C, num_classes=num_classes, learn_sigma=learn_sigma)


def inputs(num_classes=0, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, C, H, H, generator=g)
    t = torch.tensor([0, 999, 500, 37][:batch])
    y = torch.randint(0, num_classes, (batch,), generator=g) if num_classes else None
    return x, t, y


def perturb(module, scale=0.05):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


# ---------------------------------------------------------------------------------------------- structure


def test_registry():
    assert BACKBONES["dimr"].zero_output_at_init is False
    assert PRESETS["DiMR-T/2R"].tiny and PRESETS["DiMR-T/2R"].backbone == "dimr"
    ref = PRESETS["DiMR-XL/2R"].reference
    assert ref["params"] == 505e6 and ref["gflops"] == 160.0 and ref["convention"] == "diffbias"
    seed = [r for r in PRESETS["DiMR-XL/2R"].references() if r["source"] == "paper 002 table 2"]
    assert seed and seed[0]["params"] == 107_452_688 and seed[0]["reproducible"] is False


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_shapes_and_stage_outputs(num_classes, learn_sigma):
    model = tiny(num_classes, learn_sigma)
    x, t, y = inputs(num_classes)
    outs = model.stage_outputs(x, t, y)
    assert [o.shape for o in outs] == [(2, 2 * C if learn_sigma else C, H, H), (2, C, H // 2, H // 2)]
    torch.testing.assert_close(model(x, t, y), outs[0])
    assert all(torch.isfinite(o).all() for o in outs)


def test_two_branches_follow_the_official_config():
    model = tiny(num_classes=10)
    low, high = model.branches
    assert low.kind == "transformer" and high.kind == "convnext"
    assert low.input_conv.kernel_size == (2, 2) and low.input_conv.stride == (2, 2)  # 2x2 patchify
    assert high.input_conv.kernel_size == (1, 1)
    assert len(low.blocks) == 5 and len(low.skip_denses) == 2
    assert len(high.blocks) == 5 and len(high.skip_denses) == 2  # depth 4 -> 4 // 2 * 2 + 1 blocks (blocks.py)
    assert low.class_embeds.num_embeddings == 11 and high.class_embeds is None
    assert low.pos_embed.shape == (64, 64) and high.pos_embed.shape == (256, 32)
    # every intermediate feature of the Transformer branch (input + 5 blocks) goes up: 6 x 64 channels
    assert low.feature_dim == 6 * 64 and high.up.kernel.in_features == 384 and high.up.kernel.out_features == 4 * 32
    assert isinstance(low.blocks[0], TransformerBlock) and isinstance(high.blocks[0], ConvNeXtBlock)
    assert high.blocks[0].dwconv.kernel_size == (7, 7) and high.blocks[0].dwconv.groups == 32
    assert low.out_conv.kernel_size == (3, 3) and high.out_conv.kernel_size == (3, 3)
    attn = low.blocks[0].block1
    assert attn.query_key_value.bias is None and attn.dense.bias is not None


def test_low_resolution_branch_feeds_the_full_resolution_output():
    model = perturb(tiny(num_classes=10))
    x, t, y = inputs(10)
    base = model(x, t, y)
    with torch.no_grad():
        model.branches[0].blocks[1].block2.w2.bias.add_(0.5)  # a mid feature of the Transformer branch
    assert not torch.allclose(model(x, t, y), base)


def test_class_token_and_null_label():
    model = perturb(tiny(num_classes=10))
    x, t, _ = inputs()
    a = model(x, t, torch.tensor([1, 2]))
    b = model(x, t, torch.tensor([3, 2]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)
    torch.testing.assert_close(model(x, t, None), model(x, t, torch.tensor([10, 10])))


# ---------------------------------------------------------------------------------------------- time and norms


def test_time_dependent_parameter_formula():
    """sigmoid/kernel.py tdp_torch: p1 + sigmoid(tc (w + 1) + b) (p0 - p1), tc = log_snr / 4, log_snr = 8n/1000 - 4."""
    torch.manual_seed(0)
    tdp = perturb(TimeDependentParameter((5,), 1.0), 0.7)
    t = torch.tensor([0, 499, 999])
    tc = time_condition(t)
    torch.testing.assert_close(tc, torch.tensor([(8 * 1 / 1000 - 4) / 4, (8 * 500 / 1000 - 4) / 4, 1.0]))
    s = torch.sigmoid(tc[:, None] * (tdp.nodecay_weight + 1) + tdp.nodecay_bias)
    torch.testing.assert_close(tdp(tc), tdp.param1 + s * (tdp.param0 - tdp.param1))
    fresh = TimeDependentParameter((3,), 1.0)
    assert sum(p.numel() for p in fresh.parameters()) == 4 * 3  # 4 parameters per element
    torch.testing.assert_close(fresh(tc), torch.ones(3, 3))


def test_td_norms():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 6)
    tc = time_condition(torch.tensor([10, 900]))
    rms = perturb(TDRMSNorm(6), 0.3)
    scale = rms.scale(tc)[:, None, :]
    torch.testing.assert_close(rms(x, tc), x / (x.norm(dim=-1, keepdim=True) / 6 ** 0.5 + 1e-8) * scale)
    ln = perturb(TDLayerNorm(6), 0.3)
    expected = F.layer_norm(x, (6,), eps=1e-5) * ln.weight(tc)[:, None, :] + ln.bias(tc)[:, None, :]
    torch.testing.assert_close(ln(x, tc), expected)
    names = {n for n, _ in TDLayerNorm(4).named_parameters()}
    assert names == {f"{w}.{p}" for w in ("weight", "bias") for p in ("param0", "param1", "nodecay_weight", "nodecay_bias")}


def test_pixel_shuffle_layout():
    """blocks.py PixelShuffleUpsample: the features of token (i, j) fill the 2x2 patch row offset first."""
    up = PixelShuffleUpsample(3, 2, ratio=2)
    x = torch.randn(1, 2, 2, 3)
    out = up(x)
    k = up.kernel(x).view(1, 2, 2, 2, 2, 2)  # (B, H, W, dy, dx, C)
    assert out.shape == (1, 4, 4, 2)
    for i in range(2):
        for j in range(2):
            for dy in range(2):
                for dx in range(2):
                    torch.testing.assert_close(out[0, 2 * i + dy, 2 * j + dx], k[0, i, j, dy, dx])


# ---------------------------------------------------------------------------------------------- loss


def test_stage_targets_and_weighted_loss():
    """sde.py even_multi_scale_targets(scale_correction=True): 2x2 sums of eps divided by 2; coefficients 1/4 (16x16)
    and 1 (32x32) from the official config, here in stage order (1, 0.25)."""
    model = perturb(tiny())
    assert model.stage_scales == (1, 2) and model.stage_loss_weights == (1.0, 0.25)
    eps = torch.randn(2, C, H, H)
    full, low = model.stage_targets(eps)
    torch.testing.assert_close(full, eps)
    sums = eps.unfold(2, 2, 2).unfold(3, 2, 2).sum((-1, -2))
    torch.testing.assert_close(low, sums / 2)
    x, t, _ = inputs()
    terms = diffusion_loss(model, create_diffusion(None), x, t, eps)
    out_low = model.stage_outputs(diffusion_q_sample(x, t, eps), t)[1]
    expected = 0.25 * (out_low - low).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(terms["stage_mse"], expected)


def diffusion_q_sample(x0, t, eps):
    return create_diffusion(None).q_sample(x0, t, noise=eps)


def test_no_weight_decay_on_the_sigmoid_weights():
    from diffbias.train import param_groups

    model = tiny()
    groups = param_groups(model, lr=1e-4, weight_decay=0.03)
    nodecay = {id(p) for p in groups[1]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in nodecay}
    assert names and all(n.endswith(("nodecay_weight", "nodecay_bias")) for n in names)
    assert groups[1]["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------------- counts


def _official_xl_params(out_channels=4):
    """Closed form of configs/DiMR-XL-2R_imagenet256.py with blocks.py (TD params: 4 per element)."""
    D, Hd, n, skips = 960, 1920, 39, 19
    tdrms, tdln = 4 * D, 8 * D
    block = tdrms + D * 3 * D + (D * D + D) + tdrms + 2 * (D * Hd + Hd) + (Hd * D + D)
    low = (4 * D * 4 + D) + 256 * D + 1001 * D + n * block + skips * (2 * D * D + D) + tdln + (D * 4 * 9 + 4)
    d, h, m, s = 480, 960, 21, 10
    feat = 40 * D
    block = (49 * d + d) + 4 * d + 2 * (d * h + h) + (h * d + d)
    high = (4 * d + d) + 1024 * d + 8 * feat + (feat * 4 * d + 4 * d) + 8 * d + m * block + s * (2 * d * d + d)
    high += 8 * d + (d * out_channels * 9 + out_channels)
    return low + high


@pytest.fixture(scope="module")
def xl():
    from diffbias.metrics.flops import model_summary

    return model_summary("DiMR-XL/2R")


def test_xl_reproduces_the_official_readme(xl):
    """README: DiMR-XL/2R 505M parameters, 160 GFLOPs (fvcore MACs with attention matmuls) at 32x32x4 latents."""
    assert _official_xl_params() == 505_046_408
    assert xl["params"] == _official_xl_params(out_channels=8) == 505_063_692  # learned sigma: 2C-channel head
    assert abs(xl["params"] / 505e6 - 1) <= 1e-2 and abs(xl["params_rel_err"]) <= 1e-2
    assert abs(xl["gflops"] / 160 - 1) <= 1e-2 and abs(xl["gflops_rel_err"]) <= 1e-2
    # attention matmuls: 39 blocks x 2 x 257^2 tokens (class token + 16x16) x 960
    assert xl["by_operator"]["scaled_dot_product_attention"] == 39 * 2 * 257 ** 2 * 960
    seed = [r for r in xl["published"] if r["source"] == "paper 002 table 2"][0]
    assert seed["reproducible"] is False and seed["ours_params"] != seed["params"]


def test_g_reproduces_the_official_readme():
    from diffbias.metrics.flops import model_summary

    g = model_summary("DiMR-G/2R")
    assert abs(g["params"] / 1.06e9 - 1) <= 1e-2 and abs(g["gflops"] / 331 - 1) <= 1e-2
