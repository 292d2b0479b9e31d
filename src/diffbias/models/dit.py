"""Diffusion Transformer (DiT, Peebles & Xie 2023) in pixel or latent space, with per-layer local attention.

Follows the official model: adaLN-Zero blocks, fixed 2-D sin-cos positional embedding, learned sigma.
Paper 004 additions: a per-layer attention spec (odd k = k x k neighbourhood attention, G = global),
weight sharing between blocks, and PCA-composed attention maps (appendix C).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention_weights, check_windows_fit, neighborhood_attention, neighborhood_mask, parse_attention_spec
from .layers import LabelEmbedder, RecordsAttention, TimestepEmbedder
from .registry import register_backbone, register_preset

# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module, RecordsAttention):
    """Multi-head self-attention over a token grid; global (window None) or k x k neighbourhood."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], window: int | None, impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.grid, self.window, self.impl = num_heads, grid, window, impl
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.record_attention:
            mask = None if self.window is None else neighborhood_mask(*self.grid, self.window, x.device)
            self.attention_map = attention_weights(q, k, mask).detach()
        if self.window is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = neighborhood_attention(q, k, v, *self.grid, self.window, impl=self.impl)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class PCAAttention(nn.Module, RecordsAttention):
    """Paper 004 appendix C: attention map = coefficients x principal components + delta (delta = 1/L).

    A small linear map gives, per head and query token, ``num_components`` coefficients; the
    (components, L, L) basis comes from the attention maps of a trained baseline and is fixed (buffer).
    The value and output projections stay as in the standard block.
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], num_components: int):
        super().__init__()
        L = grid[0] * grid[1]
        self.num_heads, self.grid, self.num_components = num_heads, grid, num_components
        self.coefficients = nn.Linear(dim, num_heads * num_components)  # replaces the query/key maps
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        # Rows of each component: the component's map entry for (query, key); filled by load_pca_basis.
        self.register_buffer("components", torch.zeros(num_components, L, L))
        self.delta = 1.0 / L

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        h, c = self.num_heads, self.num_components
        coef = self.coefficients(x).view(B, L, h, c).transpose(1, 2)  # (B, h, Lq, c)
        attn = torch.einsum("bhqc,cqk->bhqk", coef, self.components) + self.delta
        if self.record_attention:
            self.attention_map = attn.detach()
        v = self.value(x).view(B, L, h, D // h).transpose(1, 2)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos embedding (half the channels per axis), (grid*grid, dim), as the official DiT."""

    def axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    if dim % 4:
        # Widths not divisible by 4 get zero-padded channels (252 = 4 * 63 for DiT-XS is fine).
        d_axis = (dim // 4) * 2
    else:
        d_axis = dim // 2
    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    # Official convention: first half encodes the width coordinate (w), second half the height (h).
    emb = np.concatenate([axis(d_axis, gw), axis(d_axis, gh)], axis=1)
    if emb.shape[1] < dim:
        emb = np.concatenate([emb, np.zeros((emb.shape[0], dim - emb.shape[1]))], axis=1)
    return emb


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------


def parse_block_sharing(spec: str | None, depth: int) -> dict[int, int]:
    """``"2:1,4:3"`` -> {1: 0, 3: 2}: block 2 reuses block 1, block 4 reuses block 3 (1-based in config)."""
    if not spec:
        return {}
    out: dict[int, int] = {}
    for pair in str(spec).split(","):
        try:
            dst, src = (int(p) for p in pair.split(":"))
        except ValueError:
            raise ValueError(f"share_blocks entry {pair!r} is not 'block:source_block'") from None
        if not (1 <= src < dst <= depth):
            raise ValueError(f"share_blocks {pair!r}: need 1 <= source < block <= depth ({depth})")
        out[dst - 1] = src - 1
    return out


@register_backbone("dit")
class DiT(nn.Module):
    # capabilities (docs/model-contract.md, diffbias.measurements)
    records_attention = True
    has_attention_spec = True
    zero_output_at_init = True
    # rehearsal (config.apply_rehearsal): tiny width, same depth and attention spec
    rehearsal_options = {"hidden_size": 32, "num_heads": 2}

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int = 0,
        learn_sigma: bool = True,
        patch_size: int = 1,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        attention: str | list | None = None,
        attention_impl: str = "auto",
        share_blocks: str | None = None,
        pca_layers: list[int] | None = None,
        pca_components: int = 50,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        g = input_size // patch_size
        self.grid = (g, g)
        self.windows = parse_attention_spec(attention, depth)
        check_windows_fit(self.windows, self.grid)
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_2d(hidden_size, g)).float()[None])

        pca = {int(i) - 1 for i in (pca_layers or [])}  # 1-based in config
        if any(i < 0 or i >= depth for i in pca):
            raise ValueError(f"pca_layers {pca_layers} out of range 1..{depth}")
        sharing = parse_block_sharing(share_blocks, depth)
        blocks: list[DiTBlock] = []
        for i in range(depth):
            if i in sharing:
                src = sharing[i]
                if self.windows[i] != self.windows[src]:
                    raise ValueError(f"shared blocks {i + 1} and {src + 1} have different attention windows")
                blocks.append(blocks[src])  # the same module object: parameters are shared
                continue
            if i in pca:
                if self.windows[i] is not None:
                    raise ValueError(f"layer {i + 1} cannot be both local and PCA attention")
                attn: nn.Module = PCAAttention(hidden_size, num_heads, self.grid, pca_components)
            else:
                attn = Attention(hidden_size, num_heads, self.grid, self.windows[i], attention_impl)
            blocks.append(DiTBlock(hidden_size, num_heads, mlp_ratio, attn))
        self.blocks = nn.ModuleList(blocks)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # patch embedding initialised like a Linear
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def load_pca_basis(self, components: dict[int, torch.Tensor]) -> None:
        """components: 1-based layer -> (num_components, L, L) principal components of its attention maps."""
        for layer, comps in components.items():
            attn = self.blocks[layer - 1].attn
            if not isinstance(attn, PCAAttention):
                raise ValueError(f"layer {layer} is not a PCA attention layer")
            attn.components.copy_(comps.to(attn.components))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        p, c, (gh, gw) = self.patch_size, self.out_channels, self.grid
        x = x.view(B, gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, c, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("class-conditional DiT needs labels y")
            c = c + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


# ----------------------------------------------------------------------------------------------------
# Presets. The official registry (S/B/L/XL at patch 2/4/8) with the DiT paper's counts (anchors.md,
# 32x32x4 latents, 1000 classes), paper 004's pixel-space XS/1 and S/1, and tiny CPU presets.
# ----------------------------------------------------------------------------------------------------

_OFFICIAL = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
_ANCHORS = {
    "DiT-S/8": (0.36, 33e6),
    "DiT-S/4": (1.41, 33e6),
    "DiT-S/2": (6.06, 33e6),
    "DiT-B/2": (23.01, 130e6),
    "DiT-L/2": (80.71, 458e6),
    "DiT-XL/4": (29.05, 675e6),
    "DiT-XL/2": (118.64, 674_834_720),
}
# Paper 002 table 2 counts DiT-XL/2 in its own conventions (diffbias.metrics.flops.CONVENTIONS): fvcore
# without the fused attention matmuls (114.46 = 118.69 - 4.23) and torchinfo's mult-adds (0.68).
_PUBLISHED = {"DiT-XL/2": ({"source": "paper 002 table 2", "convention": "fvcore-as-shipped", "params": 674_834_720,
                            "gflops": 114.46, "mult_adds": 0.68},)}
for _name, (_gflops, _params) in _ANCHORS.items():
    _size, _patch = _name[4:].split("/")
    _d, _depth, _heads = _OFFICIAL[_size]
    register_preset(
        _name, "dit", hidden_size=_d, depth=_depth, num_heads=_heads, patch_size=int(_patch),
        reference={"gflops": _gflops, "params": _params, "input": (4, 32), "num_classes": 1000, "source": "DiT paper table 4"},
        published=_PUBLISHED.get(_name, ()),
    )

# Paper 004 table 4 (pixel space, 32x32x3, patch 1). Attention variants are config entries, not presets.
register_preset("DiT-XS/1", "dit", hidden_size=252, depth=12, num_heads=4, patch_size=1)
register_preset("DiT-S/1", "dit", hidden_size=384, depth=12, num_heads=6, patch_size=1)
# CPU presets for 16x16 inputs: 6 blocks so head/mix/tail placements stay distinguishable.
register_preset("DiT-T/2", "dit", tiny=True, hidden_size=64, depth=6, num_heads=2, patch_size=2)
register_preset("DiT-T/1", "dit", tiny=True, hidden_size=48, depth=6, num_heads=2, patch_size=1)
