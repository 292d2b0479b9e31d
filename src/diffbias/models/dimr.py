"""DiMR (Liu et al. 2024, "Alleviating distortion in image generation via multi-resolution diffusion
models"), the two-branch "/2R" architecture of the official code (github qihao067/DiMR), paper 002's DiMR
baseline.

Constants and structure, checked against the official repository (paths relative to it):

* ``configs/DiMR-XL-2R_imagenet256.py``: two stages, low resolution first. Stage 1: a Transformer branch,
  dim 960, MLP hidden 1920, 16 heads, ``num_blocks`` 39, input Conv2d(4, 960, 2, stride 2) on the full
  32x32 latent (``image_input_ratio`` 1, ``input_feature_ratio`` 2: a 2x2 patchify to 16x16). Stage 2: a
  ConvNeXt branch at 32x32, dim 480, hidden 960, 7x7 depthwise, ``num_blocks`` 20, 1x1 input conv.
  ``final_kernel_size`` 3, dropout 0, ``norm_type`` "TDRMSN", ``num_classes`` 1001 (1000 + null),
  ``loss_coeffs`` [1/4, 1] (stage order: 16x16 output, then 32x32). DiMR-G/2R (``configs/DiMR-G-2R_...``):
  dims 1152/576, hidden 2304/1152, 57/29 blocks.
* ``libs/core/blocks.py`` ``Stage``: ``num_blocks // 2 * 2 + 1`` blocks (39 -> 39, 20 -> 21) in U-ViT
  order: in-blocks, a mid block, out-blocks each preceded by Linear(2 dim, dim) on concat(x, skip), skips
  popped last-in-first-out. Learned position embedding (``PositionEmbeddings``, max_height x max_width
  rows) after the input conv in both branches; the Transformer branch prepends a class token
  (``class_embeds``, Embedding(1001, dim)) and drops it before the output. Every intermediate feature
  (the input tokens, then every block's output: ``num_blocks // 2 * 2 + 2`` maps, 40 x 960 = 38,400
  channels for XL) is concatenated and passed up through TD-LayerNorm -> Linear(38400, 4 x 480) ->
  pixel shuffle by 2 (``PixelShuffleUpsample``: channels ordered (row offset, column offset, channel))
  -> TD-LayerNorm, added to the ConvNeXt branch's input tokens. Output layer: TD-LayerNorm -> 3x3 conv.
  ``TransformerBlock``: x + Attention(x), x + MLP(x); Attention = TD-RMSNorm -> qkv Linear without
  bias -> SDPA -> Linear; MLP = TD-RMSNorm -> w2(GELU(w0 x) * w1 x) (gated). ``ConvNeXtBlock``:
  x + dwconv7x7(x) (no norm), x + MLP(x).
* ``libs/core/sigmoid/module.py``: ``TimeDependentParameter`` p(t) = p1 + sigmoid(tc (w + 1) + b) (p0 - p1)
  with p0, p1, w (``nodecay_weight``), b (``nodecay_bias``): 4 parameters per element, p0 = p1 = the usual
  init (ones / zeros), w = b = 0; ``LayerNorm`` (eps 1e-5) has time-dependent weight and bias,
  ``TDRMSNorm`` a time-dependent scale: x / (||x||_2 / sqrt(d) + 1e-8) * scale(t). ``utils.py``: no
  weight decay on ``nodecay_*``.
* Time: ``train.py`` ``LSimple`` and ``eval.py`` feed ``log_snr = 8 n / 1000 - 4`` for the timestep
  n in {1..1000} (a linear time feature named log_snr) and ``seed_time`` uses tc = log_snr / 4; time enters
  only through these norms. Our t in [0, 1000) is their n - 1, so tc = 2 (t + 1) / 1000 - 1.
* Loss (``train.py`` ``LSimple``, ``sde.py`` ``even_multi_scale_targets`` with ``scale_correction``): the
  16x16 prediction is trained against the 2x2 sum of eps divided by 2 (= 2 avg_pool(eps, 2), unit
  variance), weight 1/4; the 32x32 one against eps, weight 1. Here: ``stage_loss_weights = (1, 0.25)`` in
  stage order (index 0 = full resolution) and ``stage_targets``; the training loop adds the weighted
  low-resolution MSE to the full-resolution hybrid loss.
* Init (``libs/core/common_layers.py``): Linear and Embedding trunc_normal(std 0.02), zero biases; the
  convolutions keep PyTorch's default init; not zero at init.

Departures (this harness's contract): the full-resolution head outputs 2C channels (eps and the variance
value v, learned sigma) where the official has C (+17,284 parameters for XL: 505,063,692 vs 505,046,408);
the 16x16 head outputs eps only, as the official. Unconditional models (num_classes = 0) have no class
token. Counts (``scripts/preset_counts.py``, tests/test_dimr.py): DiMR-XL/2R 505.06M parameters and
160.23 GFLOPs against the README's 505M / 160 (fvcore MACs with the attention matmuls); DiMR-G/2R
1.056B / 331.18 against 1.06B / 331. Paper 002's DiMR numbers (107,452,688 / 32.68 GFlops / 1.31 G
mult-adds) match no configuration of this code: shown beside ours, not tested.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import RecordsAttention
from .registry import register_backbone, register_preset


def _trunc_normal(module: nn.Module) -> None:
    """common_layers.py: Linear/Embedding weights trunc_normal(std 0.02), biases 0; convs keep the default."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def time_condition(t: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
    """tc = log_snr / 4 with the official ``log_snr = 8 n / T - 4``, n = t + 1 (train.py LSimple)."""
    return (8.0 * (t.float() + 1) / num_timesteps - 4.0) / 4.0


