"""DICE (Denoising Cascade, paper 002) and its "w/o hands, time-dependent norms" cascade ablation.

DICE (paper 002 section 3, constants from the authors' public code)
-----------------------------------------------------------------
The paper states the stages (1x, 1/2, 1/4 resolution; widths 1x, 2x, 3x a base of 1152; 6, 2, 1 blocks),
the block (ConvNeXt with a duplicated 7x7 depthwise conv, the "hands", joined by the signal function),
adaLN-Zero conditioning and N(0, 0.02) init, but not the MLP ratio, norms, stems or heads. Those come from
the authors' DeltaConvNeXt block (github Aveygo/DeltaConvNeXt ``arch.py``) and their DiT fork
(Aveygo/DiNext ``archs/scratch.py``, ``test.py``: trainable-parameter count); with them DICE-XL has
exactly the paper's 178,425,240 trainable parameters (tests/test_dice.py):

* block (``DiceBlock``): hands l, r = two depthwise 7x7 convs with bias (``arch.py`` DualHead) ->
  signal function -> affine LayerNorm (eps 1e-6, ``arch.py`` norm2) -> adaLN modulate -> Linear(C, 2C)
  (MLP ratio 2, ``arch.py`` pwconv1) -> GELU -> GRN(2C) (ConvNeXt-V2, ``arch.py`` GRN) -> Linear(2C, C)
  -> per-channel layer scale -> adaLN gate -> residual. adaLN-Zero: SiLU -> Linear(1152, 3C) with bias
  (shift, scale, gate; one branch per block, so 3 chunks, not DiT's 6).
* signal function (paper section 3.2, figure 5): f(l, r) = (l + r) / (1 + exp(lambda (l - r)^2)) with a
  per-channel lambda initialised to 1 (``arch.py`` ``scaling`` starts at 1). The sources disagree with the
  paper and with each other: ``arch.py`` computes (l + r) / (1 + exp((l - r)^2) * lambda) (lambda outside
  the exponent, one scalar) and its README writes 2 (l + r) / (1 + exp(lambda (l - r)^2)); we follow the
  paper's formula. lambda and the layer scale are per channel: the published count needs 2C parameters per
  block beyond the layers listed, which they give exactly (``arch.py``'s scalar lambda plus its defined but
  unused channels-first ``norm1`` would give one more per block: 178,425,249).
* conditioning (``scratch.py``): DiT's timestep embedder 256 -> 1152 -> 1152 and a 1001 x 1152 label
  table (null row), summed, shared by all stages (cond width 1152 at every stage).
* stages: a 1x1 conv stem from the 4 input channels and a 1x1 conv head to 8 channels (eps and the
  variance value v, learned sigma) in every stage, no adaLN final layer (``scratch.py``'s ``head``/``tail``
  are 1x1 convs).
* cascade (paper sections 2 and 3.1), coarse to fine: the coarsest stage sees ``avg_pool(x, 4)``; a finer
  stage sees the 4-channel denoised estimate ``x_s - sigma_t * up2(eps_hat_coarser)`` (``x_s =
  avg_pool(x, s)``, ``sigma_t = sqrt(1 - abar_t)`` of the linear schedule, nearest-neighbour upsampling:
  the paper warns against interpolated residuals). Only the full-resolution output is the model output.
  The coarser stages' v channels exist (the published count has 8-channel heads in every stage) but feed
  nothing. The paper "avoids additional loss functions" (section 3.1): ``stage_loss_weights = (1, 0, 0)``.
* init (paper section 3.3): N(0, 0.02) for convs, linears and the label table, zero biases; adaLN and
  heads zero-initialised (DiT's adaLN-Zero, so the output is exactly 0 at init); GRN gamma, beta = 0
  (ConvNeXt-V2); layer scale 1 (ConvNeXt's 1e-6 times the zero adaLN gate would stall both).
* ``hands=False`` ("DICE w/o hands"): one depthwise conv, no signal function and no lambda; same widths.

Counts (``scripts/preset_counts.py``): DICE-XL 178,425,240 parameters; 47.49 GMACs under the paper's
convention (fvcore without handles: the signal function costs 0) and 47.55 with this project's signal
function handle (7 ops per element); 1.05 G torchinfo mult-adds (the paper's "Mult-Adds": convs x output
positions, linears once per image). See ``diffbias.metrics.flops.CONVENTIONS``.

DICE w/o hands, time-dependent norms ("dice_tdn", presets DICE-TDN-*)
----------------------------------------------------------------------
The harness's earlier "DiMR-like" cascade, kept as an ablation under an honest name (the official DiMR
is ``models/dimr.py``): DICE's three stages, widths and depths, no hands and no adaLN; time enters only
through time-dependent LayerNorms (TD-LN, ``p(t) = p1 + sigmoid(w logSNR_t / 4 + b) (p0 - p1)`` for the
norm's weight and bias, w and b scalars per norm); blocks are depthwise 7x7 (residual) then a gated MLP
(ratio 4, residual); features pass from a coarse stage to the next finer one by 1x1 conv +
PixelShuffle(2), added to the finer stage's 3x3 stem; every stage has its own head and equal per-stage
losses (our choice); the label is a channel bias on the coarsest stage's stem.

FLOPs: the signal function runs as the custom operator ``diffbias::dice_signal`` whenever the model is
being traced (fvcore) or ``signal_op_mode()`` is on; its handle counts 7 element-wise operations per
output element: l - r, square, * lambda, exp, 1 +, l + r, divide.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..diffusion import linear_betas
from .layers import LabelEmbedder, TimestepEmbedder
from .registry import register_backbone, register_preset

# ----------------------------------------------------------------------------------------------------
# Signal function (paper 002, section 3.2) and its counting operator
# ----------------------------------------------------------------------------------------------------

SIGNAL_OPS_PER_ELEMENT = 7  # l - r, square, * lambda, exp, 1 +, l + r, divide
USE_SIGNAL_OP = False


@contextlib.contextmanager
def signal_op_mode(enabled: bool = True) -> Iterator[None]:
    """Run the signal function as ``diffbias::dice_signal`` (it always does under tracing)."""
    global USE_SIGNAL_OP
    previous, USE_SIGNAL_OP = USE_SIGNAL_OP, enabled
    try:
        yield
    finally:
        USE_SIGNAL_OP = previous


def _signal_eager(left: torch.Tensor, right: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    # 1 / (1 + exp(z)) == sigmoid(-z): the same value without overflow for large lambda (l - r)^2.
    return (left + right) * torch.sigmoid(-lam * (left - right).square())


@torch.library.custom_op("diffbias::dice_signal", mutates_args=())
def _dice_signal_op(left: torch.Tensor, right: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return _signal_eager(left, right, lam)


@_dice_signal_op.register_fake
def _(left, right, lam):
    return torch.empty_like(left)


def _signal_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _signal_backward(ctx, grad):
    left, right, lam = ctx.saved_tensors
    diff = left - right
    d2 = diff.square()
    s = torch.sigmoid(-lam * d2)
    # f = (l + r) s(z), z = lam d^2, ds/dz = -s (1 - s)
    dz = -grad * (left + right) * s * (1 - s)
    cross = dz * lam * 2 * diff
    g_lam = (dz * d2).sum_to_size(lam.shape).to(lam.dtype)
    return grad * s + cross, grad * s - cross, g_lam


_dice_signal_op.register_autograd(_signal_backward, setup_context=_signal_setup_context)


def dice_signal(left: torch.Tensor, right: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """f(l, r) = (l + r) / (1 + exp(lam (l - r)^2)), element-wise; lam broadcasts (a scalar per block)."""
    if USE_SIGNAL_OP or torch.jit.is_tracing():
        return torch.ops.diffbias.dice_signal(left, right, lam)
    return _signal_eager(left, right, lam)


def _dice_signal_flop_handle(inputs, outputs) -> int:
    """MACs of diffbias::dice_signal: SIGNAL_OPS_PER_ELEMENT per output element (declared by DICE.flop_handles)."""
    return SIGNAL_OPS_PER_ELEMENT * math.prod(outputs[0].type().sizes())

# ----------------------------------------------------------------------------------------------------
# Shared cascade helpers
# ----------------------------------------------------------------------------------------------------

STAGE_SCALES = (1, 2, 4)  # downsampling factor of each stage; index 0 = full resolution


def _schedule_buffers(module: nn.Module) -> None:
    """sigma_t = sqrt(1 - abar_t) and logSNR_t = log(abar_t / (1 - abar_t)) of the linear schedule
    (betas 1e-4 .. 0.02 over 1000 steps, ``diffusion.linear_betas``), indexed by the integer t."""
    abar = torch.from_numpy(linear_betas(1000)).neg_().add_(1).cumprod(0)
    module.register_buffer("sigma_t", (1 - abar).sqrt().float(), persistent=False)
    module.register_buffer("log_snr_t", (abar.log() - (-abar).log1p()).float(), persistent=False)


def stage_targets(target: torch.Tensor, scales: Sequence[int] = STAGE_SCALES) -> list[torch.Tensor]:
    """Per-stage targets: the eps target average-pooled to each stage's resolution (stage order)."""
    return [target if s == 1 else F.avg_pool2d(target, s) for s in scales]


