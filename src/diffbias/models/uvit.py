"""U-ViT backbone (Bao et al. 2023) with GMM-S options (paper 000): Gaussian mixture mask attention and
FreeU-style inference-time scaling of skips and backbone features.

Layout (official ``libs/uvit.py`` conventions, see docs/model-contract.md for the call contract)::

    tokens = [time token, (label token if num_classes > 0), patch tokens] + learned pos. embedding
    depth // 2 in-blocks -> 1 mid block -> depth // 2 out-blocks (Linear(2D -> D) on concat(x, skip),
    skips popped last-in-first-out); pre-LayerNorm blocks, qkv bias off, MLP ratio 4
    head: LayerNorm -> Linear(D -> p*p*C_out) -> drop extra tokens -> unpatchify -> 3x3 conv

The token order differs from the official code ([label, time, patches]); with a learned positional
embedding and permutation-equivariant attention this is the same function class.

Gaussian mixture mask (paper 000, section 3.1, algorithm 1), per block and per head, K kernels::

    M[i, j] = sum_k alpha_k * exp(-(dx^2 + dy^2) / (2 sigma_k^2 + eps)),  attention = softmax((QK^T/sqrt(d)) * M) V

with dx, dy the column/row offsets of patch tokens i, j on the sqrt(N) x sqrt(N) token grid. The exponent is
computed directly (the official code raises exp(-d^2)^(1/2) to a power, which underflows to 0 at large grids).
Extra tokens (time/label): the mask is extended with 1 for every pair that involves an extra token, so those
logits are left unchanged (the paper does not say; this is the neutral choice for a multiplicative mask).

FreeU-style scaling (paper 000, section 3.2, eqs. 1-5) is applied in every out-block, before its skip Linear:
the skip's patch tokens are low-frequency filtered (eqs. 1-2) and the incoming backbone tokens are scaled by
alpha = (b - 1) * minmax(channel mean) + 1 (eqs. 3-5); time/label tokens are left out of both. Off by default
(b = s = 1 is the identity); set it for sampling with :func:`freeu_scaling`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention
from .layers import LabelEmbedder, RecordsAttention, timestep_embedding
from .registry import register_backbone, register_preset

GMM_EPS = 1e-5  # the epsilon of paper 000 algorithm 1 (the official GMM code adds 1e-5 to sigma^2)

# --------------------------------------------------------------------------------------------------------------
# Gaussian mixture mask


def grid_sq_distances(grid: int) -> torch.Tensor:
    """(N, N) squared grid distances dx^2 + dy^2 between tokens of a grid x grid raster (N = grid^2)."""
    idx = torch.arange(grid * grid)
    col, row = idx % grid, idx // grid
    dx = col[:, None] - col[None, :]
    dy = row[:, None] - row[None, :]
    return (dx * dx + dy * dy).float()


def gmm_mask(alpha: torch.Tensor, sigma: torch.Tensor, dist2: torch.Tensor, eps: float = GMM_EPS) -> torch.Tensor:
    """Mask (h, N, N) = sum_k alpha[h, k] * exp(-dist2 / (2 sigma[h, k]^2 + eps)); alpha, sigma: (h, K).

    The exponent is formed before exp (no powers of small exponentials), so nothing underflows to NaN.
    """
    denom = 2.0 * sigma.float().pow(2) + eps  # (h, K) > 0
    expo = -dist2.float()[None, None] / denom[..., None, None]  # (h, K, N, N) <= 0
    return (alpha.float()[..., None, None] * torch.exp(expo)).sum(dim=1)


def _gmm_attention_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
    dist2: torch.Tensor, eps: float, return_map: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax((QK^T / sqrt(d)) * M) V with M extended by ones for the leading extra tokens; q, k, v: (B, h, L, d)."""
    L, n = q.shape[-2], dist2.shape[-1]
    mask = gmm_mask(alpha, sigma, dist2, eps)  # (h, N, N)
    extra = L - n
    if extra:
        mask = F.pad(mask, (extra, 0, extra, 0), value=1.0)  # pairs with a time/label token: factor 1
    logits = (q.float() @ k.float().transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    attn = torch.softmax(logits * mask, dim=-1)
    out = (attn @ v.float()).to(v.dtype)
    return out, (attn if return_map else None)


@torch.library.custom_op("diffbias::gmm_attention", mutates_args=())
def gmm_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
    dist2: torch.Tensor, eps: float,
) -> torch.Tensor:
    """Forward-only GMM attention core; used only while counting FLOPs (one traced node, one handle)."""
    return _gmm_attention_math(q, k, v, alpha, sigma, dist2, eps)[0]


