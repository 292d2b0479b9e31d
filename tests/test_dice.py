"""Tests for diffbias.models.dice: DICE (paper 002), its no-hands ablation and the DICE-TDN cascade ablation."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from diffbias.metrics.flops import flop_handles
from diffbias.models import BACKBONES, PRESETS, build_model
from diffbias.models.dice import (
    SIGNAL_OPS_PER_ELEMENT,
    DiceBlock,
    TDLayerNorm,
    dice_signal,
    signal_op_mode,
)

H, C = 16, 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread when the cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(preset, num_classes=0, learn_sigma=True, **options):
    torch.manual_seed(0)
    return build_model(preset=preset, options=options, input_size=H, in_channels=C, num_classes=num_classes,
                       learn_sigma=learn_sigma)


def inputs(batch=2, num_classes=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, H, H, generator=g)
    t = torch.tensor([0, 999, 500, 37][:batch])
    y = torch.randint(0, num_classes, (batch,), generator=g) if num_classes else None
    return x, t, y


def perturb(model, scale=0.05):
    """Move every parameter off its (zero / symmetric) initial value."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def reference_signal(l, r, lam):
    return (l + r) / (1 + torch.exp(lam * (l - r) ** 2))


# ---------------------------------------------------------------------------------------------- registry


def test_registered_backbones_and_presets():
    assert BACKBONES["dice"].zero_output_at_init is True
    assert BACKBONES["dice_tdn"].zero_output_at_init is False
    for name in ("DICE-T", "DICE-T-nohands", "DICE-TDN-T"):
        assert PRESETS[name].tiny
    assert PRESETS["DICE-T-nohands"].options["hands"] is False
    ref = PRESETS["DICE-XL"].reference
    assert ref["params"] == 178_425_240 and ref["gflops"] == 47.49 and ref["mult_adds"] == 1.05
    assert ref["convention"] == "fvcore-as-shipped"
    assert "DiMR-T" not in PRESETS  # renamed: the three-stage cascade is DICE-TDN, the official DiMR is models/dimr.py


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dice_shape_and_zero_output_at_init(num_classes, learn_sigma):
    model = tiny("DICE-T", num_classes=num_classes, learn_sigma=learn_sigma)
    x, t, y = inputs(num_classes=num_classes)
    out = model(x, t, y)
    assert out.shape == (2, 2 * C if learn_sigma else C, H, H)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("num_classes", [0, 10])
def test_tdn_shape(num_classes):
    model = tiny("DICE-TDN-T", num_classes=num_classes)
    x, t, y = inputs(num_classes=num_classes)
    out = model(x, t, y)
    assert out.shape == (2, 2 * C, H, H) and torch.isfinite(out).all()
    assert [o.shape[-1] for o in model.stage_outputs(x, t, y)] == [16, 8, 4]


# ---------------------------------------------------------------------------------------------- signal function


def test_signal_function_formula_and_op():
    g = torch.Generator().manual_seed(0)
    l, r = torch.randn(3, 5, generator=g) * 2, torch.randn(3, 5, generator=g) * 2
    for lam in (0.0, 0.3, 1.0, 4.0):
        lam = torch.tensor(lam)
        expected = reference_signal(l, r, lam)
        torch.testing.assert_close(dice_signal(l, r, lam), expected)
        with signal_op_mode():
            torch.testing.assert_close(dice_signal(l, r, lam), expected)
    # lambda = 0 averages the hands; equal hands give (l + r) / 2 for any lambda
    torch.testing.assert_close(dice_signal(l, r, torch.tensor(0.0)), (l + r) / 2)
    torch.testing.assert_close(dice_signal(l, l, torch.tensor(3.0)), l)
    # no overflow where exp(lambda d^2) is infinite
    big = dice_signal(torch.tensor([100.0]), torch.tensor([-90.0]), torch.tensor(10.0))
    assert torch.isfinite(big).all() and big.abs().item() < 1e-6


def test_signal_op_gradients_match_autograd_and_reach_lambda():
    g = torch.Generator().manual_seed(1)
    l = torch.randn(2, 3, 4, dtype=torch.double, generator=g, requires_grad=True)
    r = torch.randn(2, 3, 4, dtype=torch.double, generator=g, requires_grad=True)
    lam = torch.tensor(0.7, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: torch.ops.diffbias.dice_signal(a, b, c), (l, r, lam))
    w = torch.randn(2, 3, 4, dtype=torch.double, generator=g)
    grads_ref = torch.autograd.grad((reference_signal(l, r, lam) * w).sum(), (l, r, lam))
    with signal_op_mode():
        grads_op = torch.autograd.grad((dice_signal(l, r, lam) * w).sum(), (l, r, lam))
    for a, b in zip(grads_op, grads_ref):
        torch.testing.assert_close(a, b)
    assert grads_op[2].abs() > 0