def _check_stages(input_size: int, width_mults: Sequence[int], depths: Sequence[int]) -> None:
    if len(width_mults) != len(STAGE_SCALES) or len(depths) != len(STAGE_SCALES):
        raise ValueError(f"need {len(STAGE_SCALES)} width_mults and depths (stage order 1x, 1/2, 1/4)")
    if input_size % STAGE_SCALES[-1]:
        raise ValueError(f"input_size {input_size} must be divisible by {STAGE_SCALES[-1]}")


def _normal_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


# ----------------------------------------------------------------------------------------------------
# DICE
# ----------------------------------------------------------------------------------------------------


class GRN(nn.Module):
    """ConvNeXt-V2 global response normalisation, channels-last (Aveygo/DeltaConvNeXt ``arch.py`` GRN):
    x + gamma (x N(x)) + beta, N(x) = ||x||_HW / (mean_C ||x||_HW + 1e-6); gamma, beta start at 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return x + self.gamma * (x * nx) + self.beta


class DiceBlock(nn.Module):
    """DeltaConvNeXt block with adaLN-Zero (channels-first in and out); see the module docstring."""

    def __init__(self, dim: int, cond_dim: int, mlp_ratio: float = 2.0, hands: bool = True,
                 lambda_init: float = 1.0, kernel_size: int = 7):
        super().__init__()
        self.hands = hands

        def dw() -> nn.Conv2d:
            return nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

        if hands:
            self.dwconv_l, self.dwconv_r = dw(), dw()
            # one lambda per channel (paper 002 sec. 3.2 leaves the shape open; the published count needs it)
            self.hands_lambda = nn.Parameter(torch.full((dim, 1, 1), float(lambda_init)))
        else:
            self.dwconv = dw()
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # affine (arch.py norm2)
        hidden = int(dim * mlp_ratio)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden)
        self.pwconv2 = nn.Linear(hidden, dim)
        self.layer_scale = nn.Parameter(torch.ones(dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 3 * dim))

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        if self.hands:
            return dice_signal(self.dwconv_l(x), self.dwconv_r(x), self.hands_lambda)
        return self.dwconv(x)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(c)[:, None, None, :].chunk(3, dim=-1)
        h = self.norm(self.mix(x).permute(0, 2, 3, 1)) * (1 + scale) + shift
        h = self.pwconv2(self.grn(self.act(self.pwconv1(h))))
        return x + (gate * self.layer_scale * h).permute(0, 3, 1, 2)


class DiceStage(nn.Module):
    """1x1 conv stem -> DICE blocks -> 1x1 conv head (Aveygo/DiNext ``archs/scratch.py`` head/tail)."""

    def __init__(self, in_channels: int, dim: int, depth: int, cond_dim: int, out_channels: int, **block_kw):
        super().__init__()
        self.dim = dim
        self.stem = nn.Conv2d(in_channels, dim, 1)
        self.blocks = nn.ModuleList(DiceBlock(dim, cond_dim, **block_kw) for _ in range(depth))
        self.head = nn.Conv2d(dim, out_channels, 1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, c)
        return self.head(h)


@register_backbone("dice")
class DICE(nn.Module):
    """Denoising cascade of DeltaConvNeXt stages with adaLN-Zero (paper 002); see the module docstring."""
    # capabilities (docs/model-contract.md, diffbias.measurements)
    records_attention = False
    has_signal_function = True  # its blocks join two hands with the signal function (unless hands=False)
    # what its custom operator costs (collected by diffbias.metrics.flops.flop_handles)
    flop_handles = {"diffbias::dice_signal": _dice_signal_flop_handle}

    zero_output_at_init = True
    stage_scales = STAGE_SCALES
    rehearsal_options = {"width": 16}  # rehearsal (config.apply_rehearsal): tiny width, same depths
    # Per-stage loss weights in stage order (1x, 1/2, 1/4) on eps vs ``stage_targets``: only the final
    # output is trained, the paper "avoids additional loss functions" (section 3.1).
    stage_loss_weights = (1.0, 0.0, 0.0)

    def __init__(self, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000, learn_sigma: bool = True,
                 width: int = 1152, width_mults: Sequence[int] = (1, 2, 3), depths: Sequence[int] = (6, 2, 1),
                 cond_dim: int | None = None, mlp_ratio: float = 2.0, hands: bool = True,
                 hands_lambda_init: float = 1.0, kernel_size: int = 7):
        super().__init__()
        _check_stages(input_size, width_mults, depths)
        self.in_channels, self.num_classes, self.learn_sigma = in_channels, num_classes, learn_sigma
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.hands = hands
        cond_dim = cond_dim or width
        self.t_embedder = TimestepEmbedder(cond_dim)
        self.y_embedder = LabelEmbedder(num_classes, cond_dim) if num_classes > 0 else None
        # every stage: in_channels in (the coarsest the pooled input, the others a denoised estimate),
        # out_channels out (eps and v): DiNext-style 1x1 stem and head
        self.stages = nn.ModuleList(
            DiceStage(in_channels, width * m, d, cond_dim, self.out_channels,
                      mlp_ratio=mlp_ratio, hands=hands, lambda_init=hands_lambda_init, kernel_size=kernel_size)
            for m, d in zip(width_mults, depths)
        )
        _schedule_buffers(self)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        _normal_init(self)  # paper 002 section 3.3: N(0, 0.02) for convs and linears
        for stage in self.stages:  # adaLN-Zero (DiT): blocks start as identities, outputs at 0
            for block in stage.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(stage.head.weight)
            nn.init.zeros_(stage.head.bias)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes)  # the null label
            c = c + self.y_embedder(y)
        return c

    def stage_outputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every stage's prediction, stage order (1x, 1/2, 1/4): (B, out_channels, H/s, W/s)."""
        c = self.condition(t, y)
        sigma = self.sigma_t[t].to(x.dtype).view(-1, 1, 1, 1)
        C = self.in_channels
        outputs: list[torch.Tensor | None] = [None] * len(self.stages)
        coarser = None
        for i in reversed(range(len(self.stages))):  # coarse to fine (paper 002 sections 2, 3.1)
            s = self.stage_scales[i]
            xs = x if s == 1 else F.avg_pool2d(x, s)
            if coarser is not None:
                # section 3.1: the coarser stage's noise prediction, upsampled, denoises this stage's input
                xs = xs - sigma * _up2(coarser[:, :C])
            coarser = outputs[i] = self.stages[i](xs, c)
        return outputs

    def stage_targets(self, target: torch.Tensor) -> list[torch.Tensor]:
        return stage_targets(target, self.stage_scales)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.stage_outputs(x, t, y)[0]


