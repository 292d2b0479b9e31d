"""diffbias.plan: what the workflow runs, computed from a config without Snakemake (the rules' input functions call
these and nothing else)."""

from pathlib import Path

import pytest
import yaml

from diffbias import plan
from diffbias.config import RunKey, validate_config

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    return validate_config(yaml.safe_load((ROOT / name).read_text()))


@pytest.fixture(scope="module")
def micro():
    return load("workflow/configs/micro.yaml")


def test_instances_and_the_runs_they_apply_to(micro):
    inst = plan.instances(micro)
    assert set(inst) == {"psnr", "memorisation", "reproducibility", "fid", "fid_curve", "jacobian", "attention",
                         "gmm_masks"}  # no FreeU grid declared
    runs = {name: [r.n for r in plan.measured_runs(micro, "micro", i)] for name, i in inst.items()}
    assert runs["psnr"] == [10, 50, 10, 50] and runs["fid"] == [50, 50] and runs["fid_curve"] == [50, 50]
    assert runs["gmm_masks"] == []  # DiT has no masks
    assert runs["reproducibility"] == []  # no variant has a split-B twin
    assert runs["memorisation"] == [10, 10]


def test_study_tables_inputs_and_array_packs(micro):
    tables = plan.study_tables(micro, "micro")
    assert set(tables) == {"train_log", "counts", "psnr", "memorisation", "fid", "fid_curve", "jacobian", "attention"}
    assert tables["fid"] == "results/studies/micro/fid.parquet"
    assert plan.table_inputs(micro, "micro", "fid") == ["results/runs/fmnist8/dit/N50/seed0/fid.parquet",
                                                        "results/runs/fmnist8/dit_local/N50/seed0/fid.parquet"]
    assert len(plan.table_inputs(micro, "micro", "train_log")) == 4
    packs = plan.study_arrays(micro, "micro")
    assert set(packs) == {"memorisation", "fid", "jacobian", "attention"}  # the measurements with arrays
    fid = packs["fid"]
    assert fid.out == "results/studies/micro/arrays/fid.npz" and fid.preview_items == 16
    assert fid.runs == ("fmnist8/dit/N50/seed0", "fmnist8/dit_local/N50/seed0")
    assert fid.files[0] == "results/runs/fmnist8/dit/N50/seed0/fid.npz"
    assert set(plan.report_inputs(micro, "micro")) == set(tables) | {"arrays_memorisation", "arrays_fid",
                                                                     "arrays_jacobian", "arrays_attention"}


def test_measurement_inputs_follow_the_needs(micro):
    run50, run10 = RunKey("fmnist8", "dit", 50, 0), RunKey("fmnist8", "dit", 10, 0)
    curve = plan.measurement_inputs(micro, "fid_curve", run50)
    assert curve == {"model": "results/runs/fmnist8/dit/N50/seed0/model.pt", "data": "results/data/fmnist8.npz",
                     "snapshots": "results/runs/fmnist8/dit/N50/seed0/ema_snapshots",
                     "shared:fid_reference": "results/shared/fid_reference/fmnist8/N50/seed0.npz",
                     "table:fid": "results/runs/fmnist8/dit/N50/seed0/fid.parquet"}
    assert plan.extra_inputs(curve) == [f"{k}={v}" for k, v in curve.items() if k not in ("model", "data")]
    assert set(plan.measurement_inputs(micro, "psnr", run10)) == {"model", "data"}
    # the final FID point is reused only where the FID measurement runs
    cfg = dict(micro, evaluation=dict(micro["evaluation"], fid=dict(micro["evaluation"]["fid"], N=[])))
    assert "table:fid" not in plan.measurement_inputs(cfg, "fid_curve", run50)


def test_settings_runtime_and_shared_inputs(micro):
    curve = plan.instance_settings(micro, "fid_curve")  # fid's sampling settings plus its own N
    assert curve["N"] == [50] and curve["num_samples"] == 8 and curve["sampling_steps"] == 5
    assert plan.shared_settings(micro, "fid_reference")["max_reference"] == 8
    run = RunKey("fmnist8", "dit", 50, 0)
    assert plan.runtime_minutes(micro, "psnr", run) == 10
    assert plan.runtime_minutes(micro, "fid_curve", run) == 20  # one snapshot + the final model


