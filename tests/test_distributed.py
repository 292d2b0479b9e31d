"""One training on several processes: torch.distributed (gloo on the CPU) under the real torchrun launcher.

Two processes at the same global batch give the one-process losses and weights (to float rounding), and a run
whose whole process group is SIGKILLed resumes to exactly the uninterrupted two-process result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from diffbias import distributed
from diffbias.config import all_runs, load_config, run_spec, spec_hash
from diffbias.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 60, 10


def _spec(**training):
    cfg = {
        "steps": STEPS, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.0, "ema_decay": 0.99, "ema_warmup": True,
        "hflip": True, "class_conditional": True, "label_dropout": 0.1, "checkpoint_every": EVERY,
        "log_every": EVERY, "grad_clip": 1.0, **training,
    }
    return {
        "run": {"dataset": "tiny", "variant": "dit", "N": 20, "seed": 3},
        "dataset": {"source": "npz", "resolution": 16, "channels": 1, "test_size": 20},
        "model": {"backbone": "dit", "preset": "DiT-T/2",
                  "options": {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "attention": "3,G"}},
        "training": cfg,
    }


# ---------------------------------------------------------------------------------------------- units
def test_rank_from_torchrun_or_srun_environment():
    assert distributed.from_environment({}) is None
    assert distributed.from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert distributed.from_environment({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "2"}) == distributed.Rank(2, 4, 2)
    srun = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2"}
    assert distributed.from_environment(srun) == distributed.Rank(1, 2, 1)
    # torchrun inside a one-task SLURM step: torchrun's variables win
    assert distributed.from_environment({**srun, "SLURM_STEP_NUM_TASKS": "1", "WORLD_SIZE": "2", "RANK": "0",
                                         "LOCAL_RANK": "0"}) == distributed.Rank(0, 2, 0)
    # the batch script of a --ntasks=4 job is one process, not rank 0 of 4
    assert distributed.from_environment({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) is None


def test_global_batch_split_and_launch_command():
    assert distributed.local_batch_size(256, 8) == 32
    with pytest.raises(ValueError, match=r"training\.batch_size=10 is not divisible by the 4 processes"):
        distributed.local_batch_size(10, 4)
    assert distributed.train_launcher(_spec()) == "python -m diffbias"
    assert distributed.train_launcher(_spec(gpus_per_run=4)) == "torchrun --standalone --nproc_per_node=4 -m diffbias"
    assert distributed.train_gpus(_spec(gpus_per_run=4), 1) == 4
    assert distributed.train_gpus(_spec(), 1) == 1 and distributed.train_gpus(_spec(gpus_per_run=4), 0) == 0


def test_gpus_per_run_of_one_keeps_the_run_hash():
    config = load_config(str(ROOT / "config.yaml"))
    key = all_runs(config)[0]
    before = run_spec(config, key)
    assert "gpus_per_run" not in before["training"]
    config["training"]["gpus_per_run"] = 1
    assert run_spec(config, key) == before and spec_hash(run_spec(config, key)) == spec_hash(before)
    config["training"]["gpus_per_run"] = 2
    assert run_spec(config, key)["training"]["gpus_per_run"] == 2


# ---------------------------------------------------------------------------------------------- torchrun
def _torchrun(spec, data, out, ckpt, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = (f"{distributed.train_launcher(spec)} train --spec '{json.dumps(spec)}' --data {data} --out-dir {out} "
           f"--checkpoint {ckpt} --device cpu --threads 1")
    return subprocess.Popen(cmd, shell=True, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), whatever session or process group it is in."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """The attention's key bias shifts every logit of a query equally, so softmax ignores it and its true gradient
    is 0; AdamW turns the float-rounding residue of that 0 into steps of ~lr * g / eps, which differ between any
    two summation orders. It cannot change the model's output: compare everything else."""
    if name.endswith("attn.qkv.bias"):
        d = t.shape[0] // 3
        return torch.cat([t[:d], t[2 * d:]])
    return t


def _log(d):
    return pd.read_parquet(d / "train_log.parquet")[["step", "loss", "mse", "vb"]]


def _ema(d):
    return torch.load(d / "model.pt", weights_only=False)["ema"]


def test_two_processes_equal_one_and_survive_a_kill(tiny_dataset, tmp_path):
    one = Trainer(_spec(), tiny_dataset, tmp_path / "one", tmp_path / "one.ckpt", device="cpu")
    assert one.local_batch == 8 and one.dist is None
    one.run(progress=False)

    two_spec = _spec(gpus_per_run=2)
    two = _torchrun(two_spec, tiny_dataset, tmp_path / "two", tmp_path / "two.ckpt", tmp_path)

    # the same run, its whole process group SIGKILLed once rank 0 has written a checkpoint, then started again
    killed = _torchrun(two_spec, tiny_dataset, tmp_path / "killed", tmp_path / "killed.ckpt", tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed.ckpt").exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert killed.poll() is None, killed.communicate()[0]  # still running: the kill comes mid-run
    # torchrun starts its workers in sessions of their own: kill the launcher and every worker at once, as SLURM
    # does with a job's cgroup
    for pid in [killed.pid, *_descendants(killed.pid)]:
        os.kill(pid, signal.SIGKILL)
    killed.communicate()
    # a checkpoint is left (the latest, or only the previous one if the kill fell inside a rotation), no outputs
    assert {p.name for p in tmp_path.glob("killed*.pt")} <= {"killed.ckpt", "killed.prev.ckpt"}
    assert (tmp_path / "killed.ckpt").exists() or (tmp_path / "killed.prev.ckpt").exists()
    assert not (tmp_path / "killed" / "model.pt").exists()
    _finish(two)
    resumed = _finish(_torchrun(two_spec, tiny_dataset, tmp_path / "killed", tmp_path / "killed.ckpt", tmp_path))
    assert "resumed from" in resumed and "rank 1 of 2" in resumed and "backend gloo" in resumed

    lo, lt, lk = _log(tmp_path / "one"), _log(tmp_path / "two"), _log(tmp_path / "killed")
    assert list(lt["step"]) == list(range(EVERY, STEPS + 1, EVERY))
    # two ranks of 4 samples each == one process of 8: the same losses and weights, to float rounding
    pd.testing.assert_frame_equal(lo, lt, check_exact=False, rtol=1e-5, atol=1e-6)
    eo, et, ek = _ema(tmp_path / "one"), _ema(tmp_path / "two"), _ema(tmp_path / "killed")
    for k in eo:  # measured: every difference below 1e-7
        torch.testing.assert_close(_without_key_bias(k, et[k]), _without_key_bias(k, eo[k]), rtol=1e-5, atol=1e-6,
                                   msg=k)
    # killed and resumed == uninterrupted, exactly
    pd.testing.assert_frame_equal(lk, lt)
    assert all(torch.equal(ek[k], et[k]) for k in et)
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["spec"]["training"]["gpus_per_run"] == 2
