"""The FID measurements as the rules call them: a shared reference, the FID job, the FID curve and the FreeU grid.

Tiny models trained for a few steps on 120 random 16x16 images; 8 samples of 3 steps each, so the costs are
Inception on a few dozen images. What is checked is bookkeeping, not quality: the shared reference gives the
same numbers as a reference computed in the job, the curve's final point is the FID job's row, and a reference
file made for another run is refused.
"""

import json

import numpy as np
import pandas as pd
import pytest

from diffbias import cli as diffbias_cli
from diffbias.config import RunKey, run_spec, validate_config
from diffbias.train import Trainer

pytest.importorskip("torch_fidelity")

SETTINGS = json.dumps({"num_samples": 8, "sampling_steps": 3, "reference": "train", "max_reference": 8, "batch_size": 8})
FID = ["--config", SETTINGS, "--device", "cpu", "--threads", "1"]


def cli(*args):
    """The command line as a rule calls it, in this process (`python -m diffbias ...`)."""
    diffbias_cli.main([str(a) for a in args])


def train(tiny_dataset, tmp_path, preset, n=40, snapshots=()):
    cfg = validate_config({
        "datasets": {"tiny": {"source": "npz", "path": "unused.npz", "resolution": 16, "channels": 1, "test_size": 20}},
        "training": {"steps": 4, "batch_size": 4, "checkpoint_every": 100, "log_every": 2,
                     "snapshot_steps": list(snapshots)},
        "variants": {"v": {"preset": preset}},
        "studies": {"s": {"dataset": "tiny", "variants": ["v"], "N": [n], "seeds": [0]}},
    })
    out = tmp_path / preset.replace("/", "_")
    Trainer(run_spec(cfg, RunKey("tiny", "v", n, 0)), tiny_dataset, out, tmp_path / "ck.pt", device="cpu").run(progress=False)
    return out


def test_shared_reference_fid_and_curve_agree(tiny_dataset, tmp_path):
    run = train(tiny_dataset, tmp_path, "DiT-T/2", snapshots=(2,))
    ref = tmp_path / "ref.npz"
    cli("shared-input", "fid_reference", "--data", tiny_dataset, "--out", ref, "--n", 40, "--seed", 0, "--test-size", 20,
        "--config", SETTINGS, "--device", "cpu", "--threads", 1)
    with np.load(ref) as f:
        assert f["features"].shape == (8, 2048) and int(f["N"]) == 40

    cli("measure", "fid", "--model", run / "model.pt", "--data", tiny_dataset, "--out", tmp_path / "shared.parquet",
        "--arrays-out", tmp_path / "s1.npz", "--input", f"shared:fid_reference={ref}", *FID)
    cli("measure", "fid", "--model", run / "model.pt", "--data", tiny_dataset, "--out", tmp_path / "own.parquet",
        "--arrays-out", tmp_path / "s2.npz", *FID)
    shared, own = pd.read_parquet(tmp_path / "shared.parquet"), pd.read_parquet(tmp_path / "own.parquet")
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert shared[key].iloc[0] == pytest.approx(own[key].iloc[0], rel=1e-6), key
    assert shared["kid_subset_size"].iloc[0] == 4 and shared["kid_std"].iloc[0] > 0  # half the 8 samples

    cli("measure", "fid_curve", "--model", run / "model.pt", "--input", f"snapshots={run / 'ema_snapshots'}", "--data",
        tiny_dataset, "--out", tmp_path / "curve.parquet", "--input", f"shared:fid_reference={ref}",
        "--input", f"table:fid={tmp_path / 'shared.parquet'}", *FID)
    curve = pd.read_parquet(tmp_path / "curve.parquet").sort_values("step")
    assert list(curve["step"]) == [2, 4] and list(curve["final"]) == [False, True]
    assert curve["fid"].iloc[1] == shared["fid"].iloc[0]  # reused, not recomputed

    # a reference made for another N is refused rather than silently used
    other = tmp_path / "other.npz"
    cli("shared-input", "fid_reference", "--data", tiny_dataset, "--out", other, "--n", 30, "--seed", 0, "--test-size", 20,
        "--config", SETTINGS, "--device", "cpu", "--threads", 1)
    with pytest.raises(SystemExit, match="was computed for"):
        cli("measure", "fid", "--model", run / "model.pt", "--data", tiny_dataset, "--out", tmp_path / "bad.parquet",
            "--arrays-out", tmp_path / "bad.npz", "--input", f"shared:fid_reference={other}", *FID)
    assert not (tmp_path / "bad.parquet").exists()


def test_freeu_grid_scores_every_b_s_pair_with_paired_seeds(tiny_dataset, tmp_path):
    run = train(tiny_dataset, tmp_path, "UViT-T/2")
    cli("measure", "freeu", "--model", run / "model.pt", "--data", tiny_dataset, "--out", tmp_path / "freeu.parquet",
        "--arrays-out", tmp_path / "freeu.npz", "--device", "cpu", "--threads", 1, "--config",
        json.dumps({"b": [1.0, 1.4], "s": [1.0], "num_samples": 8, "max_reference": 8, "sampling_steps": 3, "batch_size": 8,
                    "keep": 2}))
    df = pd.read_parquet(tmp_path / "freeu.parquet")
    assert sorted(zip(df["b"], df["s"])) == [(1.0, 1.0), (1.4, 1.0)]
    assert df["fid"].notna().all() and (df["kid_subset_size"] == 4).all()
    with np.load(tmp_path / "freeu.npz") as f:
        assert sorted(f.files) == ["b1.0_s1.0", "b1.4_s1.0"] and f["b1.0_s1.0"].shape[0] == 2
    assert json.loads(json.dumps(df["variant"].iloc[0])) == "v"
