"""Memorisation as the field measures it, with known answers: the nearest-neighbour search against brute force at
any chunking; the copy rule (d1/d2 < 1/3) on training images (all copies), fresh Gaussian noise and held-out test
images (none); a model that has memorised its training set (the optimal denoiser of the empirical distribution)
against its own samples; reproducibility of two copies of one model (1) and of two models on two disjoint images
each (they disagree, each copying its own set); the intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from diffbias import measurements
from diffbias.config import section_settings
from diffbias.data import load_prepared, prepare_dataset, run_split, to_model_range
from diffbias.diffusion import create_diffusion
from diffbias.metrics.nearest_neighbours import (Rows, as_vectors, bootstrap_interval, centred_unit, copy_ratio,
                                                 correlation, nearest, unit, wilson_interval)
from diffbias.runs import TrainedRun

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="Debian's dataset-fashion-mnist is not installed")


class EmpiricalDenoiser(torch.nn.Module):
    """The optimal denoiser of the empirical distribution of ``images`` (Kadkhodaie et al.'s memorising limit): x0_hat
    is the softmax-weighted average of the training images, so DDPM sampling returns training images. Outputs eps and
    a variance channel of -1 (the posterior variance), as a learn_sigma backbone does."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.register_buffer("images", images.reshape(len(images), -1))
        self.register_buffer("abar", torch.tensor(create_diffusion(None).alphas_cumprod, dtype=torch.float32))
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter gives sampling the model's device

    def forward(self, x, t, y=None):
        a = self.abar[t].view(-1, 1)
        flat = x.reshape(len(x), -1)
        d2 = ((flat[:, None, :] - a.sqrt()[:, :, None] * self.images[None]) ** 2).sum(-1)
        x0 = torch.softmax(-d2 / (2 * (1 - a)), dim=1) @ self.images
        eps = ((flat - a.sqrt() * x0) / (1 - a).sqrt()).reshape(x.shape)
        return torch.cat([eps, -torch.ones_like(eps)], 1)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """400 Fashion-MNIST images at 8x8 (prepared as the workflow prepares them)."""
    if not FMNIST.exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    out = tmp_path_factory.mktemp("pool") / "fmnist8.npz"
    prepare_dataset({"source": "fashion_mnist", "path": str(FMNIST), "resolution": 8, "channels": 1,
                     "max_images": 400}, str(out))
    return out


def spec(n: int, split: str = "A", variant: str = "dit") -> dict:
    s = {"run": {"dataset": "fmnist8", "variant": variant, "N": n, "seed": 0}, "dataset": {"test_size": 50}}
    return s | ({"split": split} if split != "A" else {})


def memorising_run(pool_path, n: int, split: str = "A", inputs: dict | None = None) -> TrainedRun:
    images, _, _ = load_prepared(str(pool_path))
    s = spec(n, split, "dit" if split == "A" else "dit_b")
    model = EmpiricalDenoiser(to_model_range(images[run_split(len(images), s)[0]]))
    return TrainedRun(model, {"spec": s, "step": 100, "num_classes": 0}, images, None, torch.device("cpu"), 1,
                      inputs or {})


def settings(name: str, **given) -> dict:
    measurements.load()
    return section_settings(("evaluation", name), given)


# ----------------------------------------------------------------------------------------------------
# The search and the statistics
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference_chunk, query_chunk", [(7, 5), (64, 1000), (5000, 3)])
def test_search_equals_brute_force_whatever_the_chunks(reference_chunk, query_chunk):
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 256, (300, 1, 4, 4), dtype=np.uint8)
    queries = rng.integers(0, 256, (40, 1, 4, 4), dtype=np.uint8)
    full = torch.cdist(as_vectors(queries).double(), as_vectors(reference).double()) / 4  # RMS over 16 pixels
    dist, idx = nearest(queries, reference, 3, reference_chunk=reference_chunk, query_chunk=query_chunk)
    want = full.topk(3, largest=False)
    np.testing.assert_allclose(dist, want.values.numpy(), atol=1e-5)
    np.testing.assert_array_equal(idx, want.indices.numpy())
    # a subset of a pool without copying it, and the train-to-train search (each image's nearest *other* image)
    subset = np.arange(100, 300)
    dist, idx = nearest(Rows(reference, subset[:20]), Rows(reference, subset), 2, exclude_self=True,
                        reference_chunk=reference_chunk, query_chunk=query_chunk)
    own = torch.cdist(as_vectors(reference[subset[:20]]).double(), as_vectors(reference[subset]).double()) / 4
    own[torch.arange(20), torch.arange(20)] = float("inf")
    np.testing.assert_allclose(dist, own.topk(2, largest=False).values.numpy(), atol=1e-5)
    # cosine similarity and Kadkhodaie et al.'s correlation (centred, then cosine)
    sim, idx = nearest(queries, reference, 2, metric="cosine", embed=lambda x: centred_unit(as_vectors(x)),
                       reference_chunk=reference_chunk, query_chunk=query_chunk)
    want = (centred_unit(as_vectors(queries)) @ centred_unit(as_vectors(reference)).T).topk(2)
    np.testing.assert_allclose(sim, want.values.numpy(), atol=1e-5)
    np.testing.assert_allclose(correlation(queries, reference[idx[:, 0]]), sim[:, 0], atol=1e-5)


