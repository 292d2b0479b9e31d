import json
import math
import os
import shutil

import pandas as pd
import pytest
import torch

from diffbias.io import CorruptFileError, load_torch_checked, save_torch_checked
from diffbias.train import NonFiniteLossError, TimeBudgetReached, Trainer, ema_decay_at, load_trained


def _spec(steps=12, **training):
    cfg = {
        "steps": steps, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "ema_decay": 0.999, "ema_warmup": True,
        "hflip": True, "class_conditional": False, "label_dropout": 0.1, "checkpoint_every": 4, "log_every": 2,
        "grad_clip": None,
    }
    cfg.update(training)
    return {
        "run": {"dataset": "tiny", "variant": "dit", "N": 20, "seed": 3},
        "dataset": {"source": "npz", "resolution": 16, "channels": 1, "test_size": 20},
        "model": {"backbone": "dit", "preset": "DiT-T/2",
                  "options": {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "attention": "3,G"}},
        "training": cfg,
    }


def _train(spec, data, tmp_path, name, **kw):
    t = Trainer(spec, data, tmp_path / name, tmp_path / f"{name}.ckpt", device="cpu", **kw)
    t.run(progress=False)
    return t


def test_same_seed_same_loss_trace_and_outputs(tiny_dataset, tmp_path):
    a = _train(_spec(), tiny_dataset, tmp_path, "a")
    b = _train(_spec(), tiny_dataset, tmp_path, "b")
    la, lb = pd.read_parquet(tmp_path / "a/train_log.parquet"), pd.read_parquet(tmp_path / "b/train_log.parquet")
    pd.testing.assert_series_equal(la["loss"], lb["loss"])
    assert list(la["step"]) == [2, 4, 6, 8, 10, 12]
    for (k, v), w in zip(a.ema.state_dict().items(), b.ema.state_dict().values()):
        assert torch.equal(v, w), k
    assert not (tmp_path / "a.ckpt").exists()  # the side checkpoint is removed once the outputs exist


def test_killed_run_resumes_to_the_same_result(tiny_dataset, tmp_path):
    full = _train(_spec(), tiny_dataset, tmp_path, "full")
    # "kill" after step 8: run a trainer for 8 steps with checkpoint_every 4, keeping its checkpoint
    part = Trainer(_spec(steps=12), tiny_dataset, tmp_path / "resumed", tmp_path / "resumed.ckpt", device="cpu")
    part.cfg = dict(part.cfg, steps=8)
    part.cfg["checkpoint_every"] = 4
    part.run(progress=False)  # writes outputs at 8; re-create the checkpoint a killed job would have left
    part.save_checkpoint()
    (tmp_path / "resumed" / "model.pt").unlink()
    resumed = Trainer(_spec(), tiny_dataset, tmp_path / "resumed", tmp_path / "resumed.ckpt", device="cpu")
    assert resumed.try_resume() and resumed.step == 8
    resumed.run(progress=False)
    lf = pd.read_parquet(tmp_path / "full/train_log.parquet")
    lr = pd.read_parquet(tmp_path / "resumed/train_log.parquet")
    pd.testing.assert_series_equal(lf["loss"], lr["loss"])
    for v, w in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(v, w)


def test_checkpoint_of_another_spec_is_ignored(tiny_dataset, tmp_path):
    t = Trainer(_spec(), tiny_dataset, tmp_path / "x", tmp_path / "x.ckpt", device="cpu")
    t.save_checkpoint()
    other = Trainer(_spec(lr=2e-3), tiny_dataset, tmp_path / "x", tmp_path / "x.ckpt", device="cpu")
    assert not other.try_resume()