@gmm_attention_op.register_fake
def _(q, k, v, alpha, sigma, dist2, eps):
    return torch.empty_like(v)


def _shape(value: Any) -> list[int]:
    return list(value.type().sizes())


def gmm_attention_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of diffbias::gmm_attention, convention:

    - QK^T and AV: 2 * B * h * L^2 * d (as fvcore counts two matmuls);
    - mask: K * h * N^2 exp-evaluations (each kernel term alpha*exp(...) counted as 1; built once per forward,
      N = patch tokens, the extension by ones is free) plus B * h * L^2 multiplies of the logits by M.
    Softmax, the 1/sqrt(d) scale and the extension are not counted (fvcore does not count them for DiT either).
    """
    b, h, seq, d = _shape(inputs[0])
    dv = _shape(inputs[2])[-1]
    kernels = _shape(inputs[3])[-1]
    n = _shape(inputs[5])[-1]
    return b * h * seq * seq * (d + dv) + kernels * h * n * n + b * h * seq * seq


# Declared by UViT.flop_handles; the fused-attention (SDPA) handle lives in diffbias.metrics.flops.


# --------------------------------------------------------------------------------------------------------------
# Transformer block


class UViTAttention(nn.Module, RecordsAttention):
    """Multi-head self-attention; fused (SDPA) without a mask, or GMM-masked (paper 000 algorithm 1)."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = False, gmm: bool = False, gmm_kernels: int = 5,
        grid: int | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.gmm = gmm
        if gmm:
            if grid is None:
                raise ValueError("GMM attention needs the token grid size")
            # Official GMM init: sigma ~ 10 + 10 N(0,1), alpha ~ 2 N(0,1), per head and kernel (global RNG).
            self.gmm_sigma = nn.Parameter(torch.randn(num_heads, gmm_kernels) * 10 + 10)
            self.gmm_alpha = nn.Parameter(torch.randn(num_heads, gmm_kernels) * 2)
            self.register_buffer("gmm_dist2", grid_sq_distances(grid), persistent=False)

    def gmm_mask(self) -> torch.Tensor:
        """The learned mask over patch tokens, (heads, N, N), detached (for figures)."""
        with torch.no_grad():
            return gmm_mask(self.gmm_alpha, self.gmm_sigma, self.gmm_dist2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.gmm:
            if attention.FLOP_COUNTING:  # fvcore sees one opaque node with a counting handle
                out = gmm_attention_op(q, k, v, self.gmm_alpha, self.gmm_sigma, self.gmm_dist2, GMM_EPS)
            else:
                out, attn = _gmm_attention_math(
                    q, k, v, self.gmm_alpha, self.gmm_sigma, self.gmm_dist2, GMM_EPS, self.record_attention
                )
                if attn is not None:
                    self.attention_map = attn.detach()
        elif self.record_attention:
            attn = torch.softmax((q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
            self.attention_map = attn.detach()
            out = (attn @ v.float()).to(v.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class UViTBlock(nn.Module):
    """Pre-LN transformer block; out-blocks first fuse the long skip with Linear(2D -> D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool, **attn_kw):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = UViTAttention(dim, num_heads, qkv_bias=qkv_bias, **attn_kw)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------------------------
# FreeU-style scaling (paper 000 section 3.2)


def fourier_lowfreq_scale(h: torch.Tensor, s: float, tau: int = 1) -> torch.Tensor:
    """Eqs. 1-2 on a (B, C, H, W) map: FFT2 -> fftshift -> centred block [c - tau, c + tau) per axis (c = n // 2,
    the DC bin after fftshift; FreeU's slicing) times s -> inverse -> real part. s = 1 is the identity."""
    dtype = h.dtype
    freq = torch.fft.fftshift(torch.fft.fft2(h.float(), dim=(-2, -1)), dim=(-2, -1))
    H, W = h.shape[-2:]
    scale = torch.ones(H, W, device=h.device)
    cr, cc = H // 2, W // 2
    scale[max(cr - tau, 0) : cr + tau, max(cc - tau, 0) : cc + tau] = s
    freq = torch.fft.ifftshift(freq * scale, dim=(-2, -1))
    return torch.fft.ifft2(freq, dim=(-2, -1)).real.to(dtype)


def backbone_scale(x: torch.Tensor, b: float) -> torch.Tensor:
    """Eqs. 3-5 on patch tokens x (B, N, D): mean over channels per token, min-max normalised per sample over
    the token grid, alpha = (b - 1) * normalised + 1, x * alpha. b = 1 is the identity."""
    mean = x.mean(dim=-1, keepdim=True)  # (B, N, 1)
    lo, hi = mean.amin(dim=1, keepdim=True), mean.amax(dim=1, keepdim=True)
    normed = (mean - lo) / (hi - lo).clamp_min(torch.finfo(mean.dtype).tiny)
    return x * ((b - 1.0) * normed + 1.0)


def _per_block(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"freeu {name} needs one value per out-block ({n}), got {len(values)}")
    return values


@contextlib.contextmanager
def freeu_scaling(
    model: "UViT", b: float | Sequence[float] = 1.0, s: float | Sequence[float] = 1.0, tau: int = 1
) -> Iterator["UViT"]:
    """Set FreeU-style scaling for sampling (b: backbone factor, s: skip low-frequency factor, scalars or one
    value per out-block in forward order; tau: half-width of the low-frequency block); restores on exit."""
    saved = (model.freeu_b, model.freeu_s, model.freeu_tau)
    model.freeu_b, model.freeu_s, model.freeu_tau = b, s, tau
    try:
        yield model
    finally:
        model.freeu_b, model.freeu_s, model.freeu_tau = saved


# --------------------------------------------------------------------------------------------------------------
# Backbone


@register_backbone("uvit")
class UViT(nn.Module):
    """U-ViT; ``gmm=True`` gives every block GMM-masked attention (paper 000 "GMM-S")."""
    # capabilities (docs/model-contract.md, diffbias.measurements)
    records_attention = True
    has_gmm_masks = True
    supports_freeu = True
    # what its custom operator costs (collected by diffbias.metrics.flops.flop_handles)
    flop_handles = {"diffbias::gmm_attention": gmm_attention_flop_handle}
    # rehearsal (config.apply_rehearsal): tiny width, same depth
    rehearsal_options = {"embed_dim": 32, "num_heads": 2}

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 3,
        num_classes: int = 0,
        learn_sigma: bool = True,
        patch_size: int = 2,
        embed_dim: int = 512,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,  # official CIFAR-10 config: raw sinusoid as the time token
        gmm: bool = False,
        gmm_kernels: int = 5,
        freeu_b: float | Sequence[float] = 1.0,
        freeu_s: float | Sequence[float] = 1.0,
        freeu_tau: int = 1,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid = input_size // patch_size
        self.num_patches = self.grid**2
        self.extras = 1 + (num_classes > 0)
        self.freeu_b, self.freeu_s, self.freeu_tau = freeu_b, freeu_s, freeu_tau

        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed
            else nn.Identity()
        )
        self.label_embed = LabelEmbedder(num_classes, embed_dim) if num_classes > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.num_patches, embed_dim))

        block_kw = dict(
            dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, gmm=gmm,
            gmm_kernels=gmm_kernels, grid=self.grid,
        )
        self.in_blocks = nn.ModuleList([UViTBlock(skip=False, **block_kw) for _ in range(depth // 2)])
        self.mid_block = UViTBlock(skip=False, **block_kw)
        self.out_blocks = nn.ModuleList([UViTBlock(skip=True, **block_kw) for _ in range(depth // 2)])

        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size * patch_size * self.out_channels)
        self.final_layer = nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def named_blocks(self) -> list[tuple[str, UViTBlock]]:
        return (
            [(f"in.{i}", blk) for i, blk in enumerate(self.in_blocks)]
            + [("mid", self.mid_block)]
            + [(f"out.{i}", blk) for i, blk in enumerate(self.out_blocks)]
        )

    def gmm_masks(self) -> dict[str, torch.Tensor]:
        """Learned GMM masks per block ("in.i", "mid", "out.i"), each (heads, N, N) over patch tokens."""
        return {name: blk.attn.gmm_mask() for name, blk in self.named_blocks() if blk.attn.gmm}

    def _tokens_to_map(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, D, g, g)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.grid, self.grid)

    def _freeu(self, x: torch.Tensor, skip: torch.Tensor, b: float, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.extras  # paper 000 sec. 3.2: the time/class tokens are omitted from the scaling
        if b != 1.0:
            x = torch.cat([x[:, :e], backbone_scale(x[:, e:], b)], dim=1)
        if s != 1.0:
            filtered = fourier_lowfreq_scale(self._tokens_to_map(skip[:, e:]), s, self.freeu_tau)
            skip = torch.cat([skip[:, :e], filtered.flatten(2).transpose(1, 2)], dim=1)
        return x, skip

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        extra = [self.time_embed(timestep_embedding(t, self.embed_dim)).to(tokens.dtype)[:, None]]
        if self.label_embed is not None:
            if y is None:  # no label given: the null row
                y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
            extra.append(self.label_embed(y)[:, None].to(tokens.dtype))
        h = torch.cat(extra + [tokens], dim=1) + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        h = self.mid_block(h)
        n_out = len(self.out_blocks)
        bs = _per_block(self.freeu_b, n_out, "b")
        ss = _per_block(self.freeu_s, n_out, "s")
        for blk, b, s in zip(self.out_blocks, bs, ss):
            skip = skips.pop()
            # Paper 000 sec. 3.2: every out-block scales the incoming backbone tokens (eqs. 3-5) and filters the
            # skip it concatenates (eqs. 1-2); b = s = 1 leaves both untouched.
            h, skip = self._freeu(h, skip, b, s)
            h = blk(h, skip)

        h = self.decoder_pred(self.norm(h))[:, self.extras :]
        p, c, g = self.patch_size, self.out_channels, self.grid
        h = h.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)
        return self.final_layer(h)


# --------------------------------------------------------------------------------------------------------------
# Presets. U-ViT-S/2 is the CIFAR-10 "small" config (configs/cifar10_uvit.py): depth 12 = 13 blocks. Paper 000
# table 2 reports 181.34 "GFLOPS" for its smallest U-ViT, the same with and without GMM. This harness counts
# 12.22 G (fvcore MACs with attention and masks). The published number is 16.0 x a module-level count that sees
# conv and linear layers only: 11.32 G unconditional, 11.37 G with the class token (181.34 / 11.37 = 15.95).
# That count is blind to the attention matmuls and the masks, which explains why GMM changes nothing. The factor 16
# is a per-batch count (16 images, or FLOPs = 2 x MACs at batch 8), so the number is shown, not tested. The papers
# state no parameter count.
_PAPER_000_FLOPS = {"gflops": 181.34, "input": (3, 32), "source": "paper 000 table 2", "reproducible": False,
                    "note": "16.0 x the conv+linear MACs (11.37 G with the class token): a per-batch, attention-blind "
                            "count, equal with and without GMM"}

_TINY = dict(patch_size=2, embed_dim=64, depth=4, num_heads=2)  # 5 blocks, 8x8 token grid at 16x16x1
register_preset("UViT-T/2", "uvit", tiny=True, **_TINY)
register_preset("UViT-T/2-GMM", "uvit", tiny=True, gmm=True, **_TINY)
_SMALL = dict(patch_size=2, embed_dim=512, depth=12, num_heads=8)
register_preset("UViT-S/2", "uvit", reference=_PAPER_000_FLOPS, **_SMALL)
register_preset("UViT-S/2-GMM", "uvit", gmm=True, reference=_PAPER_000_FLOPS, **_SMALL)