# ----------------------------------------------------------------------------------------------------
# DICE w/o hands, time-dependent norms (the former "DiMR-like" cascade)
# ----------------------------------------------------------------------------------------------------


class TDLayerNorm(nn.Module):
    """Time-dependent LayerNorm over the last dim: weight and bias p(t) = p1 + a(t) (p0 - p1),
    a(t) = sigmoid(w logSNR_t / 4 + b); p0 is approached at high SNR (small t), p1 at low SNR."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight0, self.weight1 = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.bias0, self.bias1 = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.w, self.b = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(0.0))

    def interpolation(self, log_snr: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.w * log_snr / 4 + self.b)

    def forward(self, x: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        a = self.interpolation(log_snr).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        weight = self.weight1 + a * (self.weight0 - self.weight1)
        bias = self.bias1 + a * (self.bias0 - self.bias1)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * weight + bias


class TdnBlock(nn.Module):
    """TD-LN -> depthwise 7x7 (residual); TD-LN -> gated MLP (residual). Channels-first in and out."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, kernel_size: int = 7):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = TDLayerNorm(dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm2 = TDLayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        x = x + self.dwconv(self.norm1(x.permute(0, 2, 3, 1), log_snr).permute(0, 3, 1, 2))
        value, gate = self.fc1(self.norm2(x.permute(0, 2, 3, 1), log_snr)).chunk(2, dim=-1)
        return x + self.fc2(value * F.gelu(gate)).permute(0, 3, 1, 2)


