import math

import numpy as np
import pytest
import torch

from diffbias.diffusion import create_diffusion
from diffbias.metrics.psnr import psnr_curve, psnr_from_mse, psnr_gap


class OracleEps(torch.nn.Module):
    """Knows the clean images: returns the exact noise, so one-step denoising is perfect."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.w = torch.nn.Parameter(torch.zeros(()))
        ab = create_diffusion(None).alphas_cumprod
        self.abar = torch.tensor(ab)

    def forward(self, x, t, y=None):
        a = self.abar[t].float().view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0[: x.shape[0]]) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)


class ZeroEps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])


def test_psnr_formula_against_independent_computation():
    # Seed eq. 4: 10 (log10 M^2 - log10 mean_k MSE_k), M = 2 (log base 10, dB)
    mses = np.array([0.01, 0.04, 0.1])
    assert psnr_from_mse(mses.mean()) == pytest.approx(10 * math.log10(4 / 0.05))


def test_zero_eps_model_gives_the_closed_form_psnr():
    # x0_hat = x_t / sqrt(abar), clipped to [-1, 1] or not; MSE averaged over the images first, then PSNR (seed eq. 4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    df = psnr_curve(ZeroEps(), x0, respacing=10, noise_seed=5, batch_size=4, clip=True)
    unclipped = psnr_curve(ZeroEps(), x0, respacing=10, noise_seed=5, batch_size=4)
    diff = create_diffusion(10)
    noise_gen = torch.Generator().manual_seed(5)
    for i, row in df.iterrows():
        eps = torch.randn(x0.shape, generator=noise_gen).double()
        ab = float(diff.alphas_cumprod[i])
        xt = math.sqrt(ab) * x0.double() + math.sqrt(1 - ab) * eps
        err = ((xt / math.sqrt(ab)).clamp(-1, 1) - x0.double()).pow(2).flatten(1).mean(1)
        assert row["psnr"] == pytest.approx(10 * math.log10(4 / err.mean().item()), rel=1e-5)
        raw = ((xt / math.sqrt(ab)) - x0.double()).pow(2).flatten(1).mean(1)  # the seed's eq. 3: no clip
        assert unclipped["psnr"][i] == pytest.approx(10 * math.log10(4 / raw.mean().item()), rel=1e-5)
    assert list(df["t"]) == diff.timestep_map.tolist()
    assert (unclipped["psnr"] < df["psnr"] - 1).iloc[-1]  # near t = T the unclipped estimate blows up


def test_oracle_has_high_psnr_and_gap_is_truncated_at_zero():
    x0 = torch.rand(5, 1, 4, 4) * 2 - 1
    df = psnr_curve(OracleEps(x0), x0, respacing=5)
    assert (df["psnr"] > 80).all()
    gap = psnr_gap(ZeroEps(), x0, x0 * 0.5, respacing=5)
    assert (gap["gap"] >= 0).all()
    assert (gap["gap"] == (gap["psnr_train"] - gap["psnr_test"]).clip(lower=0)).all()


def test_same_noise_for_every_model():
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    a = psnr_curve(ZeroEps(), x0, respacing=5, noise_seed=1)
    b = psnr_curve(ZeroEps(), x0, respacing=5, noise_seed=1, batch_size=1)
    np.testing.assert_allclose(a["psnr"], b["psnr"], rtol=1e-6)


def test_gap_bootstrap_over_the_k_images():
    from diffbias.metrics.psnr import gap_bootstrap

    steps = 4
    # every image has the same error: every resample is the point estimate, 10 log10(2) = 3.01 dB at each step
    same = gap_bootstrap(np.full((10, steps), 0.01), np.full((30, steps), 0.02), resamples=50)
    np.testing.assert_allclose(same, 10 * np.log10(2), rtol=1e-12)
    rng = np.random.default_rng(0)
    train, test = rng.gamma(2.0, 0.005, size=(300, steps)), rng.gamma(2.0, 0.01, size=(300, steps))
    point = np.clip(psnr_from_mse(train.mean(0)) - psnr_from_mse(test.mean(0)), 0, None).mean()
    reps = gap_bootstrap(train, test, resamples=500, seed=1).mean(axis=1)
    low, high = np.quantile(reps, [0.025, 0.975])
    assert low < point < high
    few = gap_bootstrap(train[:30], test[:30], resamples=500, seed=1).mean(axis=1)
    assert np.ptp(np.quantile(few, [0.025, 0.975])) > 2 * (high - low)  # 10x fewer images: ~3x wider
    np.testing.assert_array_equal(reps, gap_bootstrap(train, test, resamples=500, seed=1).mean(axis=1))  # seeded


def test_psnr_measurement_adds_its_intervals_beside_the_unchanged_columns(tiny_dataset):
    from diffbias.config import section_settings
    from diffbias.measurements import load, psnr
    from diffbias.runs import TrainedRun
    from diffbias.data import load_prepared

    load()
    images, labels, _ = load_prepared(str(tiny_dataset))
    spec = {"run": {"dataset": "tiny", "variant": "v", "N": 20, "seed": 0}, "dataset": {"test_size": 20}}
    run = TrainedRun(ZeroEps(), {"spec": spec, "step": 1, "num_classes": 0}, images, None, torch.device("cpu"), 1)
    cfg = section_settings(("evaluation", "psnr"), {"num_images": 8, "respacing": 5, "bootstrap": 200})
    table = psnr.compute(run, cfg).table
    assert list(table.columns[:5]) == ["step", "t", "psnr_train", "psnr_test", "gap"]
    assert (table["gap_low"] <= table["gap"] + 1e-9).all() and (table["gap"] <= table["gap_high"] + 1e-9).all()
    assert table["mean_gap_low"].nunique() == 1 and table["mean_gap_low"].iloc[0] <= table["gap"].mean()
    assert (table["K_train"] == 8).all() and (table["bootstrap"] == 200).all()
    per = psnr.gap_per_run(table.assign(dataset="tiny", variant="v", N=20, seed=0))
    assert per.iloc[0]["value"] == pytest.approx(table["gap"].mean()) and per.iloc[0]["low"] == table["mean_gap_low"].iloc[0]
    none = psnr.compute(run, dict(cfg, bootstrap=0)).table
    assert none["gap_low"].isna().all() and (none["gap"] == table["gap"]).all()
