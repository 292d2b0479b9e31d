"""Kill anywhere, lose nothing: SIGKILL the whole local Snakemake run at random moments, rerun the README's
command, and the study tables equal those of an uninterrupted run.

The workflow is the micro study (workflow/configs/micro.yaml) without its two FID measurements (Inception
on a CPU is 2/3 of its run time; training, EMA snapshots, PSNR, Jacobian, attention, counts, aggregation
and the report all stay) and with 120 training steps (checkpoints every 10), so that kills land in
trainings too. Both runs use one frozen copy of the repository (code edited meanwhile in the checkout
cannot make them differ), each in its own working directory, with the README's local command:

    snakemake --cores 2 --configfile micro.yaml      (profiles/default adds rerun-incomplete)
    snakemake --unlock ...                           (after a kill, as the README says)

The kill moments are drawn with a seeded RNG inside the uninterrupted run's wall time; each kill takes the
whole process group (Snakemake and every job it started) with SIGKILL, mid-job or between jobs.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
SEED = 14
KILLS = 3
VOLATILE = re.compile(r"(_s$|per_s|memory)")  # wall times, throughput, peak memory: differ run to run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make setup installs it)"),
]


def _config(tmp: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "workflow/configs/micro.yaml").read_text())
    cfg["evaluation"]["fid"]["N"] = []
    cfg["evaluation"]["fid_curve"]["N"] = []
    cfg["training"].update(steps=120, checkpoint_every=10, log_every=10, snapshot_steps=[60])
    path = tmp / "micro-kill.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _frozen_repo(tmp: Path) -> Path:
    """A copy of the workflow and library (jobs run src/ of the Snakefile's directory)."""
    repo = tmp / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".snakemake", "results", ".pytest_cache", "__pycache__", "*.egg-info", ".cache", "build",
        "*.pdf"))
    return repo


def _cmd(repo: Path, config: Path, *extra: str) -> list[str]:
    # the README's local command (`snakemake --cores all` with a --configfile), 2 cores as in CI
    return [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--cores", "2",
            "--configfile", str(config), *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def _start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "a") as f:
        f.write(f"\n===== {time.strftime('%H:%M:%S')} {' '.join(cmd[3:])}\n")
        f.flush()
        # own session: the process group holds Snakemake and every job it runs
        return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _group_alive(pgid: int, wait: float = 10.0) -> list[str]:
    """Live (non-zombie) processes of process group `pgid`, after waiting up to `wait` s for them to go."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp
                alive.append(stat.parent.name)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _tables(wd: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for path in sorted((wd / "results/studies/micro").glob("*.parquet")):
        df = pd.read_parquet(path)
        out[path.name] = df[[c for c in df.columns if not VOLATILE.search(c)]]
    return out


def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_tables(tmp_path):
    config = _config(tmp_path)
    repo = _frozen_repo(tmp_path)

    # 1. the reference: one uninterrupted run
    ref = tmp_path / "uninterrupted"
    ref.mkdir()
    t0 = time.monotonic()
    proc = _start(_cmd(repo, config), ref, tmp_path / "uninterrupted.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "uninterrupted.log").read_text()[-4000:]
    duration = time.monotonic() - t0
    expected = _tables(ref)
    assert {"psnr.parquet", "train_log.parquet", "jacobian.parquet", "attention.parquet"} <= set(expected)

    # 2. the same command, SIGKILLed (whole process group) at KILLS random moments, each rerun after --unlock
    wd = tmp_path / "killed"
    wd.mkdir()
    log = tmp_path / "killed.log"
    rng = random.Random(SEED)
    # moments in seconds of each attempt; their sum stays inside the uninterrupted run's duration
    moments = [rng.uniform(0.05, 0.3) * duration for _ in range(KILLS)]
    kills = []
    t1 = time.monotonic()
    for at in moments:
        proc = _start(_cmd(repo, config), wd, log)
        try:
            rc = proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            assert not _group_alive(proc.pid), "a process survived the SIGKILL of its process group"
            rc = None
        kills.append((round(at, 1), "killed" if rc is None else f"finished first (rc {rc})"))
        unlock = subprocess.run(_cmd(repo, config, "--unlock"), cwd=wd, env=_env(), capture_output=True, text=True)
        assert unlock.returncode == 0, unlock.stderr[-2000:]
    proc = _start(_cmd(repo, config), wd, log)
    assert proc.wait(timeout=900) == 0, log.read_text()[-6000:]
    killed_wall = time.monotonic() - t1
    text = log.read_text()
    print(f"\n[kill test] uninterrupted {duration:.0f}s; kills (s into each attempt): {kills}; "
          f"killed + reruns {killed_wall:.0f}s; trainings resumed from a checkpoint: {text.count('resumed from')}")

    # 3. every study table equals the uninterrupted run's (wall times, throughput, memory excluded)
    got = _tables(wd)
    assert set(got) == set(expected)
    for name, df in expected.items():
        pd.testing.assert_frame_equal(got[name], df, check_exact=True, obj=name)
    assert (wd / "reports/micro.pdf").read_bytes()[:4] == b"%PDF"
    again = subprocess.run(_cmd(repo, config, "-n"), cwd=wd, env=_env(), capture_output=True, text=True)
    assert "Nothing to be done" in again.stdout + again.stderr
    # every training finished: no side checkpoint is left behind (they are removed with the outputs written)
    assert not list(wd.glob("results/checkpoints/**/*.pt")), text[-3000:]

