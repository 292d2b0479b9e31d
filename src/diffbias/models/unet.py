"""The improved-diffusion UNet (Nichol & Dhariwal 2021), written from the facts in
``reference-implementations.md`` (openai/improved-diffusion ``unet.py`` / ``script_util.py``).

Layout::

    t -> sinusoid(model_channels) -> Linear -> SiLU -> Linear   (time embedding, 4 * model_channels)
         (+ label embedding, table of num_classes + 1 rows, when class-conditional)
    input blocks : conv3x3(C -> ch); per level num_res_blocks x [ResBlock (+ Attention)], then a stride-2
                   conv3x3 (all levels but the last); every block's output is kept as a skip
    middle       : ResBlock -> Attention -> ResBlock
    output blocks: per level (deepest first) num_res_blocks + 1 x [ResBlock(concat(h, skip)) (+ Attention)],
                   then nearest x2 + conv3x3 (all levels but the first)
    out          : GroupNorm -> SiLU -> zero-initialised conv3x3 (ch -> 2C with learned sigma): 0 at init

ResBlock: GN(32) -> SiLU -> conv3x3; the time embedding -> SiLU -> Linear gives (scale, shift) for
``GN(h) * (1 + scale) + shift`` (use_scale_shift_norm, default) or a bias; SiLU -> dropout -> zero-initialised
conv3x3; a 1x1 conv on the skip path when the width changes. Attention block: GN -> 1x1 qkv conv -> softmax
attention (q, k each scaled by d^-1/4, i.e. logits / sqrt(d)) -> zero-initialised 1x1 output conv, residual.

Attention resolutions are given as feature-map sizes (e.g. ``(16, 8)`` at 32x32 input) and converted to
downsample factors (``input_size // resolution``), as the official script does. The middle block always
has attention.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention_weights
from .layers import LabelEmbedder, RecordsAttention, timestep_embedding
from .registry import register_backbone, register_preset

# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups) computed in float32 (as the official ``normalization``)."""

    def __init__(self, channels: int, groups: int = 32):
        if channels % groups:
            raise ValueError(f"GroupNorm({groups}) needs a channel count divisible by {groups}, got {channels}")
        super().__init__(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """A block whose forward also takes the (time + label) embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Halve the resolution: stride-2 conv3x3 (conv_resample) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then conv3x3 (conv_resample)."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(TimestepBlock):
    def __init__(
        self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.channels, self.out_channels, self.use_scale_shift_norm = channels, out_channels, use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module, RecordsAttention):
    """Spatial self-attention with a residual: GN -> 1x1 qkv -> softmax attention -> zero-init 1x1 proj.

    The qkv channels are laid out head by head (q, k, v of head 0, then head 1, ...), as the official
    block reshapes them. The official code scales q and k by d^-1/4 each and takes the softmax in
    float32; fused scaled-dot-product attention with its default 1/sqrt(d) scale is the same map (its
    kernels accumulate the softmax in float32).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"{channels} channels are not divisible by {num_heads} heads")
        self.channels, self.num_heads = channels, num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        L, h = H * W, self.num_heads
        qkv = self.qkv(self.norm(x.reshape(B, C, L)))  # (B, 3C, L)
        q, k, v = qkv.reshape(B, h, 3 * C // h, L).transpose(-1, -2).chunk(3, dim=-1)  # (B, h, L, d) each
        if self.record_attention:
            self.attention_map = attention_weights(q, k).detach()
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, d)
        out = out.transpose(-1, -2).reshape(B, C, L)
        return x + self.proj_out(out).reshape(B, C, H, W)


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


def parse_resolutions(value: str | int | Sequence[int] | None) -> tuple[int, ...]:
    """``"16,8"`` / ``16`` / ``(16, 8)`` -> (16, 8); None or "" -> ()."""
    if value is None or value == "":
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    return tuple(int(v) for v in value)


@register_backbone("unet")
class UNet(nn.Module):
    # capabilities (docs/model-contract.md, diffbias.measurements)
    records_attention = True
    zero_output_at_init = True
    # rehearsal (config.apply_rehearsal): GroupNorm(32)'s smallest width, same levels and res blocks
    rehearsal_options = {"model_channels": 32}

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int = 0,
        learn_sigma: bool = True,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: str | int | Sequence[int] | None = (16, 8),
        dropout: float = 0.0,
        conv_resample: bool = True,
        num_heads: int = 4,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = True,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in (channel_mult.split(",") if isinstance(channel_mult, str) else channel_mult))
        levels = len(channel_mult)
        if input_size % 2 ** (levels - 1):
            raise ValueError(f"input size {input_size} is not divisible by 2^{levels - 1} ({levels} levels)")
        resolutions = parse_resolutions(attention_resolutions)
        level_sizes = [input_size // 2**i for i in range(levels)]
        for r in resolutions:
            if r not in level_sizes:
                raise ValueError(f"attention resolution {r} is not one of the UNet's feature sizes {level_sizes}")
        self.attention_ds = {input_size // r for r in resolutions}  # downsample factors, as the official script
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.in_channels, self.model_channels, self.num_classes = in_channels, model_channels, num_classes
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_res_blocks, self.channel_mult = num_res_blocks, channel_mult
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = LabelEmbedder(num_classes, emb_dim) if num_classes > 0 else None

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels)

        ch = model_channels
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch, conv_resample)))
                skip_channels.append(ch)
                ds *= 2
        self.skip_channels = tuple(skip_channels)

        self.middle_block = TimestepSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_ds:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        assert not skip_channels

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.label_emb is not None:
            if y is None:
                raise ValueError("class-conditional UNet needs labels y")
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------

register_preset(
    "UNet-T", "unet", tiny=True,
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_heads=1,
)

# Paper 004 (section 2.1, figure 3, appendix A.2): pixel space 32x32x3, learned sigma, channel multipliers
# (1, 2, 3, 4), 3 ResBlocks per level, "109.55M parameters, 303.17 GFLOPs, FLOP-matched to DiT-XS/1".
#
# Parameters: model_channels = 128 with attention only in the middle block (which runs at 4x4, the lowest
# resolution) gives 109,557,510 (109.56M; 109,554,051 without learned sigma). Adding attention blocks to the
# 4x4 level as well (attention_resolutions=(4,): 3 encoder + 4 decoder blocks, the text's literal reading)
# gives 116.92M, and no model_channels (a multiple of 32 for GroupNorm(32)) comes near 109.55M that way
# (96 -> ~66M). Heads do not change parameters or FLOPs; 4 heads is the official default.
#
# FLOPs: as fvcore MACs per image (this harness's convention) this UNet costs 9.486 G and DiT-XS/1 15.739 G,
# so under that convention they are NOT FLOP-matched. The paper's pair is reproduced by a module-level count
# (conv + linear MACs, attention matmuls unseen, as hook-based counters such as thop report): UNet 9.4639 G,
# DiT-XS/1 9.3712 G (thop 0.1.1: 9.4639 / 9.3841). The paper's numbers are ~32x these (303.17 / 9.4639 =
# 32.03, 300.49 / 9.3841 = 32.02): e.g. FLOPs = 2 x MACs on a per-GPU batch of 16 (batch 64 on 4 GPUs) or
# MACs on a batch of 32; the residual 0.1% depends on which element-wise ops the tool counted.
register_preset(
    "UNet-004", "unet",
    model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_resolutions=(), num_heads=4,
    reference={"gflops": 303.17, "params": 109.55e6, "input": (3, 32), "source": "paper 004 sec 2.1 / anchors.md"},
)
