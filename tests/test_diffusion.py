"""Tests for diffbias.diffusion: schedules, posterior, losses, respacing and samplers."""

import math

import numpy as np
import pytest
import torch

from diffbias.diffusion import (
    GaussianDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    q_sample,
    space_timesteps,
)


# ---------------------------------------------------------------------------------------------- helpers


class PerPixelModel(torch.nn.Module):
    """A tiny per-sample model: 1x1 conv plus a timestep-dependent bias (tanh on the v channels)."""

    def __init__(self, channels=2, learn_sigma=True):
        super().__init__()
        self.c = channels
        self.learn_sigma = learn_sigma
        self.conv = torch.nn.Conv2d(channels, channels * (2 if learn_sigma else 1), 1)

    def forward(self, x, t, y=None):
        out = self.conv(x) + 0.1 * torch.sin(t.float() / 100.0).view(-1, 1, 1, 1)
        if self.learn_sigma:
            out = torch.cat([out[:, : self.c], torch.tanh(out[:, self.c:])], dim=1)
        return out


# ---------------------------------------------------------------------------------------------- schedules


def test_linear_betas():
    b = linear_betas(1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b100 = linear_betas(100)
    assert b100[0] == pytest.approx(1e-3) and b100[-1] == pytest.approx(0.2)


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert len(space_timesteps(1000, "ddim7")) == 7
    s = space_timesteps(1000, 10)
    assert len(s) == 10 and min(s) == 0 and max(s) == 999
    assert space_timesteps(1000, "1000") == set(range(1000))
    # Two sections of 50 steps: 2 from the first, 5 from the second.
    s2 = space_timesteps(100, "2,5")
    assert sorted(s2) == [0, 49, 50, 62, 74, 87, 99]
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")  # no integer stride gives 999 steps
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


def test_respaced_betas_reproduce_cumulative_alphas():
    base = create_diffusion(None)
    for respacing in (50, "ddim25", "10,20,5"):
        d = create_diffusion(respacing)
        kept = d.timestep_map.numpy()
        assert np.all(np.diff(kept) > 0)
        assert d.num_timesteps == len(kept)
        np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    full = create_diffusion(None)
    assert torch.equal(full.timestep_map, torch.arange(1000))


def test_respaced_diffusion_calls_model_with_original_timesteps():
    d = create_diffusion("ddim10")
    seen = []

    def model(x, t, **kw):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    x = torch.zeros(3, 1, 2, 2)
    t = torch.tensor([0, 5, 9])
    d.p_mean_variance(model, x, t)
    assert seen[-1].tolist() == [0, 500, 900]
    d.training_losses(model, x, t)
    assert seen[-1].tolist() == [0, 500, 900]
    seen.clear()
    d.ddim_sample_loop(model, (1, 1, 2, 2), seeds=[0])
    assert [s.item() for s in seen] == list(range(900, -1, -100))


# ---------------------------------------------------------------------------------------------- posterior


def test_posterior_matches_bayes_rule():
    d = create_diffusion(None, num_timesteps=100)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 1, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    xt = torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 30, 70, 99])
    mean, var, log_var = d.q_posterior_mean_variance(x0.float(), xt.float(), t)
    # Direct Gaussian conditioning: prior q(x_{t-1}|x0) = N(sqrt(abar') x0, 1 - abar'),
    # likelihood q(x_t|x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta).
    tn = t.numpy()
    abar_prev = d.alphas_cumprod[tn - 1]
    beta = d.betas[tn]
    alpha = 1 - beta
    prec = 1 / (1 - abar_prev) + alpha / beta
    var_ref = torch.tensor(1 / prec).view(-1, 1, 1, 1)
    mean_ref = var_ref * (torch.tensor(np.sqrt(abar_prev) / (1 - abar_prev)).view(-1, 1, 1, 1) * x0
                          + torch.tensor(np.sqrt(alpha) / beta).view(-1, 1, 1, 1) * xt)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double().expand_as(mean_ref), var_ref.expand_as(mean_ref), rtol=1e-5, atol=0)
    torch.testing.assert_close(log_var.double(), torch.log(var_ref), rtol=1e-5, atol=1e-6)
    # At t = 0 the posterior is a point mass at x0; its log variance is clipped with the t = 1 value.
    t0 = torch.zeros(5, dtype=torch.long)
    mean0, var0, log_var0 = d.q_posterior_mean_variance(x0.float(), xt.float(), t0)
    torch.testing.assert_close(mean0, x0.float())
    assert torch.all(var0 == 0)
    assert torch.allclose(log_var0, torch.tensor(math.log(d.posterior_variance[1]), dtype=torch.float32))