def test_exact_copies_have_distance_zero_despite_the_expansion():
    """||q||^2 + ||r||^2 - 2qr in float32 must not turn a copy into a non-copy: d1 = 0 (clamped), ratio 0."""
    rng = np.random.default_rng(2)
    reference = rng.integers(0, 256, (1000, 3, 16, 16), dtype=np.uint8)
    dist, idx = nearest(reference[:50], reference, 2, reference_chunk=333)
    assert (idx[:, 0] == np.arange(50)).all()
    assert dist[:, 0].max() < 1e-3 and (copy_ratio(dist) < 1e-2).all()


@needs_fmnist
def test_copy_rule_on_training_images_noise_and_held_out_images(pool):
    images, _, _ = load_prepared(str(pool))
    train, test = run_split(len(images), spec(100))
    threshold = 1 / 3
    searched = Rows(images, train)
    assert (copy_ratio(nearest(images[train[:40]], searched, 2)[0]) < threshold).mean() == 1.0  # copies
    noise = np.random.default_rng(0).integers(0, 256, (100, 1, 8, 8), dtype=np.uint8)
    assert (copy_ratio(nearest(noise, searched, 2)[0]) < threshold).mean() == 0.0  # fresh Gaussian-like noise
    held_out = (copy_ratio(nearest(images[test], searched, 2)[0]) < threshold).mean()
    assert held_out < 0.05  # new images of the same distribution are not copies


def test_intervals():
    assert wilson_interval(0, 64) == pytest.approx((0.0, 0.0564), abs=1e-3)  # non-degenerate at 0
    assert wilson_interval(64, 64) == pytest.approx((0.9436, 1.0), abs=1e-3)
    low, high = wilson_interval(32, 64)
    assert low < 0.5 < high and high - low == pytest.approx(0.24, abs=0.01)
    assert bootstrap_interval(np.zeros(64)) == (0.0, 0.0)  # why the rule uses Wilson for fractions
    values = np.random.default_rng(0).normal(size=400)
    low, high = bootstrap_interval(values, resamples=2000)
    assert low < values.mean() < high and high - low == pytest.approx(2 * 1.96 / 20, rel=0.15)
    assert np.isnan(bootstrap_interval(values, resamples=0)[0])
    assert unit(torch.tensor([[3.0, 4.0]]))[0].tolist() == pytest.approx([0.6, 0.8])
    assert centred_unit(torch.ones(1, 5)).abs().sum() == 0  # a constant image correlates with nothing


