"""DiffuSSM (paper 003): attention-free diffusion backbone of gated bidirectional S4D blocks in an hourglass.

Shapes follow paper 003, section 4.2. The image is split into P x P patches (P = 1 by default: one token per
pixel), flattened in raster order to L tokens; the residual stream holds J = L / M tokens (M adjacent raster
tokens merged) of width D. Each block, for j = floor(l / M), m = l mod M, D_m = 2D / M::

    U_l  = gelu(W_up[m] gelu(W0 I_j))                          (L x D)   up-projection to full length
    Y    = [S4D_fwd(U), flip(S4D_bwd(flip(U)))]                (L x 2D)  SSM at the FULL length L
    I'_j = concat_m gelu(W_down[m] Y_{jM+m})                   (J x 2D)  each W_down[m]: 2D -> 2D/M
    O_j  = W3(gelu(W2 I'_j) * gelu(W1 I_j))                     (J x D)   gate v = gelu(W1 I_j)

wrapped in DiT's adaLN-Zero (I = modulate(LN(x)); x + gate * O), with a DiT final layer.

Linear maps of one block (biases excluded): W0 D^2, W_up M D^2, W_down 4 D^2, W1 h D, W2 2 h D, W3 h D with
h = mlp_ratio * D. With h = 2D this is 13 D^2 + M D^2 parameters and 13 (L/M) D^2 + L D^2 MACs, which is the
paper's FLOP formula. The paper's parameter sentence (9 D^2 + 2 M D^2, "13 D^2 at M = 2") cannot hold together
with its FLOP formula for any set of token-wise linear maps (at M = 1 every map is applied once per token,
so parameters = MACs / L: 14 D^2 from the FLOP formula against 11 D^2); see ``seed_linear_params``.

FLOPs are multiply-accumulates as fvcore counts them. FFTs (aten::fft_rfft / aten::fft_irfft, which fvcore
does not count) are charged ``FFT_MAC_PER_NLOGN * n * log2(n)`` MACs per transformed row of length n:
a real-input FFT costs about 2.5 n log2 n real FLOPs (half the 5 n log2 n of a complex radix-2 FFT), i.e.
1.25 n log2 n MACs. Each S4D call does three length-2L transforms per channel (rfft of u, rfft of the
kernel, irfft), so the paper's alpha * 2 L log L * D term is 2 directions x 3 x 1.25 x 2L log2(2L) x D,
alpha = 7.5 with log = log2(2L). Element-wise work (GELU, the complex spectral product, exp, D skip) is
not counted, as fvcore counts no element-wise op. The S4D kernel's Vandermonde sum is two real bmm's,
counted by fvcore: N L MACs per channel (N = real state size).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import LabelEmbedder, TimestepEmbedder
from .registry import register_backbone, register_preset

# ---------------------------------------------------------------------------------------------- FLOPs
FFT_MAC_PER_NLOGN = 1.25  # MACs per n*log2(n) for a real FFT of length n (2.5 n log2 n real flops)


def fft_macs(n: int, rows: int = 1) -> float:
    return FFT_MAC_PER_NLOGN * n * math.log2(n) * rows if n > 1 else 0.0


def _shape(v) -> list[int] | None:
    t = v.type()
    try:
        return list(t.sizes())
    except Exception:  # not a complete tensor type
        return None


def _const(v):
    try:
        return v.toIValue()
    except Exception:
        return None


def _fft_handle(real_input: bool):
    """fvcore handle for aten::fft_rfft (real_input) / aten::fft_irfft; dim must be a traced constant."""

    def handle(inputs, outputs) -> float:
        dim = _const(inputs[2]) if len(inputs) > 2 else -1
        dim = -1 if dim is None else int(dim)
        if real_input:  # rfft: input real, length n (after the n= padding); output n//2+1 bins
            out = _shape(outputs[0])
            n = _const(inputs[1])
            if n is None:  # traced from a size: recover n from the bins (even n, as the S4D uses 2L)
                n = 2 * (out[dim] - 1)
            rows = math.prod(out) // out[dim]
        else:  # irfft: real output of length n
            out = _shape(outputs[0])
            n = out[dim]
            rows = math.prod(out) // n
        return fft_macs(int(n), rows)

    return handle


# What the FFTs cost: declared by DiffuSSM.flop_handles, collected by diffbias.metrics.flops.flop_handles.
FFT_FLOP_HANDLES = {"aten::fft_rfft": _fft_handle(True), "aten::fft_irfft": _fft_handle(False)}


# ---------------------------------------------------------------------------------------------- S4D
class S4D(nn.Module):
    """Diagonal state-space layer (S4D-Lin, ZOH) over (B, H, L), convolution by FFT of length 2L.

    A_n = -exp(log_A_real) + i * A_imag with A_real = 0.5, A_imag = pi * n; B = 1 (absorbed in C);
    K_l = 2 Re(sum_n C_n (exp(dt A_n) - 1) / A_n * exp(dt A_n l)); y = K * u (causal) + D u.
    """

    def __init__(self, channels: int, d_state: int = 64, dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if d_state % 2:
            raise ValueError("d_state counts real dimensions and must be even (N/2 complex modes)")
        h, n2 = channels, d_state // 2
        self.channels, self.d_state = channels, d_state
        self.log_dt = nn.Parameter(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(h, n2, dtype=torch.cfloat)))  # complex, stored real
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(h, n2)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(n2, dtype=torch.float32).repeat(h, 1))
        self.D = nn.Parameter(torch.randn(h))

    def kernel(self, length: int) -> torch.Tensor:
        """(H, L) real convolution kernel, vectorised over channels, modes and positions."""
        dt = torch.exp(self.log_dt)  # (H,)
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)  # (H, N/2)
        dtA = A * dt[:, None]
        C = torch.view_as_complex(self.C) * (torch.exp(dtA) - 1.0) / A  # (H, N/2), ZOH input matrix folded in
        pos = torch.arange(length, device=dtA.device, dtype=torch.float32)
        vander = torch.exp(dtA[:, :, None] * pos)  # (H, N/2, L)
        # 2 Re(C^T V) = 2 (Re C Re V - Im C Im V): two real bmm's (counted by fvcore as N L MACs per channel)
        k = torch.bmm(C.real[:, None, :], vander.real) - torch.bmm(C.imag[:, None, :], vander.imag)
        return 2.0 * k[:, 0, :]

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # u: (B, H, L)
        length = u.shape[-1]
        k = self.kernel(length)
        k_f = torch.fft.rfft(k, n=2 * length)
        u_f = torch.fft.rfft(u, n=2 * length)
        y = torch.fft.irfft(u_f * k_f, n=2 * length)[..., :length]
        return y + u * self.D[:, None]


class BidirectionalS4D(nn.Module):
    """(B, L, D) -> (B, L, 2D): forward S4D on u, a separate S4D on flip(u) flipped back, concatenated."""

    def __init__(self, channels: int, **ssm):
        super().__init__()
        self.fwd = S4D(channels, **ssm)
        self.bwd = S4D(channels, **ssm)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u = u.transpose(1, 2)  # (B, D, L)
        y_f = self.fwd(u)
        y_b = self.bwd(u.flip(-1)).flip(-1)  # a real backward direction: position l sees tokens l..L-1
        return torch.cat([y_f, y_b], dim=1).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- blocks
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiffuSSMBlock(nn.Module):
    """One DiffuSSM layer on the shortened stream x: (B, J, D), conditioning c: (B, D)."""

    def __init__(self, hidden_size: int, hourglass: int = 2, mlp_ratio: float = 2.0, **ssm):
        super().__init__()
        d, m = hidden_size, hourglass
        if (2 * d) % m:
            raise ValueError(f"2*hidden_size={2 * d} must be divisible by the hourglass factor M={m}")
        h = int(round(mlp_ratio * d))
        self.hidden_size, self.hourglass, self.mlp_hidden = d, m, h
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d))
        # Paper 003 sec. 4.2: dense maps at J = L/M; the bidirectional SSM at the original length L.
        self.w0 = nn.Linear(d, d)
        self.w_up = nn.Linear(d, m * d)  # the M maps W_up[m]: D -> D, stacked on the output
        self.w_down = nn.Parameter(torch.empty(m, 2 * d, 2 * d // m))  # the M maps W_down[m]: 2D -> 2D/M
        self.b_down = nn.Parameter(torch.zeros(2 * d))
        self.ssm = BidirectionalS4D(d, **ssm)
        self.w1 = nn.Linear(d, h)  # gate branch v = gelu(W1 I)
        self.w2 = nn.Linear(2 * d, h)  # SSM branch
        self.w3 = nn.Linear(h, d)
        self._init_weights()

    def _init_weights(self) -> None:
        d, m = self.hidden_size, self.hourglass
        for lin in (self.w0, self.w1, self.w2, self.w3):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        for k in range(m):  # each W_up[m] and W_down[m] like its own Linear
            nn.init.xavier_uniform_(self.w_up.weight.data[k * d : (k + 1) * d])
            nn.init.xavier_uniform_(self.w_down.data[k].T)
        nn.init.zeros_(self.w_up.bias)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def linear_maps(self) -> dict[str, torch.Tensor]:
        """The paper's W's (weights only): W0, W_up[m], W_down[m], W1, W2, W3."""
        return {"W0": self.w0.weight, "W_up": self.w_up.weight, "W_down": self.w_down,
                "W1": self.w1.weight, "W2": self.w2.weight, "W3": self.w3.weight}

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, j, d = x.shape
        m = self.hourglass
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=-1)
        i = modulate(self.norm(x), shift, scale)  # I: (B, J, D)
        u = F.gelu(self.w_up(F.gelu(self.w0(i)))).reshape(b, j * m, d)  # U: (B, L, D), token l = j*M + m
        y = self.ssm(u)  # Y: (B, L, 2D)
        y = y.reshape(b, j, m, 1, 2 * d)  # token jM+m -> phase m of group j
        i2 = F.gelu(torch.matmul(y, self.w_down).reshape(b, j, 2 * d) + self.b_down)  # I': (B, J, 2D)
        o = self.w3(F.gelu(self.w2(i2)) * F.gelu(self.w1(i)))  # O: (B, J, D)
        return x + gate[:, None] * o


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_features)
        for lin in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ---------------------------------------------------------------------------------------------- model
@register_backbone("diffussm")
class DiffuSSM(nn.Module):
    """DiffuSSM backbone. Options: hidden_size D, depth, patch_size P (1: a token per pixel), hourglass M
    (1: no down/up scaling), mlp_ratio (gated-MLP width / D; 2 gives the paper's FLOP formula), d_state N
    (real state size of each S4D), dt_min, dt_max."""
    # capabilities (docs/model-contract.md, diffbias.measurements)
    records_attention = False
    flop_handles = FFT_FLOP_HANDLES

    zero_output_at_init = True
    no_weight_decay_keywords = ("log_dt", "log_A_real", "A_imag")
    # rehearsal (config.apply_rehearsal): tiny width and state, same depth, patch and hourglass
    rehearsal_options = {"hidden_size": 32, "d_state": 8}

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 0,
        learn_sigma: bool = True,
        hidden_size: int = 1152,
        depth: int = 29,
        patch_size: int = 1,
        hourglass: int = 2,
        mlp_ratio: float = 2.0,
        d_state: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} not divisible by patch_size {patch_size}")
        grid = input_size // patch_size
        if (grid * grid) % hourglass:
            raise ValueError(f"{grid * grid} tokens not divisible by hourglass factor {hourglass}")
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size, self.hourglass, self.hidden_size, self.grid = patch_size, hourglass, hidden_size, grid
        self.seq_len = grid * grid  # L, the length the SSMs run at

        group = hourglass * patch_size * patch_size
        self.x_embedder = nn.Linear(group * in_channels, hidden_size)  # M adjacent P x P patches -> one token
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        ssm = dict(d_state=d_state, dt_min=dt_min, dt_max=dt_max)
        self.blocks = nn.ModuleList(DiffuSSMBlock(hidden_size, hourglass, mlp_ratio, **ssm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, group * self.out_channels)

        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, J, M*P*P*C): raster-order patches, M consecutive ones merged."""
        b, c, _, _ = x.shape
        p, g = self.patch_size, self.grid
        x = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
        return x.reshape(b, self.seq_len // self.hourglass, -1)

    def untokens(self, t: torch.Tensor) -> torch.Tensor:
        b = t.shape[0]
        p, g, c = self.patch_size, self.grid, self.out_channels
        t = t.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return t.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.x_embedder(self.tokens(x))
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("class-conditional DiffuSSM needs labels y")
            c = c + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.untokens(self.final_layer(h, c))


# ---------------------------------------------------------------------------------------------- counting
def linear_params_per_block(model: nn.Module) -> int:
    """Weights of the paper's linear maps W (W0, W_up, W_down, W1, W2, W3) in one block: no biases, norms,
    SSM or adaLN conditioning. Equals 4*h*D + 5 D^2 + M D^2 (13 D^2 + M D^2 at h = 2D)."""
    block = model if isinstance(model, DiffuSSMBlock) else model.blocks[0]
    return sum(w.numel() for w in block.linear_maps().values())


def linear_params_closed_form(d: int, m: int, mlp_ratio: float = 2.0) -> int:
    h = int(round(mlp_ratio * d))
    return d * d + m * d * d + 4 * d * d + 4 * h * d


def seed_linear_params(d: int, m: int) -> int:
    """Paper 003's stated count, 9 D^2 + 2 M D^2 (not reachable together with its FLOP formula)."""
    return 9 * d * d + 2 * m * d * d


def block_macs_closed_form(d: int, seq_len: int, m: int, d_state: int = 64, mlp_ratio: float = 2.0) -> float:
    """MACs of one block for one image as counted here: linear maps (13 (L/M) D^2 + L D^2 at h = 2D),
    FFTs (2 directions x 3 transforms of length 2L per channel), S4D kernel (2 x N L D), adaLN (3 D^2),
    non-affine LayerNorm (4 J D, fvcore's convention)."""
    L, j, h = seq_len, seq_len // m, int(round(mlp_ratio * d))
    linear = j * (d * d + 4 * d * d + 4 * h * d) + L * d * d
    fft = 2 * 3 * d * fft_macs(2 * L)
    kernel = 2 * d_state * L * d
    return linear + fft + kernel + 3 * d * d + 4 * j * d


# ---------------------------------------------------------------------------------------------- presets
register_preset("DiffuSSM-T", "diffussm", tiny=True, hidden_size=64, depth=2, d_state=16, patch_size=1, hourglass=2)
# Paper 003 figs. 5-6 ablation at tiny size: P = 2 without hourglass, and neither.
register_preset("DiffuSSM-T-P2", "diffussm", tiny=True, hidden_size=64, depth=2, d_state=16, patch_size=2, hourglass=1)
register_preset("DiffuSSM-T-noHG", "diffussm", tiny=True, hidden_size=64, depth=2, d_state=16, patch_size=1,
                hourglass=1)
# Paper 003 sec. 5.1: 29 layers, D = 1152, "approximately 673M parameters", latent 32x32x4 (ImageNet 256).
# GFLOPs/image are not stated (Table 1 only gives training totals), so no gflops reference.
register_preset("DiffuSSM-XL", "diffussm", hidden_size=1152, depth=29, patch_size=1, hourglass=2,
                reference={"params": 673e6, "input": (4, 32)})
# Paper 003 fig. 6 left (model scaling): S at D = 384 and L at D = 768 (printed "786"; 768 is DiT-B's width and a
# multiple of 64, 786 is neither). Depths are not stated: DiT's depth of the same name plus one layer, the rule the
# paper states for XL (DiT-XL's 28 + 1 = 29, "an additional DiffuSSM layer" to match parameters): S 12 + 1, L 24 + 1.
register_preset("DiffuSSM-S", "diffussm", hidden_size=384, depth=13, patch_size=1, hourglass=2,
                reference={"input": (4, 32), "note": "D = 384 from paper 003 fig. 6; depth 13 chosen (DiT-S + 1)"})
register_preset("DiffuSSM-L", "diffussm", hidden_size=768, depth=25, patch_size=1, hourglass=2,
                reference={"input": (4, 32), "note": "D = 768 (printed 786) from paper 003 fig. 6; depth 25 chosen "
                                                     "(DiT-L + 1)"})