class TdnStage(nn.Module):
    def __init__(self, in_channels: int, dim: int, depth: int, out_channels: int, coarser_dim: int | None,
                 mlp_ratio: float, kernel_size: int):
        super().__init__()
        self.dim = dim
        self.stem = nn.Conv2d(in_channels, dim, 3, padding=1)
        # features of the coarser stage, 1x1 conv to 4 dim then PixelShuffle(2) to this resolution
        self.up = None if coarser_dim is None else nn.Sequential(nn.Conv2d(coarser_dim, 4 * dim, 1), nn.PixelShuffle(2))
        self.blocks = nn.ModuleList(TdnBlock(dim, mlp_ratio, kernel_size) for _ in range(depth))
        self.head_norm = TDLayerNorm(dim)
        self.head = nn.Conv2d(dim, out_channels, 1)

    def forward(self, x, log_snr, coarser_features=None, bias=None):
        h = self.stem(x)
        if coarser_features is not None:
            h = h + self.up(coarser_features)
        if bias is not None:
            h = h + bias[:, :, None, None]
        for block in self.blocks:
            h = block(h, log_snr)
        return self.head(self.head_norm(h.permute(0, 2, 3, 1), log_snr).permute(0, 3, 1, 2)), h


@register_backbone("dice_tdn")
class DiceTDN(nn.Module):
    """DICE w/o hands, time-dependent norms: DICE's three-stage cascade with time only through TD-LN, a gated
    MLP and PixelShuffle feature passing between stages (the harness's former "DiMR-like" model)."""
    # capabilities (docs/model-contract.md, diffbias.measurements)
    records_attention = False

    zero_output_at_init = False
    stage_scales = STAGE_SCALES
    rehearsal_options = {"width": 16}  # rehearsal (config.apply_rehearsal): tiny width, same depths
    stage_loss_weights = (1.0, 1.0, 1.0)  # stage order (1x, 1/2, 1/4); equal weights, our choice

    def __init__(self, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000, learn_sigma: bool = True,
                 width: int = 1152, width_mults: Sequence[int] = (1, 2, 3), depths: Sequence[int] = (6, 2, 1),
                 mlp_ratio: float = 4.0, kernel_size: int = 7):
        super().__init__()
        _check_stages(input_size, width_mults, depths)
        self.in_channels, self.num_classes, self.learn_sigma = in_channels, num_classes, learn_sigma
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        dims = [width * m for m in width_mults]
        self.stages = nn.ModuleList(
            TdnStage(in_channels, dims[i], depths[i], self.out_channels,
                     dims[i + 1] if i + 1 < len(dims) else None, mlp_ratio, kernel_size)
            for i in range(len(dims))
        )
        # the label as a channel bias on the coarsest stage's stem (no transformer token to carry it)
        self.y_embedder = LabelEmbedder(num_classes, dims[-1]) if num_classes > 0 else None
        _schedule_buffers(self)
        _normal_init(self)

    def stage_outputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every stage's prediction, stage order (1x, 1/2, 1/4): (B, out_channels, H/s, W/s)."""
        log_snr = self.log_snr_t[t]
        bias = None
        if self.y_embedder is not None:
            bias = self.y_embedder(torch.full_like(t, self.num_classes) if y is None else y)
        outputs: list[torch.Tensor | None] = [None] * len(self.stages)
        features = None
        for i in reversed(range(len(self.stages))):  # coarse to fine
            s = self.stage_scales[i]
            xs = x if s == 1 else F.avg_pool2d(x, s)
            outputs[i], features = self.stages[i](xs, log_snr, features, bias if features is None else None)
        return outputs

    def stage_targets(self, target: torch.Tensor) -> list[torch.Tensor]:
        return stage_targets(target, self.stage_scales)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.stage_outputs(x, t, y)[0]


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------

