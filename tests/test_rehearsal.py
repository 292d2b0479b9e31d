"""The rehearsal overlay (workflow/configs/rehearsal.yaml): every paper config at toy sizes.

Fast tests check what the overlay keeps and what it shrinks; the slow ones run each paper config's whole DAG
through the overlay with the local executor (README "Rehearsal") and check the rendered outputs.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from diffbias import plan
from diffbias.config import ConfigError, all_runs, pca_source, study_datasets, validate_config
from diffbias.data import load_fixture, load_pool
from diffbias.models import BACKBONES, resolve_options
from diffbias.models.attention import parse_attention_spec

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "workflow/configs/rehearsal.yaml"
PAPER_CONFIGS = ["paper-000", "paper-002", "paper-002-pixel32", "paper-003", "paper-003-pixel32", "paper-004"]


def _raw(name: str) -> dict:
    return yaml.safe_load((ROOT / f"workflow/configs/{name}.yaml").read_text())


def _rehearsed(name: str, **rehearsal) -> dict:
    """The paper config with the overlay deep-merged on top, as Snakemake merges later --configfile's."""
    merged = {**_raw(name), **yaml.safe_load(OVERLAY.read_text())}
    merged["rehearsal"] = {**merged["rehearsal"], **rehearsal}
    return validate_config(merged)


def _model(cfg: dict, variant: str) -> tuple[str, dict]:
    v = cfg["variants"][variant]
    return resolve_options(v.get("backbone"), v.get("preset"), v.get("options"))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_overlay_keeps_the_design_and_shrinks_the_sizes(name):
    paper, rehearsed = validate_config(_raw(name)), _rehearsed(name)
    assert rehearsed["results_dir"] == f"results/rehearsal/{name}"
    assert rehearsed["reports_dir"] == f"results/rehearsal/{name}/reports"
    assert rehearsed["variants"].keys() == paper["variants"].keys()
    assert rehearsed["studies"].keys() == paper["studies"].keys()
    for variant in paper["variants"]:
        (backbone, big), (same_backbone, tiny) = _model(paper, variant), _model(rehearsed, variant)
        assert same_backbone == backbone
        for key, value in big.items():  # depth, patch, attention spec, hourglass, sharing ... all kept
            if key not in BACKBONES[backbone].rehearsal_options and key != "pca_components":
                assert tiny[key] == value, (variant, key)
    for study, spec in paper["studies"].items():
        small = rehearsed["studies"][study]
        assert small["variants"] == spec["variants"]
        assert small["seeds"] == spec["seeds"][:2]
        assert study_datasets(small) == study_datasets(spec)[:2]
        assert len(small["N"]) == min(2, len(spec["N"]))
        assert small["N"] == sorted(small["N"]) and max(small["N"]) <= 96  # order kept, toy sizes
        assert small["scale_note"].startswith("REHEARSAL")
    for ds in rehearsed["datasets"].values():
        assert ds["source"] == "fixture" and ds["max_images"] == 128
    training = rehearsed["training"]
    assert training["steps"] == 6 and training["batch_size"] == 4
    assert training["ema_warmup"]  # else a 0.9999 EMA stays at the initialisation and every model samples alike
    for variant in rehearsed["variants"].values():  # per-variant overrides shrink too
        override = variant.get("training", {})
        assert override.get("steps", 6) == 6 and all(s < 6 for s in override.get("snapshot_steps", []))
    assert rehearsed["device"] == "cpu"
    assert all(group.get("gpu", 0) == 0 for group in rehearsed["resources"].values())
    assert validate_config(rehearsed) == rehearsed  # applying it is idempotent (Snakemake and the CLI both validate)


def test_paper_004_rehearsal_holds_its_largest_window_and_keeps_twelve_layers():
    cfg = _rehearsed("paper-004")
    windows = parse_attention_spec(cfg["variants"]["xs_local_smaller_win"]["options"]["attention"], 12)
    assert max(w for w in windows if w) == 19
    assert {ds["resolution"] for ds in cfg["datasets"].values()} == {24}  # 19 at patch 1, next multiple of 8
    for variant in cfg["variants"]:
        backbone, options = _model(cfg, variant)
        if backbone == "dit":
            assert options["depth"] == 12 and options["hidden_size"] == 32
    # every comparison over N keeps its order: 10 < 1e3 < 1e4 < 1e5 become 8 < 16 < 32 < 48 in every study and
    # list; a study keeps its smallest and largest N
    assert cfg["studies"]["fig2_psnr_curves"]["N"] == [8, 48]
    assert cfg["studies"]["fig6_local_vs_global"]["N"] == [16, 48]
    assert cfg["studies"]["table1_dagger"]["N"] == [32, 48]
    assert cfg["evaluation"]["jacobian"]["N"] == [8, 48]
    assert cfg["evaluation"]["fid"]["N"] == [32, 48]  # table 1's dagger rows keep 1e4
    # app. C: the PCs still come from the ImageNet model at the largest N, used on CelebA
    pca = cfg["variants"]["xs_pca"]["pca_from"]
    assert pca["dataset"] == "imagenet" and pca["N"] == 48
    run = next(r for r in all_runs(cfg) if r.variant == "xs_pca")
    assert pca_source(run, pca).path == f"imagenet/xs/N48/seed{run.seed}" and run.dataset == "celeba"