def test_nan_loss_stops_the_run_with_a_message(tiny_dataset, tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        _train(_spec(lr=1e30, hflip=False), tiny_dataset, tmp_path, "nan")
    assert not (tmp_path / "nan" / "model.pt").exists()


def test_time_budget_checkpoints_and_stops(tiny_dataset, tmp_path):
    with pytest.raises(TimeBudgetReached, match="checkpoint saved"):
        _train(_spec(steps=10_000), tiny_dataset, tmp_path, "budget", max_runtime_minutes=0.5)
    ckpt = load_torch_checked(tmp_path / "budget.ckpt")
    assert 0 < ckpt["step"] < 10_000
    assert not (tmp_path / "budget" / "model.pt").exists()


def test_ema_warmup_and_outputs(tiny_dataset, tmp_path):
    assert ema_decay_at(0, 0.9999, True) == pytest.approx(0.1)
    assert ema_decay_at(10**6, 0.9999, True) == 0.9999
    assert ema_decay_at(0, 0.9999, False) == 0.9999
    _train(_spec(steps=4, class_conditional=True), tiny_dataset, tmp_path, "cond")
    model, ckpt = load_trained(tmp_path / "cond" / "model.pt")
    assert ckpt["num_classes"] == 10 and ckpt["step"] == 4
    out = model(torch.zeros(2, 1, 16, 16), torch.tensor([0, 999]), torch.tensor([1, 10]))
    assert out.shape == (2, 2, 16, 16) and torch.isfinite(out).all()
    assert out.abs().sum() > 0  # the EMA left the zero initialisation thanks to the warm-up


def test_ema_snapshots_equal_a_run_stopped_at_that_step(tiny_dataset, tmp_path):
    """FID over training evaluates snapshot s: it must be the EMA a run of exactly s steps ends with."""
    full = _train(_spec(snapshot_steps=[4, 8]), tiny_dataset, tmp_path, "snap")
    folder = tmp_path / "snap" / "ema_snapshots"
    assert sorted(p.name for p in folder.iterdir()) == ["ema_00000004.pt", "ema_00000008.pt"]
    short = _train(_spec(steps=8), tiny_dataset, tmp_path, "short")
    _, snap = load_trained(folder / "ema_00000008.pt")
    assert snap["step"] == 8 and snap["spec"] == full.spec
    for k, v in short.ema.state_dict().items():
        assert torch.equal(snap["ema"][k], v), k
    assert not full.snapshot_dir.exists()  # side copies removed once published
    assert not (tmp_path / "snap" / ".ema_snapshots.tmp").exists()


def test_snapshots_survive_a_kill_and_stale_ones_are_dropped(tiny_dataset, tmp_path):
    spec = _spec(snapshot_steps=[2, 10])
    killed = Trainer(spec, tiny_dataset, tmp_path / "r", tmp_path / "r.ckpt", device="cpu")
    killed.cfg = dict(killed.cfg, steps=8)
    killed.write_outputs = lambda: None  # "killed" at step 8: no outputs, the side folder and checkpoint stay
    killed.run(progress=False)
    killed.save_checkpoint()
    assert (killed.snapshot_dir / "ema_00000002.pt").exists()
    Trainer(spec, tiny_dataset, tmp_path / "r", tmp_path / "r.ckpt", device="cpu").run(progress=False)
    uninterrupted = _train(spec, tiny_dataset, tmp_path, "u")
    for step in (2, 10):
        name = f"ema_snapshots/ema_{step:08d}.pt"
        a, b = torch.load(tmp_path / "r" / name, weights_only=False), torch.load(tmp_path / "u" / name, weights_only=False)
        assert a["step"] == b["step"] == step
        assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    # a fresh start (no valid checkpoint) drops snapshots left by another attempt
    stale = Trainer(spec, tiny_dataset, tmp_path / "s", tmp_path / "s.ckpt", device="cpu")
    stale.snapshot_dir.mkdir(parents=True)
    (stale.snapshot_dir / "ema_00000002.pt").write_bytes(b"stale")
    stale.run(progress=False)
    assert load_trained(tmp_path / "s" / "ema_snapshots" / "ema_00000002.pt")[1]["step"] == 2


def test_peak_memory_in_log_and_run_json(tiny_dataset, tmp_path):
    _train(_spec(steps=4), tiny_dataset, tmp_path, "mem")
    log = pd.read_parquet(tmp_path / "mem" / "train_log.parquet")
    assert (log["peak_memory_mb"] > 10).all() and set(log["memory_kind"]) == {"process_max_rss"}
    assert set(log["device"]) == {"cpu"}
    run = json.loads((tmp_path / "mem" / "run.json").read_text())
    assert run["peak_memory_mb"] >= log["peak_memory_mb"].max() and run["snapshot_steps"] == []


# ---------------------------------------------------------------------------------- checkpoint integrity
def _killed_at(spec, data, tmp_path, name, step, **cfg):
    """A trainer "killed" just after checkpointing at `step` (every 4 steps), before writing outputs."""
    t = Trainer(spec, data, tmp_path / name, tmp_path / f"{name}.ckpt", device="cpu")
    t.cfg = dict(t.cfg, steps=step + 1, **cfg)  # the last step checkpoints only when it is not the final one
    t.write_outputs = lambda: None
    t.run(progress=False)
    return t


def _assert_same_result(a_dir, b_dir):
    pd.testing.assert_frame_equal(
        pd.read_parquet(a_dir / "train_log.parquet")[["step", "loss", "mse", "vb"]],
        pd.read_parquet(b_dir / "train_log.parquet")[["step", "loss", "mse", "vb"]],
    )
    a, b = torch.load(a_dir / "model.pt", weights_only=False), torch.load(b_dir / "model.pt", weights_only=False)
    assert a["step"] == b["step"] and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_checkpoint_rotation_keeps_the_previous_one(tiny_dataset, tmp_path):
    t = _killed_at(_spec(), tiny_dataset, tmp_path, "rot", 8)  # checkpoints at 4 and 8
    assert load_torch_checked(t.checkpoint_path)["step"] == 8
    assert load_torch_checked(t.prev_checkpoint_path)["step"] == 4
    assert t.prev_checkpoint_path.name == "rot.prev.ckpt"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_checkpoint_resumes_from_the_previous_one(tiny_dataset, tmp_path, damage, caplog):
    """A truncated/corrupt latest checkpoint is detected by its checksum, logged, and the run resumes from
    the previous good one (step 4) and still ends with exactly the uninterrupted result."""
    full = _train(_spec(), tiny_dataset, tmp_path, "full")
    killed = _killed_at(_spec(), tiny_dataset, tmp_path, "r", 8)
    ckpt = killed.checkpoint_path
    data = ckpt.read_bytes()
    if damage == "truncate":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one byte changed in the middle: only the checksum can tell
        i = len(data) // 2
        ckpt.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    else:
        ckpt.write_bytes(b"")
    with pytest.raises(CorruptFileError):
        load_torch_checked(ckpt)
    resumed = Trainer(_spec(), tiny_dataset, tmp_path / "r", ckpt, device="cpu")
    with caplog.at_level("WARNING", logger="diffbias.train"):
        assert resumed.try_resume() and resumed.step == 4
    assert "ignoring damaged checkpoint" in caplog.text and str(ckpt) in caplog.text
    resumed.run(progress=False)
    _assert_same_result(tmp_path / "full", tmp_path / "r")
    assert full.step == resumed.step == 12
    assert not ckpt.exists() and not resumed.prev_checkpoint_path.exists()  # finished: both removed


def test_both_checkpoints_damaged_restarts_from_scratch(tiny_dataset, tmp_path, caplog):
    _train(_spec(), tiny_dataset, tmp_path, "full")
    killed = _killed_at(_spec(), tiny_dataset, tmp_path, "r", 8)
    for path in (killed.checkpoint_path, killed.prev_checkpoint_path):
        path.write_bytes(path.read_bytes()[:-100])
    fresh = Trainer(_spec(), tiny_dataset, tmp_path / "r", killed.checkpoint_path, device="cpu")
    with caplog.at_level("WARNING", logger="diffbias.train"):
        fresh.run(progress=False)  # no crash, no garbage: from step 0
    assert caplog.text.count("ignoring damaged checkpoint") == 2
    _assert_same_result(tmp_path / "full", tmp_path / "r")


def test_killed_between_rotation_and_write_resumes_from_the_previous_one(tiny_dataset, tmp_path):
    """save_checkpoint renames latest -> prev, then writes: a kill in between leaves only prev."""
    _train(_spec(), tiny_dataset, tmp_path, "full")
    killed = _killed_at(_spec(), tiny_dataset, tmp_path, "r", 8)
    os.replace(killed.checkpoint_path, killed.prev_checkpoint_path)  # the rename done, the write not
    resumed = Trainer(_spec(), tiny_dataset, tmp_path / "r", killed.checkpoint_path, device="cpu")
    assert resumed.try_resume() and resumed.step == 8
    assert resumed.checkpoint_path.exists() and not resumed.prev_checkpoint_path.exists()
    resumed.run(progress=False)
    _assert_same_result(tmp_path / "full", tmp_path / "r")


def test_checked_file_roundtrip_and_legacy_plain_file(tmp_path):
    obj = {"a": torch.arange(5), "b": [1, 2]}
    save_torch_checked(obj, tmp_path / "x.pt")
    back = load_torch_checked(tmp_path / "x.pt")
    assert torch.equal(back["a"], obj["a"]) and back["b"] == [1, 2]
    torch.save(obj, tmp_path / "plain.pt")  # written by an older version: still loads when complete
    assert load_torch_checked(tmp_path / "plain.pt")["b"] == [1, 2]
    (tmp_path / "cut.pt").write_bytes((tmp_path / "plain.pt").read_bytes()[:-200])
    with pytest.raises(CorruptFileError, match="no checksum trailer"):
        load_torch_checked(tmp_path / "cut.pt")
