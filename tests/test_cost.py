"""``python -m diffbias cost``: GPU-hours of a config from FLOP counts and a throughput, before anything runs;
the paper configs' big models are counted on the meta device, in seconds, at their published sizes."""

import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffbias import cost
from diffbias.cli import main
from diffbias.config import all_runs, load_config, validate_config
from diffbias.latents import model_input

ROOT = Path(__file__).resolve().parents[1]


def micro():
    return validate_config(yaml.safe_load((ROOT / "workflow/configs/micro.yaml").read_text()))


def test_training_and_evaluation_flops_follow_the_config():
    cfg = micro()
    runs = cost.run_costs(cfg)
    assert len(runs) == len(all_runs(cfg)) == 4
    row = runs[(runs.variant == "dit") & (runs.N == 50)].iloc[0]
    f = 2 * row.gmacs / 1e3  # TFLOPs of one forward pass
    tr = cfg["training"]
    assert row.train == pytest.approx(3 * tr["steps"] * tr["batch_size"] * f)
    assert row.psnr == pytest.approx(2 * 8 * 5 * f)  # 2 splits x K=8 x 5 respaced steps
    assert row.fid == pytest.approx(8 * 5 * f)  # N=50 is in fid.N: 8 samples x 5 steps
    assert row.fid_curve == pytest.approx(2 * 8 * 5 * f)  # one snapshot + the final model
    small = runs[(runs.variant == "dit") & (runs.N == 10)].iloc[0]
    assert small.fid == 0 and small.fid_curve == 0
    # the local variant counts fewer attention MACs than the global one at the same shape
    assert runs[runs.variant == "dit_local"].gmacs.iloc[0] < row.gmacs


def test_gpu_hours_at_a_given_throughput_and_from_a_benchmark(tmp_path):
    cfg = micro()
    runs, summary, note = cost.gpu_hours(cfg, tflops=1e-3)
    total = summary.iloc[-1]
    assert total["study"].startswith("total") and total["runs"] == 4
    flops = cost.run_costs(cfg)
    assert total["train_gpu_h"] == pytest.approx(flops["train"].sum() / 1e-3 / 3600)
    assert total["total_gpu_h"] == pytest.approx(total["train_gpu_h"] + total["eval_gpu_h"])
    assert "1e-03" in note or "0.001" in note
    # twice the throughput, half the hours
    _, fast, _ = cost.gpu_hours(cfg, tflops=2e-3)
    assert fast.iloc[-1]["total_gpu_h"] == pytest.approx(total["total_gpu_h"] / 2)
    bench = tmp_path / "training.parquet"
    pd.DataFrame({"preset": ["DiT-T/2", "UNet-004"], "achieved_tflops": [1e-3, 5e-3]}).to_parquet(bench)
    _, from_bench, note = cost.gpu_hours(cfg, benchmark=str(bench))
    assert from_bench.iloc[-1]["total_gpu_h"] == pytest.approx(total["total_gpu_h"])  # DiT-T/2's own rate
    assert "DiT-T/2" in note


def test_cost_command_on_the_default_config(capsys, tmp_path):
    main(["cost", "--configfile", str(ROOT / "config.yaml"), "--out", str(tmp_path / "cost.parquet")])
    out = capsys.readouterr().out
    # 4 variants x 3 N, and the baseline's split-B twin at every N
    assert "15 distinct runs" in out and "| locality" in out and "124.8 TFLOP/s" in out
    assert len(pd.read_parquet(tmp_path / "cost.parquet")) == 15


# Forward GMACs per image that the paper configs' models must be counted at (3x32x32 inputs): our counts of the
# published models (README "Parameter and FLOP counts"; the DiT-XS/1, DiT-S/1 pair is tests/test_flops.py's).
PAPER_GMACS = {
    "UViT-S/2": 12.271377408, "UViT-S/2-GMM": 12.312378784,  # paper-000, CIFAR-10, class-conditional (257 tokens)
    "DiT-XS/1": 15.738791088, "DiT-S/1": 31.460969472, "UNet-004": 9.486446592,  # paper-004
}
# Published GFLOPs (at 4x32x32 latents; our 3-channel pixel inputs differ by < 0.02%), relative tolerance.
PUBLISHED_GFLOPS = {"DiT-XL/2": (118.64, 1e-3), "DiMR-XL/2R": (160, 2e-3), "DiffuSSM-XL": (305.80, 1e-3)}


