"""Class-conditional runs are evaluated with their labels (papers 002/003), through the real measurement commands.

For DiT, DiffuSSM, DICE and U-ViT: a class-conditional model trained for a few steps through the real trainer,
then every measurement (`python -m diffbias measure ...`, called in-process) runs on it. A forward
pre-hook on the real model records the labels it was called with: PSNR, Jacobian and attention maps must pass
each image's own label (from the run's own split), sampling must pass labels drawn uniformly from the sample
seed, and never the null label or None.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from diffbias import cli
from diffbias import data as data_lib
from diffbias.config import RunKey, run_spec, section_settings, validate_config
from diffbias.runs import GuidedModel, TrainedRun, sampling_labels
from diffbias.train import Trainer

BACKBONES = {"dit": "DiT-T/2", "diffussm": "DiffuSSM-T", "dice": "DICE-T", "uvit": "UViT-T/2"}


def _config(data_path):
    return validate_config({
        "datasets": {"tiny": {"source": "npz", "path": str(data_path), "resolution": 16, "channels": 1, "test_size": 20}},
        "training": {"steps": 2, "batch_size": 4, "class_conditional": True, "label_dropout": 0.1,
                     "checkpoint_every": 2, "log_every": 1},
        "variants": {name: {"preset": preset} for name, preset in BACKBONES.items()},
        "studies": {"s": {"dataset": "tiny", "variants": list(BACKBONES), "N": [16], "seeds": [3]}},
    })


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cond")
    rng = np.random.default_rng(0)
    pool = tmp / "pool.npz"
    np.savez(pool, images=rng.integers(0, 256, size=(60, 16, 16, 1), dtype=np.uint8), labels=rng.integers(0, 10, 60))
    data = tmp / "tiny.npz"
    data_lib.prepare_dataset({"source": "npz", "path": str(pool), "resolution": 16, "channels": 1}, str(data))
    cfg = _config(pool)
    runs = {}
    for variant in BACKBONES:
        out = tmp / variant
        Trainer(run_spec(cfg, RunKey("tiny", variant, 16, 3)), data, out, out / "ck.pt", device="cpu").run(progress=False)
        runs[variant] = out / "model.pt"
    return data, runs


def _recording(model):
    seen = []

    def hook(module, args, kwargs):
        y = args[2] if len(args) > 2 else kwargs.get("y")
        seen.append(None if y is None else y.detach().cpu().clone())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("variant", list(BACKBONES))
def test_measurements_of_a_class_conditional_run_use_its_labels(trained_runs, variant, tmp_path, monkeypatch):
    data, models = trained_runs
    run = TrainedRun.load(models[variant], data, "cpu")
    assert run.num_classes == 10
    images, labels, _ = data_lib.load_prepared(str(data))
    train_idx, test_idx = run.split
    assert torch.equal(run.train_images(5).y, torch.as_tensor(labels[train_idx[:5]]))
    assert torch.equal(run.test_images(5).y, torch.as_tensor(labels[test_idx[:5]]))

    seen = _recording(run.model)
    monkeypatch.setattr(TrainedRun, "load", classmethod(lambda cls, *a, **k: run))  # the same run object, hooked
    common = ["--model", str(models[variant]), "--data", str(data), "--device", "cpu"]

    cli.main(["measure", "psnr", *common, "--out", str(tmp_path / "psnr.parquet"),
              "--config", json.dumps({"num_images": 4, "respacing": 3})])
    expected = {tuple(labels[train_idx[:4]]), tuple(labels[test_idx[:4]])}
    assert seen and {tuple(y.tolist()) for y in seen} == expected
    assert pd.read_parquet(tmp_path / "psnr.parquet")["gap"].notna().all()

    seen.clear()
    cli.main(["measure", "jacobian", *common, "--out", str(tmp_path / "jac.parquet"), "--arrays-out", str(tmp_path / "v.npz"),
              "--config", json.dumps({"num_images": 2, "top_k": 2, "method": "lanczos", "max_products": 16})])
    assert seen and {tuple(y.reshape(-1).unique().tolist()) for y in seen} <= {(labels[test_idx[0]],), (labels[test_idx[1]],)}

    if run.model.records_attention:  # attention maps apply to backbones that record attention
        seen.clear()
        cli.main(["measure", "attention", *common, "--out", str(tmp_path / "att.parquet"), "--arrays-out",
                  str(tmp_path / "m.npz"), "--config", json.dumps({"num_images": 3})])
        assert seen and all(y.tolist() == labels[test_idx[: len(y)]].tolist() for y in seen)
        assert not pd.read_parquet(tmp_path / "att.parquet").empty
        assert "images" in np.load(tmp_path / "m.npz").files

    seen.clear()
    samples = run.sample(6, sampling_steps=2, seed=7, batch_size=4)
    assert samples.shape == (6, 1, 16, 16) and samples.dtype == np.uint8
    drawn = sampling_labels(10, 6, 7)
    assert [y.tolist() for y in seen if len(y) == 4][0] == drawn[:4].tolist()
    assert all((y < 10).all() for y in seen)  # never the null label without guidance


def test_sampling_labels_are_uniform_and_fixed_by_the_seed():
    a, b = sampling_labels(10, 20_000, 1), sampling_labels(10, 20_000, 1)
    assert torch.equal(a, b) and not torch.equal(a, sampling_labels(10, 20_000, 2))
    counts = torch.bincount(a, minlength=10).float() / len(a)
    assert counts.min() > 0.08 and counts.max() < 0.12
    assert sampling_labels(0, 5, 1) is None


def test_guidance_combines_conditional_and_null_predictions():
    class Linear(torch.nn.Module):
        num_classes = 3

        def forward(self, x, t, y):  # eps depends on the label; the variance channel is the label itself
            eps = x + y.float().view(-1, 1, 1, 1)
            return torch.cat([eps, y.float().view(-1, 1, 1, 1).expand_as(x)], 1)

    x, t, y = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([0, 2])
    out = GuidedModel(Linear(), 4.0)(x, t, y)
    # eps_null = 3 (null label 3), eps_y = y: 3 + 4 (y - 3)
    assert out[:, 0].flatten(1)[:, 0].tolist() == [3 + 4 * (0 - 3), 3 + 4 * (2 - 3)]
    assert out[:, 1].flatten(1)[:, 0].tolist() == [0.0, 2.0]  # variance from the conditional pass


def test_measurement_settings_come_from_the_schema():
    from diffbias.config import ConfigError, measurement_settings

    filled = measurement_settings("psnr", {"num_images": 4})
    assert filled == {"N": None, "num_images": 4, "respacing": 50, "noise_seed": 0, "batch_size": 256, "clip": False,
                      "bootstrap": 1000, "bootstrap_seed": 0, "confidence": 0.95}
    assert section_settings(("evaluation", "psnr"), {"num_images": 4}) == filled
    grid = measurement_settings("freeu", {"b": [1.0], "s": [1.0]})
    assert grid["keep"] == 16 and grid["num_samples"] == 1000
    curve = measurement_settings("fid_curve", {"N": [50], "num_samples": 8})  # shares fid's sampling settings
    assert curve["N"] == [50] and curve["num_samples"] == 8 and curve["sampling_steps"] == 250
    with pytest.raises(ConfigError, match="evaluation.psnr.num_images"):
        measurement_settings("psnr", {"num_images": "many"})
    with pytest.raises(ConfigError, match="studies.<study>.freeu_grid"):
        measurement_settings("freeu", {"b": [1.0]})


def test_freeu_sample_figure_shows_five_classes_five_samples_each():
    """Paper 000 figs. 5-7: five classes, five samples each, picked from the labels the samples were drawn with."""
    from diffbias.config import measurement_settings
    from diffbias.measurements.freeu import shown_samples

    grid = measurement_settings("freeu", {"b": [1.0], "s": [1.0], "num_samples": 200})
    picks = shown_samples(10, grid)
    labels = sampling_labels(10, 200, grid["sample_seed"])[picks]
    assert labels.tolist() == [c for c in range(5) for _ in range(5)]
    assert shown_samples(0, grid) is None  # unconditional: the first `keep` samples