# CPU presets for 16x16x1 (stages at 16, 8, 4): base width 32, the paper's 6:2:1 depths kept.
register_preset("DICE-T", "dice", tiny=True, width=32, depths=(6, 2, 1))
register_preset("DICE-T-nohands", "dice", tiny=True, width=32, depths=(6, 2, 1), hands=False)
register_preset("DICE-TDN-T", "dice_tdn", tiny=True, width=32, depths=(6, 2, 1))

# Paper presets (ImageNet 256, latents 32x32x4, 1000 classes). Paper 002 table 2 for DICE: 178,425,240
# trainable parameters (exact, tested), 47.49 "GFlops" = fvcore without handles (the signal function is
# element-wise and costs 0; 47.55 with our handle) and 1.05 G torchinfo "Mult-Adds".
_SEED_002 = {"input": (4, 32), "num_classes": 1000, "source": "paper 002 table 2"}
register_preset("DICE-XL", "dice", width=1152, depths=(6, 2, 1),
                reference={"params": 178_425_240, "gflops": 47.49, "mult_adds": 1.05,
                           "convention": "fvcore-as-shipped", **_SEED_002})
# Ablations at DICE-XL's widths and depths, counted at the same input; no published counts.
_INPUT_002 = {"input": (4, 32), "num_classes": 1000}
register_preset("DICE-XL-nohands", "dice", width=1152, depths=(6, 2, 1), hands=False, reference=_INPUT_002)
register_preset("DICE-TDN-XL", "dice_tdn", width=1152, depths=(6, 2, 1), reference=_INPUT_002)
