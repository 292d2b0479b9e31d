"""The image autoencoder of latent diffusion: Stable Diffusion's VAE through ``diffusers.AutoencoderKL``.

Seeds 002 (DICE/DiMR) and 003 (DiffuSSM), like DiT, train on the latents of ``stabilityai/sd-vae-ft-ema``
(or ``-mse``): 3 -> 4 channels, downsampling 8 (256x256 -> 32x32x4, 512 -> 64x64x4), latents multiplied by
the VAE's ``scaling_factor`` 0.18215. Encoding: ``z = (posterior - shift) * scale``; decoding:
``vae.decode(z / scale + shift)``. ``shift_factor`` is None (0) for the SD VAEs; it is read from the config
so that another AutoencoderKL (SD3, FLUX) is handled by the same two lines.

Nothing here touches the network: the VAE is read from a local directory (``from_pretrained(path,
local_files_only=True)``), fetched once on a login node (``docs/latents-and-multi-gpu.md``). Every call runs in
eval mode without gradients, in float32 (the SD VAE's decoder is known to overflow in float16 on some images),
batched, on the job's device.

Posterior mean or sample: DiT draws ``latent_dist.sample()`` afresh at every training step. A cache stores
one latent per image, so it is either the posterior **mean** (this project's default: a deterministic function
of the image, the same whatever the batch, device count or order, and the natural "training image" for the
memorisation measurements of seed 004), or a **sample** fixed by a seed recorded with the cache. A sample
uses ``eps_i`` drawn on the CPU from ``torch.Generator().manual_seed(seed * 1_000_003 + i)`` for the image with
global index ``i`` (the convention of :mod:`diffbias.sampling`), so it is the same on any device, batch size
and resume point; ``z_i = mean_i + std_i * eps_i`` is what ``latent_dist.sample()`` computes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .device import resolve_device

__all__ = [
    "SD_SCALE_FACTOR",
    "SD_GEOMETRY",
    "autoencoder_geometry",
    "POSTERIORS",
    "Autoencoder",
    "tiny_autoencoder_config",
    "save_tiny_autoencoder",
    "posterior_noise",
]

SD_SCALE_FACTOR = 0.18215
SD_GEOMETRY = (4, 8)  # latent channels and downsampling of SD's VAE (and of save_tiny_autoencoder's)
POSTERIORS = ("mean", "sample")
_SAMPLE_SEED_STRIDE = 1_000_003  # as diffbias.sampling: seed * stride + index, one generator per image


def autoencoder_geometry(path: str | os.PathLike) -> tuple[int, int]:
    """(latent channels, downsampling) of the AutoencoderKL in folder ``path``, read from its ``config.json``
    (``latent_channels``; one downsampler between consecutive ``block_out_channels``) without loading weights.
    SD's (4, 8) when the folder is not there yet: at DAG build, for an autoencoder a rule makes (the rehearsal's
    tiny one, SD-shaped) or with the data check skipped; the encode job then reads the real one."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return SD_GEOMETRY
    cfg = json.loads(config.read_text())
    return int(cfg.get("latent_channels", 4)), 2 ** (len(cfg.get("block_out_channels", [0] * 4)) - 1)