def test_snapshots_and_warmup_scale_with_the_run():
    cfg = _rehearsed("paper-002")
    assert cfg["training"]["snapshot_steps"] == [1, 5]  # 5k..30k of 35k: the first and the last
    ablation = _rehearsed("paper-003")["variants"]["diffussm_p2"]["training"]
    assert ablation["snapshot_steps"] == [1, 5]
    assert _rehearsed("paper-000")["training"]["warmup_steps"] == 1  # 2.5k of 500k: still warms up
    assert _rehearsed("paper-000")["training"]["betas"] == [0.99, 0.999]


def test_latent_data_sets_rehearse_as_latents_through_a_tiny_vae():
    from diffbias.latents import model_input

    cfg = _rehearsed("paper-003")
    assert set(cfg["datasets"]) == {"imagenet256", "imagenet512", "lsun_church", "lsun_bedroom"}
    for key, ds in cfg["datasets"].items():
        assert ds["latents"]["autoencoder"] == "results/rehearsal/paper-003/autoencoders/tiny-sd-vae"
        assert ds["latents"]["hflip"] and ds["latents"]["shard_size"] == 64  # several shards
        assert ds["resolution"] == 128 and model_input(ds) == (4, 16)  # the pixel rehearsal's 16x16 grid, as latents
        assert ds["split"] == "official" and "test_path" not in ds  # the fixture's own official test part
    training = {v: spec.get("training", {}) for v, spec in cfg["variants"].items()}
    assert training["diffussm_xl_cond"]["gpus_per_run"] == 2 and training["diffussm_l"]["gpus_per_run"] == 2
    assert "gpus_per_run" not in training["diffussm_s"] and training["diffussm_xl_cond"]["steps"] == 6
    assert "reference_statistics" not in cfg["evaluation"]["fid"]  # ADM's files are not here: the reference images
    assert cfg["studies"]["imagenet"]["fid_guided"] == {"guidance_scale": 1.5}
    pixel = _rehearsed("paper-003-pixel32")
    assert all("latents" not in ds and ds["resolution"] == 16 for ds in pixel["datasets"].values())


def test_too_few_fixture_images_or_n_values_fail_with_the_key():
    with pytest.raises(ConfigError) as err:
        _rehearsed("paper-004", fixture_images=40)
    assert err.value.key == "rehearsal.fixture_images"
    with pytest.raises(ConfigError) as err:
        _rehearsed("paper-004", N_values=[8, 16])
    assert err.value.key == "rehearsal.N_values"
    with pytest.raises(ConfigError) as err:
        _rehearsed("paper-004", steps=1)
    assert err.value.key == "rehearsal.steps"