# ----------------------------------------------------------------------------------------------------
# The measurements on a model that has memorised
# ----------------------------------------------------------------------------------------------------


@needs_fmnist
def test_a_memorising_model_is_caught_and_galleries_show_its_sources(pool):
    from diffbias.measurements import memorisation

    run = memorising_run(pool, 10)
    cfg = settings("memorisation", num_samples=24, sampling_steps=50, inception_max_N=0, gallery=3, bootstrap=200)
    result = memorisation.compute(run, cfg)
    row = result.table.iloc[-1]
    assert row["final"] and row["num_samples"] == 24
    assert row["fraction"] >= 0.9 and row["wilson_low"] > 0.7  # its samples are its training images
    assert row["d1_median"] < 0.05 < row["test_d1_median"]  # far closer than held-out images are
    assert not row["inception"] and np.isnan(row["samples_cos_median"])  # switched off, and said so
    a = result.arrays
    assert a["gallery_neighbours"].shape == (3, 3, 1, 8, 8) and a["gallery_distances"].shape == (3, 3)
    train = set(run.split[0].tolist())
    assert set(a["gallery_indices"].ravel().tolist()) <= train  # neighbours come from the run's own training set
    np.testing.assert_array_equal(a["gallery_neighbours"][:, 0], run.images[a["gallery_indices"][:, 0]])
    assert len(a["test_d1"]) == 50 and len(a["train_d1"]) == 10
    assert (a["test_ratio"] < 1 / 3).mean() < 0.1  # the reference: held-out images are not copies


@needs_fmnist
def test_snapshots_get_one_row_each(pool, tmp_path):
    from diffbias.measurements import memorisation

    snapshots = tmp_path / "ema_snapshots"
    snapshots.mkdir()
    run = memorising_run(pool, 10, inputs={"snapshots": str(snapshots)})
    for step in (20, 60):  # what Trainer writes: ema_<step>.pt loaded through TrainedRun.load_model
        (snapshots / f"ema_{step:07d}.pt").touch()
    run.load_model = lambda path: (run.model, {"step": int(Path(path).stem.split("_")[1])})
    cfg = settings("memorisation", num_samples=8, sampling_steps=20, inception_max_N=0, bootstrap=50)
    table = memorisation.compute(run, cfg).table
    assert table["step"].tolist() == [20, 60, 100] and table["final"].tolist() == [False, False, True]


@needs_fmnist
def test_two_copies_of_one_model_reproduce_exactly(pool):
    from diffbias.measurements import reproducibility

    run = memorising_run(pool, 10)
    cfg = settings("reproducibility", num_samples=16, sampling_steps=30, bootstrap=100)
    row = reproducibility.paired_samples(run, run.model, run.split[0], cfg).table.iloc[0]
    assert row["mean_corr"] == pytest.approx(1.0, abs=1e-6) and row["same_fraction"] == 1.0


@needs_fmnist
def test_models_that_memorised_two_disjoint_images_each_disagree(pool, tmp_path):
    """Each model of a split A / split B pair at N = 2 reproduces its own two images: their paired samples are
    never the same image, and each sample matches its own training set far better than its twin's sample."""
    from diffbias.measurements import reproducibility

    run, twin = memorising_run(pool, 2), memorising_run(pool, 2, "B")
    assert not set(run.split[0]) & set(twin.split[0])
    cfg = settings("reproducibility", num_samples=32, sampling_steps=50, bootstrap=100)
    row = reproducibility.paired_samples(run, twin.model, twin.split[0], cfg).table.iloc[0]
    assert row["same_fraction"] == 0.0
    assert row["own_train_corr_a"] > 0.99 and row["own_train_corr_b"] > 0.99
    assert row["mean_corr"] < 0.95 and row["corr_high"] < row["own_train_corr_a"]