def test_switched_off_names_the_config_switch(micro):
    cfg = dict(micro, evaluation=dict(micro["evaluation"], jacobian=dict(micro["evaluation"]["jacobian"], N=[])))
    off = plan.switched_off(cfg, "micro")
    assert off == {"jacobian": "evaluation.jacobian.N = [] (study N: [10, 50])",  # not gmm/FreeU: DiT cannot take them
                   "reproducibility": "no variant of the study has a split-B twin (a variant differing only by split: B)"}


def test_study_description_carries_papers_settings_and_switches():
    cfg = validate_config(yaml.safe_load((ROOT / "workflow/configs/paper-000.yaml").read_text()))
    d = plan.study_description(cfg, "gmm_s")
    assert d["papers"] == ["000", "001"] and d["variant_specs"]["uvit_gmm"]["options"]["gmm"] is True
    assert d["settings"]["freeu"]["sample_points"] == [[1.8, 0.85], [1.0, 0.85], [1.3, 1.0]]
    assert "jacobian" in d["switched_off"] and "attention" not in d["switched_off"]
    assert "freeu-gmm_s" in plan.instances(cfg)  # a study-scoped measurement: one instance per study


def test_pca_request_and_training_groups():
    cfg = validate_config(yaml.safe_load((ROOT / "workflow/configs/paper-004.yaml").read_text()))
    source = RunKey("imagenet", "xs", 100000, 43)
    assert plan.pca_request(cfg, source) == {"components": 50, "layers": [1, 2, 3], "num_images": 2048,
                                             "respacing": 50, "timesteps": [10, 25, 40]}
    run = RunKey("celeba", "xs_pca", 1000, 43)
    assert plan.train_inputs(cfg, run)["pca_basis"] == "results/paper-004/runs/imagenet/xs/N100000/seed43/pca_basis.pt"
    assert plan.train_group(cfg, RunKey("celeba", "xs_local", 10, 43)) is None  # 1440-minute budget: single jobs
    micro = load("workflow/configs/micro.yaml")
    assert plan.train_group(micro, RunKey("fmnist8", "dit", 10, 0)) == "train_small"
    assert plan.train_group(micro, RunKey("fmnist8", "dit", 50, 0)) is None
    bad = dict(cfg, variants=dict(cfg["variants"], other={**cfg["variants"]["xs_pca"],
                                                          "options": {**cfg["variants"]["xs_pca"]["options"],
                                                                      "pca_layers": [4]}}))
    with pytest.raises(ValueError, match="different PCA settings"):
        plan.pca_request(bad, source)


# ----------------------------------------------------------------------------------------------------
# Split B, twins and claims
# ----------------------------------------------------------------------------------------------------


def micro_with_twin(**study) -> dict:
    """The micro config with `dit_b`: the baseline's recipe on split B, listed in the study."""
    raw = yaml.safe_load((ROOT / "workflow/configs/micro.yaml").read_text())
    raw["variants"]["dit_b"] = {**raw["variants"]["dit"], "label": "DiT (split B)", "split": "B"}
    raw["studies"]["micro"]["variants"].append("dit_b")
    raw["studies"]["micro"].update(study)
    return raw


def test_a_split_b_twin_pairs_its_runs_and_keys_their_shared_inputs(micro):
    from diffbias.config import run_spec, spec_hash

    cfg = validate_config(micro_with_twin())
    dit, dit_b, local = (RunKey("fmnist8", v, 50, 0) for v in ("dit", "dit_b", "dit_local"))
    assert spec_hash(run_spec(cfg, dit)) == spec_hash(run_spec(micro, dit))  # split-A runs keep their hash
    assert run_spec(cfg, dit_b)["split"] == "B" and "split" not in run_spec(cfg, dit)
    assert plan.twin_run(cfg, dit) == dit_b
    assert plan.twin_run(cfg, local) is None and plan.twin_run(cfg, dit_b) is None  # B runs are not paired again
    repro = plan.instances(cfg)["reproducibility"]
    assert plan.measured_runs(cfg, "micro", repro) == [RunKey("fmnist8", "dit", 10, 0), dit]  # once per pair
    inputs = plan.measurement_inputs(cfg, "reproducibility", dit)
    assert inputs["twin"] == "results/runs/fmnist8/dit_b/N50/seed0/model.pt"
    # the FID reference (training images) of a split-B run is its own file; split A keeps its path
    assert plan.measurement_inputs(cfg, "fid", dit)["shared:fid_reference"] == \
        "results/shared/fid_reference/fmnist8/N50/seed0.npz"
    assert plan.measurement_inputs(cfg, "fid", dit_b)["shared:fid_reference"] == \
        "results/shared/fid_reference/fmnist8/N50/seed0_splitB.npz"
    assert plan.split_from_suffix("_splitB") == "B" and plan.split_from_suffix("") == "A"
    description = plan.study_description(cfg, "micro")
    assert description["twins"] == {"dit": "dit_b"} and "reproducibility" not in description["switched_off"]
    # a study that lists the baseline without its twin has no reproducibility runs
    cfg["studies"]["other"] = {**cfg["studies"]["micro"], "variants": ["dit", "dit_local"]}
    assert plan.measured_runs(cfg, "other", repro) == []