def test_cost_of_every_paper_config(capsys):
    """Every paper config's cost in seconds (its models counted on the meta device; counting DiffuSSM-XL's
    forward on real tensors took over 10 minutes), one row per study plus the total, and the models counted at
    their published sizes."""
    seconds = {}
    for n in (0, 2, 3, 4):
        path = ROOT / f"workflow/configs/paper-00{n}.yaml"
        cfg = load_config(path)
        cost.forward_gmacs.cache_clear()  # each config counts its own models
        start = time.perf_counter()
        if n == 3:  # through the command line once
            main(["cost", "--configfile", str(path)])
            out = capsys.readouterr().out
            assert "paper-003.yaml: 10 distinct runs" in out and "Wall-clock hours per run" in out
            assert all(f"| {study} " in out for study in cfg["studies"])
        runs, summary, note = cost.gpu_hours(cfg)
        seconds[n] = time.perf_counter() - start
        assert list(summary["study"]) == sorted(cfg["studies"]) + ["total (distinct runs)"]
        assert len(runs) == len(all_runs(cfg)) and (runs["gmacs"] > 0).all()
        assert (summary["train_gpu_h"] > 0).all() and (summary["eval_gpu_h"] > 0).all()
        assert summary.iloc[-1]["total_gpu_h"] == pytest.approx(runs["total"].sum())
        by_preset = runs.groupby(["preset", "variant", "dataset"])["gmacs"].first()
        for (preset, variant, dataset), gmacs in by_preset.items():
            options = cfg["variants"][variant].get("options")
            if model_input(cfg["datasets"][dataset])[1] != 32:  # paper-003's 512 block: 64x64x4 latents
                continue
            if preset in PAPER_GMACS and not options:
                assert gmacs == pytest.approx(PAPER_GMACS[preset], abs=1e-9), (n, variant, gmacs)
            if preset in PUBLISHED_GFLOPS and not options:
                published, tolerance = PUBLISHED_GFLOPS[preset]
                assert gmacs == pytest.approx(published, rel=tolerance), (n, variant, gmacs)
    print("cost seconds per paper config:", {k: round(v, 1) for k, v in seconds.items()})
    assert seconds[3] < 60, seconds  # about 10 s on 2 shared cores


@pytest.mark.slow
def test_cost_of_paper_004(capsys):
    main(["cost", "--configfile", str(ROOT / "workflow/configs/paper-004.yaml")])
    out = capsys.readouterr().out
    # 381 + UNet-004 (figs. 2-3), app. C's weight sharing and PCA runs, table 1's † rows (6 data sets x 4 x 2 N),
    # and the split-B twins of the two-model study (xs_b on ImageNet, 5 N x 3 seeds)
    assert "483 distinct runs" in out
    cfg = load_config(ROOT / "workflow/configs/paper-004.yaml")
    _, summary, _ = cost.gpu_hours(cfg)
    total = summary.iloc[-1]
    # 400k steps x batch 64 of DiT-XS/1 (15.7 GMACs) and DiT-S/1 (31.5 GMACs): thousands of GPU-hours
    assert 1000 < total["train_gpu_h"] < 5000 and total["eval_gpu_h"] < total["train_gpu_h"]


def test_wall_clock_hours_divide_a_training_by_its_gpus():
    cfg = micro()
    cfg["variants"]["dit"]["training"] = {"gpus_per_run": 4}
    runs, _, _ = cost.gpu_hours(cfg, tflops=1e-3)
    dit, local = runs[runs.variant == "dit"], runs[runs.variant == "dit_local"]
    assert (dit.gpus == 4).all() and (local.gpus == 1).all()
    assert dit.train_wall_h.tolist() == pytest.approx((dit.train / 4).tolist())
    assert local.train_wall_h.tolist() == pytest.approx(local.train.tolist())
    assert runs.wall_h.tolist() == pytest.approx((runs.train_wall_h + runs.evaluation).tolist())
    table = cost.format_wall_clock(runs)
    assert table.startswith("Wall-clock hours per run") and "| dit " in table and "train_wall_h" in table


def test_latent_runs_are_priced_at_the_latent_grid(monkeypatch):
    cfg = micro()
    cfg["datasets"]["fmnist8"] = dict(cfg["datasets"]["fmnist8"], channels=3, resolution=64, latents={"autoencoder": "vae"})
    shapes = []
    monkeypatch.setattr(cost, "forward_gmacs", lambda backbone, options, c, side, classes: shapes.append((c, side)) or 1.0)
    cost.run_costs(cfg)
    assert set(shapes) == {(4, 8)}  # SD's VAE: 64x64 RGB -> 4 x 8 x 8
