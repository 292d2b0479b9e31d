"""Per-variant optimiser settings: AdamW betas and a linear learning-rate warm-up (U-ViT's recipe, paper 000)."""

import copy

import pytest
import torch
import yaml

from diffbias.config import REPO_ROOT, ConfigError, run_spec, study_runs, validate_config
from diffbias.train import Trainer, make_optimizer, warmup_factor
from test_train import _spec as train_spec


def _spec(steps=8, **training):
    """test_train's tiny DiT run spec, without flips (the learning-rate checks need nothing else)."""
    return train_spec(steps, **{"hflip": False, **training})


def _lrs_seen(trainer: Trainer) -> list[float]:
    """The learning rate of every optimiser step the trainer takes (recorded just before each step)."""
    seen: list[float] = []
    step = trainer.opt.step

    def recording_step(*args, **kwargs):
        seen.append(trainer.opt.param_groups[0]["lr"])
        return step(*args, **kwargs)

    trainer.opt.step = recording_step
    return seen


def test_warmup_factor_is_linear_then_flat():
    assert [warmup_factor(s, 4) for s in (1, 2, 3, 4, 5, 100)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(1, 0) == warmup_factor(1, None) == 1.0


def test_betas_reach_adamw():
    model = torch.nn.Linear(3, 3)
    assert make_optimizer(model, 1e-3, 0.0).param_groups[0]["betas"] == (0.9, 0.999)
    assert make_optimizer(model, 1e-3, 0.0, [0.99, 0.999]).param_groups[0]["betas"] == (0.99, 0.999)


def test_trainer_warms_up_and_uses_the_configured_betas(tiny_dataset, tmp_path):
    t = Trainer(_spec(betas=[0.99, 0.999], warmup_steps=4), tiny_dataset, tmp_path / "w", tmp_path / "w.ckpt",
                device="cpu")
    assert t.opt.param_groups[0]["betas"] == (0.99, 0.999)
    seen = _lrs_seen(t)
    t.run(progress=False)
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])


def test_warmup_resumes_where_it_stopped(tiny_dataset, tmp_path):
    """The rate is a function of the step: a run killed mid warm-up continues the same schedule and ends
    with the same weights as an uninterrupted one."""
    spec = _spec(steps=8, warmup_steps=6)
    full = Trainer(spec, tiny_dataset, tmp_path / "full", tmp_path / "full.ckpt", device="cpu")
    full.run(progress=False)

    part = Trainer(spec, tiny_dataset, tmp_path / "part", tmp_path / "part.ckpt", device="cpu")
    part.cfg = dict(part.cfg, steps=4)  # stop inside the warm-up, keep the checkpoint a killed job leaves
    part.write_outputs = lambda: None
    part.run(progress=False)
    part.save_checkpoint()
    resumed = Trainer(spec, tiny_dataset, tmp_path / "part", tmp_path / "part.ckpt", device="cpu")
    assert resumed.try_resume() and resumed.step == 4
    seen = _lrs_seen(resumed)
    resumed.run(progress=False)
    assert seen == pytest.approx([1e-3 * 5 / 6, 1e-3, 1e-3, 1e-3])
    for (k, v), w in zip(full.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(v, w), k


def test_warmup_and_betas_change_the_run_and_can_be_set_per_variant():
    raw = yaml.safe_load((REPO_ROOT / "workflow/configs/micro.yaml").read_text())
    raw["variants"]["dit_local"]["training"] = {"betas": [0.99, 0.999], "warmup_steps": 5}
    cfg = validate_config(raw)
    runs = {r.variant: run_spec(cfg, r) for r in study_runs(cfg, "micro") if r.n == 10}
    assert runs["dit_local"]["training"]["betas"] == [0.99, 0.999] and runs["dit_local"]["training"]["warmup_steps"] == 5
    # absent settings stay out of the spec, so runs trained before they existed keep their hash (no retraining)
    assert "betas" not in runs["dit"]["training"] and "warmup_steps" not in runs["dit"]["training"]


@pytest.mark.parametrize("value,key", [([0.9], "variants.dit.training.betas"), ([0.9, 1.0], "training.betas.1"),
                                       (-1, "training.warmup_steps")])
def test_bad_optimiser_settings_fail_before_any_job(value, key):
    raw = yaml.safe_load((REPO_ROOT / "workflow/configs/micro.yaml").read_text())
    raw = copy.deepcopy(raw)
    if key.startswith("variants"):
        raw["variants"]["dit"]["training"] = {"betas": value}
    else:
        raw["training"][key.split(".")[1]] = value
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert err.value.key == key


def test_paper_000_follows_uvit_recipe():
    cfg = validate_config(yaml.safe_load((REPO_ROOT / "workflow/configs/paper-000.yaml").read_text()))
    assert cfg["training"]["betas"] == [0.99, 0.999] and cfg["training"]["warmup_steps"] == 2500
