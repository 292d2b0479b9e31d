"""The one Gaussian diffusion (DDPM, ADM/DiT style) shared by every backbone.

Conventions
-----------
* Data lie in [-1, 1]. Schedules are float64 numpy arrays indexed by the (possibly respaced) step
  index ``t`` in ``[0, num_timesteps)``; ``_extract`` gathers them into float32 tensors per call.
* The forward process is ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
* ``model(x, t_original, **model_kwargs)`` always receives *original* integer timesteps: a respaced
  diffusion maps its index through ``timestep_map`` before calling the model (no rescaling of t).
* With ``learn_sigma`` the model returns (B, 2C, H, W): first C channels predict eps, the next C a
  value v in [-1, 1] that interpolates the log variance between the posterior variance (v = -1) and
  beta_t (v = +1), "learned range" as in improved DDPM. Without ``learn_sigma`` the model returns
  (B, C, H, W) and the reverse variance is *fixed-small*, i.e. the true posterior variance
  beta_tilde_t (log clipped at t = 0). Fixed-small is chosen because it is the variance that the
  learned-range interpolation reduces to at v = -1 and needs no special case at t = 0.
* Training loss ("hybrid", DiT's MSE with learned sigma): ``loss = mse + vb`` per sample, where mse is
  the eps-prediction error averaged over non-batch dims and vb is the KL term of the variational
  bound in bits per dim, computed with the model's mean stop-gradiented (it trains only the
  variance). At t = 0 vb is the discretised Gaussian decoder NLL (256 bins of width 2/255). Without
  ``learn_sigma`` vb is zero. There is no rescaling by T/1000.
* Sampling: ancestral DDPM (``p_sample_loop``) and DDIM (``ddim_sample_loop``). With ``seeds`` every
  sample draws its initial noise and all per-step noise from its own CPU ``torch.Generator``, so a
  sample does not depend on the batch it is generated in.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "q_sample",
    "linear_betas",
    "space_timesteps",
    "GaussianDiffusion",
    "create_diffusion",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
]


# --------------------------------------------------------------------------------------------------
# Schedules and respacing
# --------------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """Linear beta schedule from 1e-4*s to 0.02*s (float64), s = 1000 / T."""
    if num_timesteps < 1:
        raise ValueError("num_timesteps must be positive")
    scale = 1000.0 / num_timesteps
    return np.linspace(1e-4 * scale, 0.02 * scale, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: int | str) -> set[int]:
    """Timesteps of the original process to keep, ADM semantics.

    ``section_counts`` is an int (one section), a comma-separated string of per-section counts
    (the T steps are split into equal sections and each is strided evenly, ends included), or
    ``"ddimN"``: the integer stride ``range(0, T, k)`` that gives exactly N steps.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            wanted = int(text[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            if wanted == num_timesteps:
                return set(range(num_timesteps))
            raise ValueError(f"cannot get exactly {wanted} steps with an integer stride of {num_timesteps}")
        counts = [int(part) for part in text.split(",") if part.strip()]
    else:
        counts = [int(section_counts)]
    if not counts:
        raise ValueError("empty section_counts")

    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        if count < 1:
            raise ValueError("each section needs at least one step")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


# --------------------------------------------------------------------------------------------------
# Gaussian helpers
# --------------------------------------------------------------------------------------------------


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of 8-bit data x in [-1, 1] under a discretised Gaussian.

    Bin k is centred at -1 + 2k/255 with half-width 1/255; the outermost bins extend to -inf/+inf,
    so the probabilities of the 256 bins sum to one. Uses the exact normal CDF.
    """
    centred = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centred + 1.0 / 255.0)
    lower = inv_std * (centred - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)              # log P(z < upper)
    log_sf_lower = torch.special.log_ndtr(-lower)              # log P(z > lower)
    # Middle bins: P(lower < z < upper), computed on whichever side of 0 is more accurate.
    mid = torch.where(
        lower > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mid = torch.log(mid.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


def _extract(arr: np.ndarray, t: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Gather float64 schedule values at indices t into a float32 tensor broadcastable to shape."""
    values = arr[t.detach().cpu().numpy()]
    out = torch.as_tensor(values, dtype=torch.float32, device=t.device)
    return out.reshape(out.shape + (1,) * (len(shape) - 1))


# --------------------------------------------------------------------------------------------------
# The forward process
# --------------------------------------------------------------------------------------------------


def q_sample(x0: Tensor, abar: float | np.ndarray, noise: Tensor) -> Tensor:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: the forward process at noise level abar (alpha-bar_t).

    The one place this formula is written (training, PSNR, Jacobians, attention maps and the PCA basis
    all noise through it). ``abar``: one float for the whole batch (the square roots are Python floats),
    or a float64 array (B,) with one level per sample (square roots in float64, then float32 tensors
    broadcast over x0's trailing dimensions, as :func:`_extract` gathers schedule values).
    """
    if isinstance(abar, (int, float)):  # np.float64 is a float
        return math.sqrt(abar) * x0 + math.sqrt(1.0 - abar) * noise
    abar = np.asarray(abar, dtype=np.float64)

    def per_sample(values: np.ndarray) -> Tensor:
        coef = torch.as_tensor(values, dtype=torch.float32, device=x0.device)
        return coef.reshape(coef.shape + (1,) * (x0.ndim - coef.ndim))

    return per_sample(np.sqrt(abar)) * x0 + per_sample(np.sqrt(1.0 - abar)) * noise


# --------------------------------------------------------------------------------------------------
# The diffusion
# --------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """DDPM with eps prediction and (optionally) learned-range variance."""

    def __init__(self, betas: np.ndarray, *, learn_sigma: bool = True,
                 timestep_map: np.ndarray | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError("betas must be a non-empty 1-D array")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.learn_sigma = bool(learn_sigma)
        self.num_timesteps = int(len(betas))
        if timestep_map is None:
            timestep_map = np.arange(self.num_timesteps)
        timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if timestep_map.shape != (self.num_timesteps,):
            raise ValueError("timestep_map must have one entry per timestep")
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: clip its log with the t = 1 value (as ADM).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)

    # -- model access ------------------------------------------------------------------------------

    def _wrap_model(self, model: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """Return a callable taking respaced indices that calls ``model`` with original timesteps."""
        def wrapped(x: Tensor, t: Tensor, **kwargs) -> Tensor:
            t_orig = self.timestep_map.to(t.device)[t]
            return model(x, t_orig, **kwargs)
        return wrapped

    def _split_output(self, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        c = x.shape[1]
        if self.learn_sigma:
            if out.shape[1] != 2 * c:
                raise ValueError(f"learn_sigma model must output {2 * c} channels, got {out.shape[1]}")
            return out[:, :c], out[:, c:]
        if out.shape[1] != c:
            raise ValueError(f"model must output {c} channels, got {out.shape[1]}")
        return out, None

    # -- forward process ---------------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x0) with the given noise; t: (B,) respaced indices."""
        return q_sample(x0, self.alphas_cumprod[t.detach().cpu().numpy()], noise)

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = (_extract(self.posterior_mean_coef1, t, xt.shape) * x0
                + _extract(self.posterior_mean_coef2, t, xt.shape) * xt)
        variance = _extract(self.posterior_variance, t, xt.shape)
        log_variance = _extract(self.posterior_log_variance_clipped, t, xt.shape)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, xt.shape) * xt
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, xt.shape) * eps)

    def predict_eps_from_xstart(self, xt: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, xt.shape) * xt - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, xt.shape))

    # -- reverse process ---------------------------------------------------------------------------

    def _p_mean_variance_from_output(self, out: Tensor, xt: Tensor, t: Tensor, *,
                                     clip_denoised: bool) -> dict[str, Tensor]:
        eps, v = self._split_output(out, xt)
        if v is not None:
            min_log = _extract(self.posterior_log_variance_clipped, t, xt.shape)
            max_log = _extract(self.log_betas, t, xt.shape)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            # Fixed-small: the true posterior variance (log clipped at t = 0).
            variance = _extract(self.posterior_variance, t, xt.shape).expand_as(xt)
            log_variance = _extract(self.posterior_log_variance_clipped, t, xt.shape).expand_as(xt)
        pred_xstart = self.predict_xstart_from_eps(xt, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, xt, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "eps": eps}

    def p_mean_variance(self, model, xt: Tensor, t: Tensor, *, model_kwargs: dict | None = None,
                        clip_denoised: bool = True) -> dict[str, Tensor]:
        """Mean/variance of p(x_{t-1} | x_t); also the predicted x0 and eps. t is the respaced index."""
        out = self._wrap_model(model)(xt, t, **(model_kwargs or {}))
        return self._p_mean_variance_from_output(out, xt, t, clip_denoised=clip_denoised)

    # -- training ----------------------------------------------------------------------------------

    def _vb_terms_bpd(self, out: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-sample VLB term in bits/dim: KL for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        p = self._p_mean_variance_from_output(out, xt, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=p["mean"], log_scales=0.5 * p["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0: Tensor, t: Tensor, *, noise: Tensor | None = None,
                        model_kwargs: dict | None = None) -> dict[str, Tensor]:
        """Hybrid loss, per sample: {'loss', 'mse', 'vb'}, each of shape (B,)."""
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        out = self._wrap_model(model)(xt, t, **(model_kwargs or {}))
        eps, v = self._split_output(out, x0)
        mse = mean_flat((noise - eps) ** 2)
        if v is not None:
            # Stop-gradient on the mean: the VLB term trains only the variance.
            frozen = torch.cat([eps.detach(), v], dim=1)
            vb = self._vb_terms_bpd(frozen, x0, xt, t)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -- sampling ----------------------------------------------------------------------------------

    @staticmethod
    def _device_of(model, device) -> torch.device:
        if device is not None:
            return torch.device(device)
        if isinstance(model, torch.nn.Module):
            for p in model.parameters():
                return p.device
        return torch.device("cpu")

    @staticmethod
    def _draw(shape, generators: list[torch.Generator] | None, device: torch.device) -> Tensor:
        if generators is None:
            return torch.randn(shape, device=device)
        per_sample = tuple(shape[1:])
        return torch.stack([torch.randn(per_sample, generator=g) for g in generators]).to(device)

    def _init_sampling(self, model, shape, seeds, noise, device):
        device = self._device_of(model, device)
        shape = tuple(shape)
        generators = None
        if seeds is not None:
            if len(seeds) != shape[0]:
                raise ValueError(f"got {len(seeds)} seeds for a batch of {shape[0]}")
            generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        # The initial draw is made even when `noise` overrides it, so that the per-step noise of a
        # seeded sample is the same with or without an explicit initial noise.
        img = self._draw(shape, generators, device) if (generators is not None or noise is None) else None
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
            img = noise.to(device=device, dtype=torch.float32)
        return device, shape, generators, img

    def _steps(self, progress: bool):
        steps = list(range(self.num_timesteps))[::-1]
        if progress:
            try:
                from tqdm.auto import tqdm
                return tqdm(steps)
            except ImportError:
                pass
        return steps

    @torch.no_grad()
    def p_sample_loop(self, model, shape, *, seeds: list[int] | None = None, noise: Tensor | None = None,
                      device=None, model_kwargs: dict | None = None, clip_denoised: bool = True,
                      progress: bool = False) -> Tensor:
        """Ancestral DDPM sampling from t = T-1 down to 0 (no noise added at t = 0)."""
        device, shape, generators, img = self._init_sampling(model, shape, seeds, noise, device)
        for i in self._steps(progress):
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            out = self.p_mean_variance(model, img, t, model_kwargs=model_kwargs, clip_denoised=clip_denoised)
            if i > 0:
                z = self._draw(shape, generators, device)
                img = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
            else:
                img = out["mean"]
        return img

    @torch.no_grad()
    def ddim_sample_loop(self, model, shape, *, seeds: list[int] | None = None, noise: Tensor | None = None,
                         eta: float = 0.0, device=None, model_kwargs: dict | None = None,
                         clip_denoised: bool = True, progress: bool = False) -> Tensor:
        """DDIM sampling (Song et al.); eta = 0 is deterministic, eta = 1 matches DDPM's variance."""
        device, shape, generators, img = self._init_sampling(model, shape, seeds, noise, device)
        for i in self._steps(progress):
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            out = self.p_mean_variance(model, img, t, model_kwargs=model_kwargs, clip_denoised=clip_denoised)
            # Re-derive eps from the (possibly clipped) x0 prediction, as ADM does.
            eps = self.predict_eps_from_xstart(img, t, out["pred_xstart"])
            abar = _extract(self.alphas_cumprod, t, img.shape)
            abar_prev = _extract(self.alphas_cumprod_prev, t, img.shape)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            img = (out["pred_xstart"] * torch.sqrt(abar_prev)
                   + torch.sqrt((1 - abar_prev - sigma ** 2).clamp(min=0.0)) * eps)
            if i > 0 and eta > 0:
                img = img + sigma * self._draw(shape, generators, device)
        return img


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------


def create_diffusion(timestep_respacing: int | str | None = None, *, num_timesteps: int = 1000,
                     learn_sigma: bool = True) -> GaussianDiffusion:
    """Linear-schedule diffusion with T = num_timesteps, optionally respaced (e.g. 250 or "ddim50")."""
    betas = linear_betas(num_timesteps)
    if timestep_respacing is None or timestep_respacing == "":
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    kept = sorted(space_timesteps(num_timesteps, timestep_respacing))
    abar = np.cumprod(1.0 - betas)
    new_betas = []
    last = 1.0
    for i in kept:
        new_betas.append(1.0 - abar[i] / last)
        last = abar[i]
    return GaussianDiffusion(np.array(new_betas, dtype=np.float64), learn_sigma=learn_sigma,
                             timestep_map=np.array(kept, dtype=np.int64))