@pytest.mark.parametrize("respacing", [None, 50])
def test_q_sample_is_bit_identical_to_the_schedule_tables(respacing):
    # Training noises through diffusion.q_sample; it must give exactly what the precomputed float64 square-root
    # tables gave (gathered to float32), and the one-level form (PSNR, Jacobians, attention maps) the same numbers.
    d = create_diffusion(respacing)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(d.num_timesteps, 3, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.arange(d.num_timesteps)
    tables = (torch.as_tensor(d.sqrt_alphas_cumprod, dtype=torch.float32)[:, None, None, None] * x0
              + torch.as_tensor(d.sqrt_one_minus_alphas_cumprod, dtype=torch.float32)[:, None, None, None] * eps)
    assert torch.equal(d.q_sample(x0, t, eps), tables)
    one_level = torch.stack([q_sample(x0[i], float(d.alphas_cumprod[i]), eps[i]) for i in range(len(t))])
    assert torch.equal(one_level, tables)
    i = d.num_timesteps // 2
    abar = float(d.alphas_cumprod[i])
    assert torch.equal(q_sample(x0[i], abar, eps[i]), math.sqrt(abar) * x0[i] + math.sqrt(1.0 - abar) * eps[i])


def test_predict_xstart_from_eps_inverts_q_sample():
    d = create_diffusion(None)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(6, 3, 4, 4, generator=gen)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    xt = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predict_xstart_from_eps(xt, t, noise), x0, rtol=0, atol=2e-4)
    torch.testing.assert_close(d.predict_eps_from_xstart(xt[1:], t[1:], x0[1:]), noise[1:], rtol=0, atol=2e-3)


def test_learned_range_variance_endpoints():
    d = create_diffusion(None, num_timesteps=100)
    x = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([0, 50])
    for v, ref in ((1.0, d.log_betas), (-1.0, d.posterior_log_variance_clipped)):
        def model(x, t, v=v):
            return torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        out = d.p_mean_variance(model, x, t)
        torch.testing.assert_close(out["log_variance"][:, 0, 0, 0], torch.tensor(ref[[0, 50]], dtype=torch.float32))
    # Fixed-small variance without learn_sigma.
    d2 = create_diffusion(None, num_timesteps=100, learn_sigma=False)
    out = d2.p_mean_variance(lambda x, t: torch.zeros_like(x), x, t)
    torch.testing.assert_close(out["variance"][:, 0, 0, 0],
                               torch.tensor(d2.posterior_variance[[0, 50]], dtype=torch.float32))


# ---------------------------------------------------------------------------------------------- likelihood terms


def test_normal_kl():
    m = torch.randn(10)
    lv = torch.randn(10)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(10), atol=1e-6)
    kl = normal_kl(m, lv, m + 0.3, lv - 0.5)
    assert torch.all(kl > 0)
    # Closed form for unit variances: (mu1 - mu2)^2 / 2.
    torch.testing.assert_close(normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(-1.0), torch.tensor(0.0)),
                               torch.tensor(2.0))


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.05)), (0.97, math.log(0.01)), (-0.5, math.log(0.5))])
def test_discretized_likelihood_sums_to_one(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(bins, means=torch.full_like(bins, mean),
                                               log_scales=torch.full_like(bins, log_scale))
    assert torch.all(logp <= 0)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- training loss


def test_training_losses_per_sample_and_vb_stop_gradient():
    torch.manual_seed(0)
    d = create_diffusion(None)
    model = PerPixelModel(channels=2)
    x0 = torch.rand(4, 2, 4, 4) * 2 - 1
    t = torch.tensor([0, 1, 400, 999])
    losses = d.training_losses(model, x0, t)
    for key in ("loss", "mse", "vb"):
        assert losses[key].shape == (4,)
        assert torch.isfinite(losses[key]).all()
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert torch.all(losses["vb"] >= 0)

    # vb must not reach the eps output channels (rows 0..C-1 of the conv), only the v channels.
    model.zero_grad()
    losses["vb"].sum().backward()
    g = model.conv.weight.grad[:, :, 0, 0]
    assert torch.all(g[:2] == 0) and torch.all(model.conv.bias.grad[:2] == 0)
    assert g[2:].abs().sum() > 0
    # and mse reaches only the eps channels.
    model.zero_grad()
    d.training_losses(model, x0, t, noise=torch.randn_like(x0))["mse"].sum().backward()
    g = model.conv.weight.grad[:, :, 0, 0]
    assert torch.all(g[2:] == 0) and g[:2].abs().sum() > 0


def test_training_losses_optimal_vb_is_small():
    """With the true eps and v = -1 (true posterior variance), the KL term vanishes for t > 0."""
    d = create_diffusion(None, num_timesteps=100)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([5, 50, 99])

    def oracle(x, t_orig):
        return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    out = d.training_losses(oracle, x0, t, noise=noise)
    assert torch.all(out["mse"] == 0)
    assert torch.all(out["vb"] < 1e-3)


def test_training_losses_without_learn_sigma():
    d = create_diffusion(None, learn_sigma=False)
    model = PerPixelModel(channels=1, learn_sigma=False)
    out = d.training_losses(model, torch.zeros(2, 1, 3, 3), torch.tensor([0, 10]))
    assert torch.all(out["vb"] == 0) and torch.equal(out["loss"], out["mse"])


# ---------------------------------------------------------------------------------------------- sampling


def test_p_sample_loop_seeds_are_batch_independent():
    torch.manual_seed(0)
    d = create_diffusion(20)
    model = PerPixelModel(channels=2).eval()
    seeds = [11, 22, 33, 44]
    batch = d.p_sample_loop(model, (4, 2, 4, 4), seeds=seeds)
    alone = d.p_sample_loop(model, (1, 2, 4, 4), seeds=[33])
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=1e-5)
    reordered = d.p_sample_loop(model, (2, 2, 4, 4), seeds=[44, 11])
    torch.testing.assert_close(reordered[0], batch[3], rtol=0, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])
    assert batch.abs().max() < 10 and not batch.requires_grad
    # An explicit initial noise overrides the seeded one.
    other = d.p_sample_loop(model, (1, 2, 4, 4), seeds=[33], noise=torch.zeros(1, 2, 4, 4))
    assert not torch.allclose(other, alone)