def test_inception_shared_input_only_where_the_measurement_uses_it(micro):
    cfg = validate_config(micro_with_twin(N=[10, 50]) | {
        "evaluation": {**micro_with_twin()["evaluation"], "memorisation": {"N": [10, 50], "inception_max_N": 10}}})
    run10, run50 = RunKey("fmnist8", "dit_b", 10, 0), RunKey("fmnist8", "dit_b", 50, 0)
    assert plan.measurement_inputs(cfg, "memorisation", run10)["shared:train_inception"] == \
        "results/shared/train_inception/fmnist8/N10/seed0_splitB.npz"
    assert "shared:train_inception" not in plan.measurement_inputs(cfg, "memorisation", run50)


def test_split_b_needs_twice_n_in_the_pool():
    from diffbias.config import ConfigError

    raw = micro_with_twin(N=[10, 150])  # 150 + 20 test images fit in 300, 2 x 150 + 20 do not
    with pytest.raises(ConfigError, match="split-B variant") as err:
        validate_config(raw)
    assert err.value.key == "studies.micro.N"
    raw = yaml.safe_load((ROOT / "workflow/configs/micro.yaml").read_text())
    raw["studies"]["micro"]["N"] = [10, 150]
    validate_config(raw)  # without a split-B variant it fits


@pytest.mark.parametrize("claim, key, message", [
    ({"text": "x", "quantity": "psnr_gap", "lower": "nope", "than": "dit"}, "studies.micro.claims.0.lower",
     "not one of the study's variants"),
    ({"text": "x", "quantity": "psnr_gap", "lower": "dit_local", "than": {"N": 10}}, "studies.micro.claims.0.than",
     "fixes the same keys"),
    ({"text": "x", "quantity": "psnr_gap", "higher": {"N": 10}, "than": {"N": 20}}, "studies.micro.claims.0.than",
     "N=20 is not one of the study's N"),
    ({"text": "x", "quantity": "psnr_gapp", "lower": "dit_local", "than": "dit"}, "studies.micro.claims.0.quantity",
     "psnr_gapp"),
    ({"text": "x", "quantity": "memorised_fraction", "lower": "dit_local", "than": "dit", "N": [50]},
     "studies.micro.claims.0.quantity", r"measured at evaluation.memorisation.N = \[10\]"),
    ({"text": "x", "quantity": "psnr_gap", "lower": "dit_local", "higher": "dit", "than": "dit"},
     "studies.micro.claims.0", "valid under each of"),
])
def test_a_bad_claim_fails_at_dag_build_naming_its_key(claim, key, message):
    from diffbias.config import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        validate_config(micro_with_twin(N=[10, 50], claims=[claim]))
    assert err.value.key == key


def test_claims_are_mapped_onto_the_rehearsal_grid():
    raw = micro_with_twin(N=[10, 20, 50], claims=[
        {"text": "N=10 memorises more", "quantity": "psnr_gap", "higher": {"N": 10}, "than": {"N": 50}},
        {"text": "dropped: N=20 is not kept", "quantity": "psnr_gap", "higher": {"N": 20}, "than": {"N": 50}},
        {"text": "local lower at N=50", "quantity": "psnr_gap", "lower": "dit_local", "than": "dit", "N": [50]}])
    overlay = yaml.safe_load((ROOT / "workflow/configs/rehearsal.yaml").read_text())
    overlay["rehearsal"]["min_resolution"] = 8
    cfg = validate_config({**raw, **overlay})
    claims = cfg["studies"]["micro"]["claims"]
    assert [c["text"] for c in claims] == ["N=10 memorises more", "local lower at N=50"]
    assert claims[0]["higher"] == {"N": 8} and claims[0]["than"] == {"N": 16} and claims[1]["N"] == [16]