class TimeDependentParameter(nn.Module):
    """p(tc) = p1 + sigmoid(tc (w + 1) + b) (p0 - p1), per element (sigmoid/module.py, kernel.py tdp_torch)."""

    def __init__(self, shape: Sequence[int], fill: float):
        super().__init__()
        self.param0 = nn.Parameter(torch.full(tuple(shape), float(fill)))
        self.param1 = nn.Parameter(torch.full(tuple(shape), float(fill)))
        self.nodecay_weight = nn.Parameter(torch.zeros(tuple(shape)))
        self.nodecay_bias = nn.Parameter(torch.zeros(tuple(shape)))

    def forward(self, tc: torch.Tensor) -> torch.Tensor:  # tc (B,) -> (B, *shape)
        tc = tc.view(-1, *([1] * self.param0.dim()))
        s = torch.sigmoid(tc * (self.nodecay_weight + 1) + self.nodecay_bias)
        return self.param1 + s * (self.param0 - self.param1)


def _per_sample(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, 1, ..., 1, C) broadcasting over x's middle dims."""
    return p.view(p.shape[0], *([1] * (x.dim() - 2)), p.shape[-1]).to(x.dtype)


class TDLayerNorm(nn.Module):
    """LayerNorm over the last dim with time-dependent weight (init 1) and bias (init 0), eps 1e-5."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = TimeDependentParameter((dim,), 1.0)
        self.bias = TimeDependentParameter((dim,), 0.0)

    def forward(self, x: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.dim,), eps=self.eps)
        return x * _per_sample(self.weight(tc), x) + _per_sample(self.bias(tc), x)


class TDRMSNorm(nn.Module):
    """x / (||x||_2 / sqrt(d) + 1e-8) * scale(t), scale time-dependent (init 1), no bias (TDRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.scale = TimeDependentParameter((dim,), 1.0)

    def forward(self, x: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        rms = torch.linalg.vector_norm(x, ord=2, dim=-1, keepdim=True) * self.dim ** -0.5
        return x / (rms + self.eps) * _per_sample(self.scale(tc), x)


class GatedMLP(nn.Module):
    """TD-RMSNorm -> w2(GELU(w0 x) * w1 x) (blocks.py MLPBlock)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = TDRMSNorm(dim)
        self.w0, self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        x = self.norm(x, tc)
        return self.w2(F.gelu(self.w0(x)) * self.w1(x))


class SelfAttention(RecordsAttention, nn.Module):
    """TD-RMSNorm -> qkv (no bias) -> softmax attention -> Linear (blocks.py SelfAttention, APE variant)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = TDRMSNorm(dim)
        self.query_key_value = nn.Linear(dim, 3 * dim, bias=False)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.query_key_value(self.norm(x, tc))
        q, k, v = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.record_attention:
            attn = torch.softmax((q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
            self.attention_map = attn.detach()
            out = (attn @ v.float()).to(v.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.dense(out.transpose(1, 2).reshape(B, N, C))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, num_heads: int):
        super().__init__()
        self.block1 = SelfAttention(dim, num_heads)
        self.block2 = GatedMLP(dim, hidden)

    def forward(self, x: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        x = x + self.block1(x, tc)
        return x + self.block2(x, tc)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel_size: int = 7):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.block2 = GatedMLP(dim, hidden)

    def forward(self, x: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.block2(x, tc)


class PixelShuffleUpsample(nn.Module):
    """Linear(d_in, r^2 d_out), then each token becomes an r x r patch; features ordered (row offset,
    column offset, channel) as blocks.py PixelShuffleUpsample (channels-last)."""

    def __init__(self, dim_in: int, dim_out: int, ratio: int = 2):
        super().__init__()
        self.ratio = ratio
        self.kernel = nn.Linear(dim_in, dim_out * ratio * ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C_in) -> (B, rH, rW, C_out)
        x = self.kernel(x)
        B, H, W, C = x.shape
        r = self.ratio
        x = x.view(B, H, W, r, r, C // (r * r)).transpose(2, 3)
        return x.reshape(B, H * r, W * r, C // (r * r))


class DimrStage(nn.Module):
    """One branch: patchify conv + learned position embedding (+ class token), U-ViT-style long skips,
    every intermediate feature returned for the next branch, TD-LN + conv output layer."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, dim: int, hidden: int, num_blocks: int,
                 grid: int, patch: int, num_heads: int = 1, kernel_size: int = 7, final_kernel_size: int = 3,
                 num_classes: int = 0, lowres_dim: int | None = None, lowres_ratio: int = 2):
        super().__init__()
        self.kind, self.dim, self.grid = kind, dim, grid
        self.input_conv = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # class token: Transformer branch only (blocks.py Stage.class_embeds); num_classes + 1 rows (null label)
        self.class_embeds = nn.Embedding(num_classes + 1, dim) if kind == "transformer" and num_classes > 0 else None
        if lowres_dim is not None:
            self.up_norm_in = TDLayerNorm(lowres_dim)
            self.up = PixelShuffleUpsample(lowres_dim, dim, lowres_ratio)
            self.up_norm_out = TDLayerNorm(dim)
        else:
            self.up = None
        n = num_blocks // 2 * 2 + 1  # blocks.py: num_blocks // 2 in, 1 mid, num_blocks // 2 out
        if kind == "transformer":
            self.blocks = nn.ModuleList(TransformerBlock(dim, hidden, num_heads) for _ in range(n))
        elif kind == "convnext":
            self.blocks = nn.ModuleList(ConvNeXtBlock(dim, hidden, kernel_size) for _ in range(n))
        else:
            raise ValueError(f"unknown DiMR branch {kind!r}")
        self.skip_denses = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(num_blocks // 2))
        self.out_norm = TDLayerNorm(dim)
        self.out_conv = nn.Conv2d(dim, out_channels, final_kernel_size, padding=final_kernel_size // 2)

    @property
    def feature_dim(self) -> int:
        """Channels of the concatenated intermediate features passed to the next branch."""
        return self.dim * (len(self.blocks) + 1)

    def forward(self, x: torch.Tensor, tc: torch.Tensor, lowres: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.input_conv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        B, H, W, C = h.shape
        h = h + self.pos_embed[: H * W].view(H, W, C)
        if lowres is not None:
            h = h + self.up_norm_out(self.up(self.up_norm_in(lowres, tc)), tc)
        extra = 0
        if self.kind == "transformer":
            h = h.reshape(B, H * W, C)
            if self.class_embeds is not None:
                h = torch.cat([self.class_embeds(y)[:, None, :], h], dim=1)
                extra = 1
        features = [h]
        n = len(self.blocks)
        skips = []
        for block in self.blocks[: n // 2]:
            h = block(h, tc)
            features.append(h)
            skips.append(h)
        h = self.blocks[n // 2](h, tc)
        features.append(h)
        for dense, block in zip(self.skip_denses, self.blocks[n // 2 + 1:]):
            h = block(dense(torch.cat([h, skips.pop()], dim=-1)), tc)
            features.append(h)
        if self.kind == "transformer":
            h = h[:, extra:].reshape(B, H, W, C)
            features = [f[:, extra:].reshape(B, H, W, C) for f in features]
        out = self.out_conv(self.out_norm(h, tc).permute(0, 3, 1, 2))
        return out, torch.cat(features, dim=-1)


@register_backbone("dimr")
class DiMR(nn.Module):
    """Official two-branch DiMR (/2R): a Transformer branch at 1/patch resolution, then a ConvNeXt branch at
    full resolution fed with all of the first branch's features; see the module docstring."""
    # capabilities (docs/model-contract.md, diffbias.measurements)
    records_attention = True

    zero_output_at_init = False
    stage_scales = (1, 2)  # stage order: index 0 = full resolution (ConvNeXt), 1 = 1/2 (Transformer)
    # configs/DiMR-XL-2R_imagenet256.py loss_coeffs [1/4, 1] are in the official order (16x16, 32x32).
    stage_loss_weights = (1.0, 0.25)
    no_weight_decay_keywords = ("nodecay_weight", "nodecay_bias")  # utils.py: no decay on them
    # rehearsal (config.apply_rehearsal): tiny widths, same depths per branch
    rehearsal_options = {"dims": (32, 16), "hidden_dims": (64, 32), "num_heads": 2}

    def __init__(self, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000, learn_sigma: bool = True,
                 dims: Sequence[int] = (960, 480), hidden_dims: Sequence[int] = (1920, 960),
                 depths: Sequence[int] = (39, 20), num_heads: int = 16, patch_size: int = 2, kernel_size: int = 7,
                 final_kernel_size: int = 3):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        if patch_size != self.stage_scales[1]:
            raise ValueError("the two-branch DiMR passes features up by a factor 2: patch_size must be 2")
        self.in_channels, self.num_classes, self.learn_sigma = in_channels, num_classes, learn_sigma
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        low = DimrStage("transformer", in_channels, in_channels, dims[0], hidden_dims[0], depths[0],
                        input_size // patch_size, patch_size, num_heads=num_heads,
                        final_kernel_size=final_kernel_size, num_classes=num_classes)
        high = DimrStage("convnext", in_channels, self.out_channels, dims[1], hidden_dims[1], depths[1],
                         input_size, 1, kernel_size=kernel_size, final_kernel_size=final_kernel_size,
                         lowres_dim=low.feature_dim, lowres_ratio=patch_size)
        self.branches = nn.ModuleList([low, high])  # official order: low resolution first
        _trunc_normal(self)

    def stage_outputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[(B, out_channels, H, W) full resolution, (B, C, H/2, W/2) eps at half resolution]."""
        tc = time_condition(t).to(x.dtype)
        if self.num_classes > 0 and y is None:
            y = torch.full_like(t, self.num_classes)  # the null label
        low, high = self.branches
        out_low, features = low(x, tc, y=y)
        out_high, _ = high(x, tc, lowres=features)
        return [out_high, out_low]

    def stage_targets(self, target: torch.Tensor) -> list[torch.Tensor]:
        """sde.py even_multi_scale_targets(scale_correction=True): the r x r sum of eps divided by r."""
        return [target if s == 1 else s * F.avg_pool2d(target, s) for s in self.stage_scales]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.stage_outputs(x, t, y)[0]


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------

# CPU preset for 16x16x1: Transformer branch on the 8x8 grid (width 64, 5 blocks), ConvNeXt branch at
# 16x16 (width 32, 4 -> 5 blocks); the /2R structure kept.
register_preset("DiMR-T/2R", "dimr", tiny=True, dims=(64, 32), hidden_dims=(128, 64), depths=(5, 4), num_heads=2)

# Official configs (ImageNet 256, latents 32x32x4, 1000 classes + null), README counts "505M / 160" and
# "1.06B / 331" (fvcore-style MACs with attention); our count adds the 2C-channel head (learned sigma).
_OFFICIAL = {"input": (4, 32), "num_classes": 1000, "source": "DiMR README (qihao067/DiMR)", "convention": "diffbias"}
# Paper 002 table 2's DiMR-XL/2R numbers: no configuration of the official code gives them.
_SEED_002_DIMR = {"source": "paper 002 table 2", "convention": "fvcore-as-shipped", "params": 107_452_688,
                  "gflops": 32.68, "mult_adds": 1.31, "reproducible": False,
                  "note": "matches no configuration of the official DiMR code"}
register_preset("DiMR-XL/2R", "dimr", dims=(960, 480), hidden_dims=(1920, 960), depths=(39, 20), num_heads=16,
                reference={"params": 505e6, "gflops": 160.0, **_OFFICIAL}, published=(_SEED_002_DIMR,))
register_preset("DiMR-G/2R", "dimr", dims=(1152, 576), hidden_dims=(2304, 1152), depths=(57, 29), num_heads=16,
                reference={"params": 1.06e9, "gflops": 331.0, **_OFFICIAL})