@pytest.mark.slow
@needs_fmnist
def test_trained_models_on_two_disjoint_images_each_disagree(pool, tmp_path):
    """Real training (tiny DiTs, 800 steps each on its two images), then the workflow's measure command with the
    twin's model as its input: the paired samples stay apart while each matches its own training images."""
    from diffbias.measure import measure
    from diffbias.train import Trainer

    def train_spec(split):
        s = spec(2, split, "dit" if split == "A" else "dit_b")
        s["dataset"] = {"source": "fashion_mnist", "resolution": 8, "channels": 1, "test_size": 50}
        s["model"] = {"backbone": "dit", "preset": "DiT-T/2", "options": {"hidden_size": 32, "depth": 2, "num_heads": 2,
                                                                         "patch_size": 2, "attention": "G,G"}}
        s["training"] = {"steps": 800, "batch_size": 8, "lr": 4e-3, "weight_decay": 0.0, "ema_decay": 0.999,
                         "ema_warmup": True, "hflip": False, "class_conditional": False, "label_dropout": 0.1,
                         "checkpoint_every": 10_000, "log_every": 400, "grad_clip": None}
        return s

    for split in "AB":
        Trainer(train_spec(split), str(pool), tmp_path / split, tmp_path / f"{split}.ckpt", device="cpu").run(progress=False)
    out = tmp_path / "reproducibility.parquet"
    measure("reproducibility", model=str(tmp_path / "A/model.pt"), data=str(pool), out=str(out),
            arrays_out=str(tmp_path / "reproducibility.npz"), config={"num_samples": 32, "sampling_steps": 50},
            inputs={"twin": str(tmp_path / "B/model.pt")}, device="cpu", threads=1)
    row = pd.read_parquet(out).iloc[0]
    assert row["twin_variant"] == "dit_b"
    assert row["same_fraction"] < 0.5
    assert min(row["own_train_corr_a"], row["own_train_corr_b"]) > row["corr_high"]
    with pytest.raises(SystemExit, match="not the other training part"):  # a run is not its own twin
        measure("reproducibility", model=str(tmp_path / "A/model.pt"), data=str(pool), out=str(out),
                arrays_out=str(tmp_path / "x.npz"), config={"num_samples": 4, "sampling_steps": 5},
                inputs={"twin": str(tmp_path / "A/model.pt")}, device="cpu", threads=1)


# ----------------------------------------------------------------------------------------------------
# The report: the new sections and the claims table, from the measurements' own outputs
# ----------------------------------------------------------------------------------------------------