def test_block_lambda_gets_gradient():
    torch.manual_seed(0)
    block = DiceBlock(8, cond_dim=8)
    assert block.hands_lambda.shape == (8, 1, 1) and torch.all(block.hands_lambda == 1.0)  # one per channel
    assert block.layer_scale.shape == (8,) and torch.all(block.layer_scale == 1.0)
    perturb(block, 0.3)
    out = block(torch.randn(2, 8, 6, 6), torch.randn(2, 8))
    out.square().sum().backward()
    assert block.hands_lambda.grad is not None and (block.hands_lambda.grad.abs().flatten() > 0).all()


def test_block_layers_follow_delta_convnext():
    """Aveygo/DeltaConvNeXt arch.py: two 7x7 depthwise hands with bias, affine LayerNorm, MLP ratio 2 with GRN;
    adaLN-Zero with 3 chunks (shift, scale, gate) from the 1152-wide condition."""
    block = DiceBlock(16, cond_dim=24)
    for conv in (block.dwconv_l, block.dwconv_r):
        assert conv.kernel_size == (7, 7) and conv.groups == 16 and conv.bias is not None
    assert block.norm.elementwise_affine and block.norm.eps == 1e-6
    assert (block.pwconv1.in_features, block.pwconv1.out_features) == (16, 32)
    assert (block.pwconv2.in_features, block.pwconv2.out_features) == (32, 16)
    assert block.grn.gamma.shape == (32,) and block.grn.beta.shape == (32,)
    lin = block.adaLN_modulation[-1]
    assert (lin.in_features, lin.out_features) == (24, 48) and lin.bias is not None
    # GRN (ConvNeXt-V2): x + gamma * (x * N(x)) + beta with N = ||x||_HW / mean_C ||x||_HW
    torch.manual_seed(1)
    grn = perturb(block.grn, 0.5)
    x = torch.randn(2, 3, 4, 32)
    gx = x.pow(2).sum((1, 2), keepdim=True).sqrt()
    expected = grn.gamma * (x * gx / (gx.mean(-1, keepdim=True) + 1e-6)) + grn.beta + x
    torch.testing.assert_close(grn(x), expected)


def test_no_hands_path():
    hands, plain = tiny("DICE-T"), tiny("DICE-T-nohands")
    names = dict(plain.named_parameters())
    assert not any("hands_lambda" in n or "dwconv_r" in n for n in names)
    assert sum(p.numel() for p in hands.parameters()) > sum(p.numel() for p in plain.parameters())
    x, t, _ = inputs()
    assert torch.equal(plain(x, t), torch.zeros(2, 2 * C, H, H))
    out = perturb(plain)(x, t)
    assert out.shape == (2, 2 * C, H, H) and out.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- cascade


def test_dice_stage_resolutions_and_widths():
    model = perturb(tiny("DICE-T"))
    dims = [stage.dim for stage in model.stages]
    assert dims == [32, 64, 96]  # 1x, 2x, 3x the base width at 1x, 1/2, 1/4 resolution
    assert [len(stage.blocks) for stage in model.stages] == [6, 2, 1]
    for stage in model.stages:  # DiNext-style 1x1 stem from C channels and 1x1 head to 2C (eps, v); no final adaLN
        assert stage.stem.kernel_size == (1, 1) and stage.stem.in_channels == C
        assert stage.head.kernel_size == (1, 1) and stage.head.out_channels == 2 * C
        assert not hasattr(stage, "final_layer")
    seen = {}
    hooks = [s.blocks[-1].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.shape))
             for i, s in enumerate(model.stages)]
    x, t, _ = inputs()
    outs = model.stage_outputs(x, t)
    for h in hooks:
        h.remove()
    assert seen == {0: (2, 32, 16, 16), 1: (2, 64, 8, 8), 2: (2, 96, 4, 4)}
    assert [o.shape for o in outs] == [(2, 2 * C, 16, 16), (2, 2 * C, 8, 8), (2, 2 * C, 4, 4)]
    torch.testing.assert_close(model(x, t), outs[0])
    assert [tt.shape for tt in model.stage_targets(torch.randn(2, C, H, H))] == [(2, C, 16, 16), (2, C, 8, 8), (2, C, 4, 4)]