@pytest.mark.parametrize("respacing", ["ddim10", None])
def test_oracle_model_recovers_the_single_data_point(respacing):
    base = create_diffusion(None, num_timesteps=100)
    d = create_diffusion(respacing, num_timesteps=100)
    gen = torch.Generator().manual_seed(5)
    x_star = torch.rand(1, 1, 3, 3, generator=gen) * 1.6 - 0.8
    abar = torch.tensor(base.alphas_cumprod, dtype=torch.float32)

    def oracle(x, t_orig):  # the exact eps given x_t, for data concentrated on x_star; ORIGINAL t
        a = abar[t_orig].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x_star) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    sample = d.ddim_sample_loop(oracle, (3, 1, 3, 3), seeds=[0, 1, 2])
    torch.testing.assert_close(sample, x_star.expand(3, -1, -1, -1), rtol=0, atol=1e-4)
    if respacing is None:
        sample = d.p_sample_loop(oracle, (2, 1, 3, 3), seeds=[0, 1])
        torch.testing.assert_close(sample, x_star.expand(2, -1, -1, -1), rtol=0, atol=1e-4)


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_seeded():
    d = create_diffusion("ddim10")
    model = PerPixelModel(channels=1).eval()
    noise = torch.randn(2, 1, 3, 3)
    a = d.ddim_sample_loop(model, (2, 1, 3, 3), noise=noise)
    b = d.ddim_sample_loop(model, (2, 1, 3, 3), noise=noise)
    assert torch.equal(a, b)
    c = d.ddim_sample_loop(model, (2, 1, 3, 3), seeds=[1, 2], eta=1.0)
    e = d.ddim_sample_loop(model, (1, 1, 3, 3), seeds=[2], eta=1.0)
    torch.testing.assert_close(c[1:], e, rtol=0, atol=1e-5)


def test_create_diffusion_variants():
    assert create_diffusion(None).num_timesteps == 1000
    assert create_diffusion("").num_timesteps == 1000
    assert create_diffusion(250).num_timesteps == 250
    assert create_diffusion("ddim50").num_timesteps == 50
    d = GaussianDiffusion(linear_betas(50), learn_sigma=False)
    assert d.num_timesteps == 50 and d.timestep_map.dtype == torch.long


def test_vb_at_t0_is_discretised_decoder_nll():
    d = create_diffusion(None, num_timesteps=100)
    gen = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (2, 1, 4, 4), generator=gen).float() / 127.5 - 1)  # 8-bit data
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.zeros(2, dtype=torch.long)

    def model(x, t_orig):  # eps slightly off, v = 0 (midpoint of the log-variance range)
        return torch.cat([noise + 0.05, torch.zeros_like(noise)], dim=1)

    vb = d.training_losses(model, x0, t, noise=noise)["vb"]
    xt = d.q_sample(x0, t, noise)
    mean = d.predict_xstart_from_eps(xt, t, noise + 0.05)  # at t = 0 the posterior mean is x0_hat
    log_var = 0.5 * (math.log(d.betas[0]) + d.posterior_log_variance_clipped[0])
    # Reference: Gaussian mass over each pixel's bin, edges extended at +/-1, in float64.
    std = math.exp(0.5 * log_var)
    cdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    x, m = x0.double(), mean.double()
    hi = torch.where(x > 0.999, torch.ones_like(x), cdf((x + 1 / 255 - m) / std))
    lo = torch.where(x < -0.999, torch.zeros_like(x), cdf((x - 1 / 255 - m) / std))
    ref = -(torch.log(hi - lo)).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(vb.double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.all(vb > 0)