def posterior_noise(indices: Sequence[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float32 CPU noise (len(indices), *shape): row k from the generator seeded ``seed * 1_000_003 + indices[k]``.

    One generator per image, so the noise of image i does not depend on which batch or shard it is in."""
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    for k, i in enumerate(indices):
        out[k] = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) * _SAMPLE_SEED_STRIDE + int(i)))
    return out


class Autoencoder:
    """A frozen ``AutoencoderKL`` on one device: ``encode`` images in [-1, 1] to scaled latents, ``decode`` back."""

    def __init__(self, vae, path: str | os.PathLike | None = None, device: str | torch.device = "auto"):
        self.device = resolve_device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.path = None if path is None else str(path)
        cfg = vae.config
        self.scale_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)  # one downsampler between consecutive blocks
        self.in_channels = int(cfg.in_channels)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "auto") -> "Autoencoder":
        """An AutoencoderKL saved with ``save_pretrained`` (``config.json`` + weights) in a local directory."""
        from diffusers import AutoencoderKL

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: no AutoencoderKL here (config.json missing). Fetch it once on a machine with network access, "
                f"e.g. `hf download stabilityai/sd-vae-ft-ema config.json diffusion_pytorch_model.safetensors "
                f"--local-dir {path}` (`huggingface-cli download ...` with huggingface_hub < 1.0; "
                "docs/latents-and-multi-gpu.md); jobs never download")
        # low_cpu_mem_usage=False: the default path wants `accelerate` (not a dependency) and only warns without it
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32,
                                            low_cpu_mem_usage=False)
        return cls(vae, path, device)

    # -- what it is --------------------------------------------------------------------------------------
    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.downsample:
            raise ValueError(f"resolution {resolution} is not a multiple of the autoencoder's downsampling "
                             f"{self.downsample}")
        side = resolution // self.downsample
        return (self.latent_channels, side, side)

    def config_dict(self) -> dict:
        """The architecture (config without diffusers' private ``_`` keys, which name versions and paths)."""
        return {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}

    def fingerprint(self) -> dict:
        """SHA-256 of the config and of the weights (names, dtypes, shapes, bytes in name order): a cache made
        with other weights, or another architecture, is never taken for this one."""
        config_hash = hashlib.sha256(json.dumps(self.config_dict(), sort_keys=True, default=str).encode()).hexdigest()
        h = hashlib.sha256()
        for name, t in sorted(self.vae.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return {"config_sha256": config_hash, "weights_sha256": h.hexdigest(),
                "parameters": int(sum(p.numel() for p in self.vae.parameters()))}

    # -- encode / decode ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, posterior: str = "mean", seed: int | None = None,
               indices: Sequence[int] | None = None, batch_size: int = 64) -> torch.Tensor:
        """Scaled latents (B, 4, H/8, W/8) float32 on the device, of images ``x`` (B, 3, H, W) in [-1, 1].

        ``posterior="mean"``: the posterior mean. ``"sample"``: mean + std * eps with the per-image noise of
        :func:`posterior_noise` (``seed`` and the images' global ``indices``, default 0..B-1)."""
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, got {posterior!r}")
        if posterior == "sample" and seed is None:
            raise ValueError("posterior='sample' needs a seed (recorded in the cache's meta)")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        indices = list(range(len(x))) if indices is None else [int(i) for i in indices]
        if len(indices) != len(x):
            raise ValueError(f"{len(x)} images but {len(indices)} indices")
        out = []
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(self.device, torch.float32)
            dist = self.vae.encode(xb).latent_dist
            z = dist.mean
            if posterior == "sample":
                eps = posterior_noise(indices[start:start + batch_size], tuple(z.shape[1:]), seed).to(z.device)
                z = z + dist.std * eps
            out.append((z - self.shift_factor) * self.scale_factor)
        return torch.cat(out) if out else torch.empty((0, self.latent_channels, 0, 0), device=self.device)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
        """Images (B, 3, H*8, W*8) float32 on the device, about [-1, 1] (not clamped), of scaled latents ``z``."""
        out = []
        for start in range(0, len(z), batch_size):
            zb = z[start:start + batch_size].to(self.device, torch.float32)
            out.append(self.vae.decode(zb / self.scale_factor + self.shift_factor).sample)
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------------
# A tiny AutoencoderKL with random weights, for tests and the rehearsal
# ----------------------------------------------------------------------------------------------------


def tiny_autoencoder_config(channels: int = 2, layers_per_block: int = 1,
                            scaling_factor: float = SD_SCALE_FACTOR) -> dict:
    """SD's VAE architecture (3 -> 4 channels, four blocks, so downsampling 8, a mid block with attention) at
    ``channels`` per block: 2 channels and one ResNet per block give 2,067 parameters (SD's: 83.7M).

    diffusers accepts even 1 channel and ``layers_per_block=0`` (543 parameters), but then the encoder's down
    blocks hold no ResNet at all; one per block keeps every kind of layer the real VAE runs (ResNets,
    GroupNorm, the mid attention) for a few thousand parameters. ``norm_num_groups`` must divide the width."""
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [int(channels)] * 4, "layers_per_block": int(layers_per_block),
        "norm_num_groups": int(channels), "act_fn": "silu", "sample_size": 32, "scaling_factor": float(scaling_factor),
    }


def save_tiny_autoencoder(directory: str | os.PathLike, *, seed: int = 0, **config) -> Path:
    """Build an AutoencoderKL from :func:`tiny_autoencoder_config` (keyword overrides) with weights drawn from
    ``torch.manual_seed(seed)`` (the global RNG state is restored), and ``save_pretrained`` it to ``directory``
    (written to a temporary folder beside it, then renamed: a half-saved model is never found there).
    Returns the directory. Deterministic: the same seed gives the same weights and fingerprint."""
    from diffusers import AutoencoderKL

    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**tiny_autoencoder_config(**config))
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        vae.save_pretrained(str(staging))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Decoded images in about [-1, 1] -> uint8 (B, C, H, W) numpy, as the pixel-space samplers round them."""
    from .data import from_model_range

    return from_model_range(x).cpu().numpy()