def test_fixture_data_are_deterministic_labelled_and_distinct_per_name():
    a, labels = load_fixture("celeba", max_images=20)
    b, _ = load_fixture("celeba", max_images=20)
    c, _ = load_fixture("imagenet", max_images=20)
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert list(labels[:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert a.std() > 30  # structured images, not a flat fill
    grey, _ = load_pool("fixture", "celeba", resolution=16, channels=1, max_images=5)
    assert grey.shape == (5, 1, 16, 16)


# ---------------------------------------------------------------------------------------------- Snakemake


def snakemake(*args, cwd, timeout=3600, **extra_env):  # paper-004: ~24 min on 2 idle cores
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra_env)
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "2", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _configfiles(name: str, rehearse: bool) -> list[str]:
    files = [str(ROOT / f"workflow/configs/{name}.yaml")] + ([str(OVERLAY)] if rehearse else [])
    return ["--configfile", *files]


def dag_rules(name: str, rehearse: bool, cwd) -> dict[str, int]:
    """Rule name -> job count of a dry run (the paper data sets are not here: their on-disk check is skipped)."""
    done = snakemake(*_configfiles(name, rehearse), "-n", "--quiet", "rules", cwd=cwd, DIFFBIAS_SKIP_DATA_CHECK="1")
    assert done.returncode == 0, done.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", done.stdout + done.stderr, flags=re.M))
    counts.pop("total", None)
    return {rule: int(n) for rule, n in counts.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_rehearses_end_to_end(name, tmp_path):
    """The whole DAG of the paper config, shrunk by the overlay, has the paper DAG's rules, runs locally and renders
    every study's report."""
    paper, rehearsal = dag_rules(name, False, tmp_path), dag_rules(name, True, tmp_path)
    latent = any(ds.get("latents") for ds in _raw(name)["datasets"].values())
    # the rehearsal makes the tiny autoencoder a paper config fetches once
    assert paper and set(rehearsal) == set(paper) | ({"tiny_autoencoder"} if latent else set())
    assert sum(rehearsal.values()) <= sum(paper.values()) + latent
    start = time.monotonic()
    done = snakemake(*_configfiles(name, True), "--keep-going", cwd=tmp_path)
    wall = time.monotonic() - start
    print(f"{name} rehearsal: {wall:.0f} s")
    cfg = _rehearsed(name)
    logs = tmp_path / cfg["results_dir"] / "logs"
    failed = sorted({m for m in re.findall(r"Error in rule (\w+):", done.stdout + done.stderr)})
    assert done.returncode == 0, f"failed rules {failed}; see {logs}\n{done.stderr[-3000:]}"
    results = tmp_path / cfg["results_dir"]
    for study, spec in cfg["studies"].items():
        pdf = tmp_path / cfg["reports_dir"] / f"{study}.pdf"
        assert pdf.exists() and pdf.read_bytes()[:4] == b"%PDF", study
        for table, path in plan.study_tables(cfg, study).items():  # every table the study's report reads
            assert (tmp_path / path).exists(), (study, table)
        psnr = pd.read_parquet(results / "studies" / study / "psnr.parquet")
        assert set(psnr["variant"]) == set(spec["variants"])
        assert set(psnr["N"]) == set(spec["N"]) and set(psnr["seed"]) == set(spec["seeds"])
        if "dataset" in psnr:
            assert set(psnr["dataset"]) == set(study_datasets(spec))
        fid_table = results / "studies" / study / "fid.parquet"
        if fid_table.exists() and len(spec["variants"]) > 1:  # the evaluated weights are the trained ones
            assert pd.read_parquet(fid_table)["fid"].nunique() > 1, study
    if name == "paper-004":
        _check_paper_004_report(results)
    again = snakemake(*_configfiles(name, True), "-n", cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr


# The rehearsed paper-004 reports: study -> sections that must be rendered (paper 004's tables 1-3 and figs. 2, 3,
# 6-8 and 12).
PAPER_004_SECTIONS = {
    "fig2_psnr_curves": ["PSNR of one-step denoising, train vs test", "Jacobian eigenvectors and spectra"],  # figs. 2, 3
    "fig6_local_vs_global": ["Mean PSNR gap per data set", "PSNR gap per training-set size",  # fig. 6
                             "FID, KID, precision and recall"],  # table 1
    "fig7_placement": ["Mean PSNR gap per data set", "PSNR gap per training-set size", "FID, KID, precision and recall"],
    "fig8_window_size": ["Mean PSNR gap per data set", "PSNR gap per training-set size", "FID, KID, precision and recall"],
    "appc_parameter_reduction": ["Appendix C: weight sharing and PCA attention",  # fig. 12
                                 "Appendix C: FID with weight sharing and PCA attention"],  # table 5
}


def _check_paper_004_report(results):
    """Per-data-set tables 1-3, figures 2, 3, 6-8 and 12, each backbone against its own baseline."""
    for study, wanted in PAPER_004_SECTIONS.items():
        sections = {s["title"]: s["status"] for s in
                    json.loads((results / "studies" / study / "tables/report_sections.json").read_text())["sections"]}
        for title in wanted:
            assert sections[title] == "rendered", (study, title, sections[title])
    for study in ("fig6_local_vs_global", "fig7_placement", "fig8_window_size"):
        for table in ("psnr_gap.md", "fid.md"):
            header = (results / "studies" / study / "tables" / table).read_text().splitlines()[0]
            assert "celeba N = " in header and "imagenet N = " in header, (study, table, header)  # per data set
    gap = (results / "studies/fig6_local_vs_global/tables/psnr_gap.md").read_text()
    assert "| vs DiT-XS/1 |" in gap and "| vs DiT-S/1 |" in gap  # each backbone against its own baseline
    assert "UNet-004" in (results / "studies/fig2_psnr_curves/tables/psnr_gap.md").read_text()


@pytest.mark.parametrize("change", ["unknown", "resolution"])
def test_pca_from_another_dataset_is_checked_before_any_job(change):
    raw = _raw("paper-004")
    if change == "unknown":
        raw["variants"]["xs_pca"]["pca_from"]["dataset"] = "imagenet64"
    else:
        raw["datasets"]["imagenet"]["resolution"] = 64
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert err.value.key == "variants.xs_pca.pca_from.dataset"


def test_every_backbone_declares_its_tiny_width_and_every_paper_preset_builds_with_it():
    from diffbias.config import _meta_build_error
    from diffbias.models import PRESETS

    for name, cls in BACKBONES.items():
        assert isinstance(getattr(cls, "rehearsal_options", None), dict), name
        assert not {"depth", "depths", "num_res_blocks", "channel_mult", "attention"} & set(cls.rehearsal_options), name
    for preset in PRESETS.values():
        if not preset.tiny:
            options = {**preset.options, **BACKBONES[preset.backbone].rehearsal_options}
            assert _meta_build_error(preset.backbone, json.dumps(options, sort_keys=True), 3, 16, 10) is None, preset.name
