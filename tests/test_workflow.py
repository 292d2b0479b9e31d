"""End to end through Snakemake on the micro config, in a temporary working directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from diffbias.io import read_parquet_metadata

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make setup installs it)")


def snakemake(*args, cwd, **extra_env):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra_env)
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "2", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )


@pytest.mark.slow
def test_micro_study_end_to_end(tmp_path):
    cfg = str(ROOT / "workflow/configs/micro.yaml")
    done = snakemake("--configfile", cfg, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    pdf = tmp_path / "reports/micro.pdf"
    assert pdf.exists() and pdf.read_bytes()[:4] == b"%PDF"
    psnr = pd.read_parquet(tmp_path / "results/studies/micro/psnr.parquet")
    assert set(psnr["variant"]) == {"dit", "dit_local"} and set(psnr["N"]) == {10, 50}
    assert len(psnr) == 2 * 2 * 5 and psnr["psnr_train"].notna().all()
    meta = read_parquet_metadata(tmp_path / "results/studies/micro/psnr.parquet")
    run_meta = next(iter(meta["runs"].values()))
    assert run_meta["packages"]["torch"] and "device" in run_meta and "git_commit" in run_meta
    run_dir = tmp_path / "results/runs/fmnist8/dit_local/N10/seed0"
    assert {"model.pt", "train_log.parquet", "run.json", "psnr.parquet"} <= {p.name for p in run_dir.iterdir()}
    assert (tmp_path / "results/studies/micro/tables/psnr_gap.tex").exists()
    # FID over training: the EMA snapshot at step 10 and the final model at 20, for every N=50 run
    curve = pd.read_parquet(tmp_path / "results/studies/micro/fid_curve.parquet")
    assert sorted(curve.groupby("variant")["step"].apply(list).sum()) == [10, 10, 20, 20]
    assert set(curve["N"]) == {50} and curve["fid"].notna().all() and curve.loc[curve["step"] == 20, "final"].all()
    assert (tmp_path / "results/studies/micro/figures/fid_curve.png").exists()
    log = pd.read_parquet(tmp_path / "results/studies/micro/train_log.parquet")
    assert (log["peak_memory_mb"] > 0).all()
    assert not list((tmp_path / "results").rglob("*.tmp"))  # nothing half-written left behind
    # Nothing to do on a second invocation: outputs are complete and up to date.
    again = snakemake("--configfile", cfg, "-n", cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_bad_config_fails_before_any_job_with_the_key(tmp_path):
    bad = (ROOT / "workflow/configs/micro.yaml").read_text().replace('attention: "3,G"', 'attention: "5,G"')
    (tmp_path / "bad.yaml").write_text(bad)
    result = snakemake("--configfile", "bad.yaml", "-n", cwd=tmp_path)
    assert result.returncode != 0
    assert "variants.dit_local.options.attention" in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


def test_paper_scale_dag_builds(tmp_path):
    # the paper's data sets live on the cluster, not here: skip the on-disk data check (README "Configuration")
    result = snakemake("--configfile", str(ROOT / "workflow/configs/paper-004.yaml"), "-n", "--quiet", "rules", cwd=tmp_path,
                       DIFFBIAS_SKIP_DATA_CHECK="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train" in result.stdout + result.stderr