@needs_fmnist
def test_report_draws_copies_gallery_pairs_and_claims(pool, tmp_path):
    """Memorising models (the empirical optimal denoiser) at N = 2 and 10, split A and B, through the measurements'
    compute, the study aggregation and the report: the sections render and the claims get their verdicts."""
    import json

    from diffbias import analysis, cli, report
    from diffbias.io import write_npz, write_parquet
    from diffbias.measurements import memorisation, psnr, reproducibility

    mem_cfg = settings("memorisation", num_samples=16, sampling_steps=20, inception_max_N=0, gallery=3, bootstrap=100)
    rep_cfg = settings("reproducibility", num_samples=16, sampling_steps=20, bootstrap=100, pairs=3)
    psnr_cfg = settings("psnr", num_images=8, respacing=5, bootstrap=100)
    tables = {"psnr": [], "memorisation": [], "reproducibility": []}
    packs = {"memorisation": [], "reproducibility": []}
    for n in (2, 10):
        runs = {split: memorising_run(pool, n, split) for split in "AB"}
        for split, run in runs.items():
            key = {"dataset": "fmnist8", "variant": run.run["variant"], "N": n, "seed": 0}
            tables["psnr"].append(psnr.compute(run, psnr_cfg).table.assign(**key))
            result = memorisation.compute(run, mem_cfg)
            tables["memorisation"].append(result.table.assign(**key))
            write_npz(tmp_path / f"mem_{split}{n}.npz", **result.arrays)
            packs["memorisation"].append((analysis.run_key(*key.values()), str(tmp_path / f"mem_{split}{n}.npz")))
        result = reproducibility.paired_samples(runs["A"], runs["B"].model, runs["B"].split[0], rep_cfg)
        tables["reproducibility"].append(result.table.assign(dataset="fmnist8", variant="dit", N=n, seed=0))
        write_npz(tmp_path / f"rep{n}.npz", **result.arrays)
        packs["reproducibility"].append((f"fmnist8/dit/N{n}/seed0", str(tmp_path / f"rep{n}.npz")))
    claims = [
        {"text": "copies at both N", "quantity": "memorised_fraction", "higher": {"N": 2}, "than": {"N": 10}},
        {"text": "the twins agree more at N = 10", "quantity": "reproducibility", "higher": {"N": 10},
         "than": {"N": 2}, "variants": ["dit"]},
        {"text": "never measured here", "quantity": "fid", "lower": "dit", "than": "dit_b"},
    ]
    study = {"name": "mem", "title": "memorising models", "scale_note": "", "summary": "", "papers": ["004"],
             "variants": ["dit", "dit_b"], "baseline": "dit", "datasets": ["fmnist8"], "N": [2, 10], "seeds": [0],
             "labels": {"dit": "DiT", "dit_b": "DiT (split B)"}, "twins": {"dit": "dit_b"}, "claims": claims,
             "variant_specs": {v: {"backbone": "dit", "preset": "DiT-T/2", "options": {}} for v in ("dit", "dit_b")},
             "settings": {"memorisation": mem_cfg}, "switched_off": {}, "count_dataset": "fmnist8"}
    study_dir = tmp_path / "studies/mem"
    for name, frames in tables.items():
        write_parquet(pd.concat(frames, ignore_index=True).assign(label=lambda f: f["variant"]),
                      study_dir / f"{name}.parquet", {"study": study, "runs": {}})
    for name, pairs in packs.items():
        cli.main(["aggregate-arrays", "--runs", json.dumps([k for k, _ in pairs]), "--out",
                  str(study_dir / f"arrays/{name}.npz")] + [p for _, p in pairs])
    sections = report.build_report(study, study_dir, tmp_path / "mem.pdf")
    titles = [s.title for s in sections]
    for title in ("Copies: memorised fraction", "Nearest-neighbour gallery", "Distances to the training set",
                  "Two models on disjoint data", "Two models on disjoint data: example pairs", "Claims tested"):
        assert title in titles, title
    assert titles[-2:] == ["Claims tested", "Not in this report"]  # the claims close the report's sections
    assert "Memorisation over training" not in titles  # no snapshots: said on the closing page, not drawn
    closing = json.loads((study_dir / "tables/report_sections.json").read_text())["nothing_drawn"]
    assert any(line.startswith("Memorisation over training: no EMA snapshots") for line in closing)
    claims_md = (study_dir / "tables/claims.md").read_text()
    assert "unresolved at this precision" in claims_md  # both N copy everything: no difference to resolve
    assert "not measured" in claims_md
    figures = {p.name for p in (study_dir / "figures").glob("*.png")}
    assert {"memorisation_gallery_fmnist8_N2.png", "memorisation_gallery_fmnist8_N10.png",
            "memorisation_distances.png", "reproducibility_curve.png", "reproducibility_pairs_fmnist8_dit.png"} <= figures


def test_copies_on_a_latent_data_set_fail_at_dag_build_naming_the_key():
    """The copy search reads the training pool's pixels; a latent data set's pool holds latents, so a config that
    asks for copies there fails before any job, naming evaluation.memorisation.N."""
    import yaml

    from diffbias.config import ConfigError, validate_config

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/configs/paper-002.yaml").read_text())
    validate_config(raw)  # as shipped: no copies measured in latent space
    n = raw["studies"]["dice"]["N"][0]
    raw["evaluation"]["memorisation"] = {"N": [n]}
    with pytest.raises(ConfigError, match="latent data set") as err:
        validate_config(raw)
    assert err.value.key == "evaluation.memorisation.N"