def test_dice_cascade_denoises_next_input():
    """Section 3.1: a stage's eps prediction, upsampled and scaled by sigma_t, is removed from the next input;
    a finer stage sees only that C-channel denoised estimate (no concat with the noisy input)."""
    model = perturb(tiny("DICE-T"))
    stem_inputs = {}
    hooks = [s.stem.register_forward_hook(lambda m, a, o, i=i: stem_inputs.__setitem__(i, a[0]))
             for i, s in enumerate(model.stages)]
    x, t, _ = inputs()
    outs = model.stage_outputs(x, t)
    for h in hooks:
        h.remove()
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    sigma = torch.tensor(np.sqrt(1 - abar[t.numpy()]), dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(stem_inputs[2], F.avg_pool2d(x, 4))
    for i, s in ((1, 2), (0, 1)):
        xs = F.avg_pool2d(x, s) if s > 1 else x
        up = outs[i + 1][:, :C].repeat_interleave(2, -1).repeat_interleave(2, -2)
        assert stem_inputs[i].shape[1] == C
        torch.testing.assert_close(stem_inputs[i], xs - sigma * up)
    assert model.stage_loss_weights == (1.0, 0.0, 0.0)  # section 3.1: no additional losses


def test_tdn_features_pass_up_by_pixel_shuffle():
    model = tiny("DICE-TDN-T", num_classes=10)
    assert [s.dim for s in model.stages] == [32, 64, 96] and model.stages[2].up is None
    assert isinstance(model.stages[0].up[1], torch.nn.PixelShuffle) and model.stages[0].up[0].in_channels == 64
    x, t, y = inputs(num_classes=10)
    base = model(x, t, y)
    with torch.no_grad():
        model.stages[2].blocks[0].fc2.bias.add_(1.0)  # coarsest features reach the full-resolution output
    assert not torch.allclose(model(x, t, y), base)
    assert len(model.stage_loss_weights) == 3


# ---------------------------------------------------------------------------------------------- TD-LN


def test_tdln_interpolation_formula_and_log_snr():
    torch.manual_seed(0)
    norm = perturb(TDLayerNorm(6), 0.5)
    with torch.no_grad():
        norm.w.fill_(0.8), norm.b.fill_(-0.3)
    model = tiny("DICE-TDN-T")
    t = torch.tensor([0, 250, 999])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    log_snr = torch.tensor(np.log(abar / (1 - abar))[t.numpy()], dtype=torch.float32)
    torch.testing.assert_close(model.log_snr_t[t], log_snr)
    x = torch.randn(3, 4, 4, 6)
    a = torch.sigmoid(0.8 * log_snr / 4 - 0.3).view(-1, 1, 1, 1)
    weight = norm.weight1 + a * (norm.weight0 - norm.weight1)
    bias = norm.bias1 + a * (norm.bias0 - norm.bias1)
    xn = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x, log_snr), xn * weight + bias)
    # high SNR (t = 0) sits near p0, low SNR (t = 999) near p1
    assert a[0].item() > 0.8 and a[2].item() < 0.2


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("preset", ["DICE-T", "DICE-T-nohands", "DICE-TDN-T"])
def test_gradients_reach_every_parameter(preset):
    model = perturb(tiny(preset, num_classes=10))
    x, t, y = inputs(num_classes=10)
    if preset == "DICE-TDN-T":
        loss = sum(o.square().mean() for o in model.stage_outputs(x, t, y))
    else:
        loss = model(x, t, y).square().mean()  # DICE trains only the final output
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------- FLOPs


def test_flop_handle_counts_signal_function():
    from fvcore.nn import FlopCountAnalysis

    handles = flop_handles()
    assert handles["diffbias::dice_signal"] is BACKBONES["dice"].flop_handles["diffbias::dice_signal"]
    x, t, _ = inputs(batch=1)
    counts = {}
    for preset in ("DICE-T", "DICE-T-nohands"):
        model = tiny(preset).eval()
        flops = FlopCountAnalysis(model, (x, t)).set_op_handle(**handles)
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counts[preset] = flops.by_operator()
    # blocks: 6 at 32 x 16 x 16, 2 at 64 x 8 x 8, 1 at 96 x 4 x 4
    elements = 6 * 32 * 16 * 16 + 2 * 64 * 8 * 8 + 96 * 4 * 4
    assert counts["DICE-T"]["dice_signal"] == SIGNAL_OPS_PER_ELEMENT * elements == 7 * elements
    assert "dice_signal" not in counts["DICE-T-nohands"]
    # two hands double the depthwise-conv MACs
    assert counts["DICE-T"]["conv"] > counts["DICE-T-nohands"]["conv"]
    assert math.isclose(counts["DICE-T"]["linear"], counts["DICE-T-nohands"]["linear"])


# ---------------------------------------------------------------------------------------------- paper 002 counts


def _dice_closed_form_params(width=1152, mults=(1, 2, 3), depths=(6, 2, 1), cond=1152, C=4, classes=1000, hands=True):
    """DICE-XL's parameters in closed form: per block 2 hands (49C + C each) + C lambda, affine LN 2C, C->2C->C linears,
    GRN 4C, layer scale C, adaLN Linear(cond, 3C); per stage a 1x1 stem C_in->D and head D->2C_in;
    t-embedder 256->cond->cond and a (classes+1) x cond table."""
    total = (256 * cond + cond) + (cond * cond + cond) + (classes + 1) * cond
    for m, d in zip(mults, depths):
        D = width * m
        block = (2 * 50 * D + D if hands else 50 * D) + 2 * D + (2 * D * D + 2 * D) + 4 * D + (2 * D * D + D) + D
        block += cond * 3 * D + 3 * D
        total += d * block + (C * D + D) + (D * 2 * C + 2 * C)
    return total


@pytest.fixture(scope="module")
def dice_xl():
    from diffbias.metrics.flops import model_summary

    return model_summary("DICE-XL")


def test_dice_xl_reproduces_seed_002_parameters_exactly(dice_xl):
    assert dice_xl["params"] == 178_425_240 == _dice_closed_form_params()
    assert dice_xl["params_rel_err"] == 0


def test_dice_xl_reproduces_seed_002_gflops_in_its_convention(dice_xl):
    """Paper 002 table 2: 47.49 "GFlops" = fvcore MACs at 32x32x4 (batch 1, 1000 classes) without this project's
    handles, i.e. the element-wise signal function costs 0; 1.05 G "Mult-Adds" is torchinfo's count."""
    rows = {r["convention"]: r for r in dice_xl["published"]}
    seed = rows["fvcore-as-shipped"]
    assert seed["source"] == "paper 002 table 2" and seed["ours_params"] == 178_425_240
    assert abs(seed["ours_gflops"] / 47.49 - 1) <= 5e-3
    assert f"{seed['ours_gflops']:.2f}" == "47.49"  # to the printed digit
    assert abs(dice_xl["gflops_rel_err"]) <= 5e-3
    assert f"{seed['ours_mult_adds']:.2f}" == "1.05"
    # our own convention prices the signal function: 7 ops x every hands output element
    elements = 6 * 1152 * 32 * 32 + 2 * 2304 * 16 * 16 + 3456 * 8 * 8
    assert dice_xl["by_operator"]["dice_signal"] == 7 * elements
    assert dice_xl["macs"] - round(seed["ours_gflops"] * 1e9) == 7 * elements
    assert f"{dice_xl['gflops']:.2f}" == "47.55"


def test_dice_xl_nohands_keeps_the_widths():
    from diffbias.metrics.flops import build_for_counting, count_parameters

    kw = dict(input_size=32, in_channels=4, num_classes=1000)
    hands = build_for_counting(preset="DICE-XL", **kw)
    plain = build_for_counting(preset="DICE-XL-nohands", **kw)
    assert [s.dim for s in plain.stages] == [s.dim for s in hands.stages] == [1152, 2304, 3456]
    assert [len(s.blocks) for s in plain.stages] == [6, 2, 1]
    # one hand (50 D) and the per-channel lambda (D) fewer per block
    assert count_parameters(hands) - count_parameters(plain) == sum(51 * s.dim * len(s.blocks) for s in hands.stages)
    assert count_parameters(plain) == _dice_closed_form_params(hands=False)


def test_signal_function_measurement_on_a_trained_dice(tmp_path, tiny_dataset):
    """Paper 002 figs. 5-9: the learned lambdas of every block and one block's hand outputs on a held-out image;
    the joined features are the model's own signal function of the recorded hands."""
    import json

    from diffbias import measurements
    from diffbias.config import RunKey, run_spec, validate_config
    from diffbias.measure import measure

    measurements.load()  # the registry in BUILTIN order before a module is imported by name
    from diffbias.measurements.signal_function import signal
    from diffbias.train import Trainer

    cfg = validate_config({
        "datasets": {"tiny": {"source": "npz", "path": "unused.npz", "resolution": 16, "channels": 1, "test_size": 20}},
        "training": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "log_every": 1},
        "variants": {"dice": {"preset": "DICE-T"}}, "studies": {"s": {"dataset": "tiny", "variants": ["dice"], "N": [16]}}})
    out = tmp_path / "run"
    Trainer(run_spec(cfg, RunKey("tiny", "dice", 16, 0)), tiny_dataset, out, tmp_path / "ck.pt", device="cpu").run(progress=False)
    measure("signal_function", model=str(out / "model.pt"), data=str(tiny_dataset), out=str(tmp_path / "s.parquet"),
            arrays_out=str(tmp_path / "s.npz"), config=json.dumps({"channels": 2}), device="cpu")
    table = pd.read_parquet(tmp_path / "s.parquet")
    with np.load(tmp_path / "s.npz") as a:
        assert len(a["lambdas"]) == table["channels"].sum() and set(a["lambda_block"]) == set(table["block"])
        assert a["left"].shape == a["right"].shape == a["joined"].shape and a["left"].shape[0] == 2
        lam = a["block_lambdas"][:, None, None]
        np.testing.assert_allclose(a["joined"], signal(a["left"], a["right"], lam), rtol=1e-4, atol=1e-6)
