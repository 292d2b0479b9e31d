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


def runs_of(config, inst):
    return plan.measured_runs(config, "micro", inst)


def test_instances_and_the_runs_they_apply_to(micro):
    inst = plan.instances(micro)
    assert set(inst) == {"psnr", "memorisation", "reproducibility", "fid", "fid_curve", "jacobian", "attention",
                         "gmm_masks", "signal_function"}  # no FreeU grid declared
    assert runs_of(micro, inst["signal_function"]) == []  # DiT has no signal function
    runs = {name: [r.n for r in plan.measured_runs(micro, "micro", i)] for name, i in inst.items()}
    assert runs["psnr"] == [10, 50, 10, 50] and runs["fid"] == [50, 50] and runs["fid_curve"] == [50, 50]
    assert runs["gmm_masks"] == []  # DiT has no masks
    assert runs["reproducibility"] == []  # no variant has a split-B twin
    assert runs["memorisation"] == [10, 10]


def test_study_tables_inputs_and_array_packs(micro):
    tables = plan.study_tables(micro, "micro")
    assert set(tables) == {"train_log", "counts", "counts_by_length", "psnr", "memorisation", "fid", "fid_curve",
                           "jacobian", "attention"}
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
    # paper 000 figs. 5-7 and paper 001's Models 2-3 (Model 1 is fig. 5's (1, 1))
    assert d["settings"]["freeu"]["sample_points"] == [[1.0, 1.0], [1.8, 0.85], [1.0, 0.85], [1.3, 1.0], [1.0, 0.8]]
    assert d["settings"]["freeu"]["reference"] == "test" and d["settings"]["fid_curve"]["N"] == [50000]
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


def _latent(config: dict) -> dict:
    """The micro config with its data set switched to latents (the path of a VAE folder is enough for the plan)."""
    ds = dict(config["datasets"]["fmnist8"], channels=3, resolution=16, latents={"autoencoder": "vae"})
    return dict(config, datasets={"fmnist8": ds})


def test_latent_data_sets_are_read_from_their_cache(micro):
    cfg = _latent(micro)
    run = RunKey("fmnist8", "dit", 50, 0)
    assert plan.data_input(cfg, "fmnist8") == "results/latents/fmnist8/meta.json"
    assert plan.train_inputs(cfg, run)["data"] == "results/latents/fmnist8/meta.json"
    assert plan.measurement_inputs(cfg, "fid", run)["data"] == "results/latents/fmnist8/meta.json"
    assert plan.data_input(micro, "fmnist8") == "results/data/fmnist8.npz"  # pixels: the prepared pool
    assert plan.encode_inputs(cfg, "fmnist8") == {}  # a fetched VAE folder is no rule's output
    tiny = dict(cfg, datasets={"fmnist8": dict(cfg["datasets"]["fmnist8"], latents={"autoencoder": plan.tiny_autoencoder(cfg)})})
    assert plan.encode_inputs(tiny, "fmnist8") == {"autoencoder": "results/autoencoders/tiny-sd-vae"}


def test_a_training_on_several_gpus_is_never_grouped(micro):
    cfg = dict(micro, training=dict(micro["training"], gpus_per_run=2))
    assert plan.train_group(micro, RunKey("fmnist8", "dit", 10, 0)) == "train_small"
    assert plan.train_group(cfg, RunKey("fmnist8", "dit", 10, 0)) is None


def test_guided_fid_applies_to_the_class_conditional_runs_of_the_studies_that_ask(micro):
    cfg = validate_config({**yaml.safe_load((ROOT / "workflow/configs/micro.yaml").read_text()),
                           "studies": {"micro": {**micro["studies"]["micro"], "fid_guided": {}}}})
    inst = plan.instances(cfg)["fid_guided-micro"]
    assert plan.instance_settings(cfg, "fid_guided-micro")["guidance_scale"] == 1.5  # its own default, fid's others
    assert plan.instance_settings(cfg, "fid_guided-micro")["num_samples"] == 8
    assert plan.measured_runs(cfg, "micro", inst) == []  # micro trains unconditionally
    assert "fid_guided" not in plan.switched_off(cfg, "micro")
    conditional = dict(cfg, training=dict(cfg["training"], class_conditional=True))
    assert len(plan.measured_runs(conditional, "micro", inst)) == 4
    assert "fid_guided-micro" not in plan.instances(micro)  # a study switches it on by naming it
    assert plan.switched_off(dict(micro, training=dict(micro["training"], class_conditional=True)),
                             "micro")["fid_guided"] == "studies.micro.fid_guided is not set"


def test_reference_statistics_are_named_by_their_config_key():
    cfg = validate_config(yaml.safe_load((ROOT / "workflow/configs/paper-003.yaml").read_text()))
    fid, guided = plan.instances(cfg)["fid"], plan.instances(cfg)["fid_guided-imagenet"]
    key = "evaluation.fid.reference_statistics.imagenet256"
    assert plan.measurement_files(cfg, fid, "imagenet256") == {key: "data/adm/VIRTUAL_imagenet256_labeled.npz"}
    assert plan.measurement_files(cfg, guided, "imagenet256") == {key: "data/adm/VIRTUAL_imagenet256_labeled.npz"}
    assert plan.measurement_files(cfg, fid, "lsun_church") == {}  # no ADM batch: the training images


def test_the_report_reads_the_pca_basis_it_draws_and_data_jobs_ignore_the_default_split():
    cfg = validate_config(yaml.safe_load((ROOT / "workflow/configs/paper-004.yaml").read_text()))
    basis = "results/paper-004/runs/imagenet/xs/N100000/seed43/pca_basis.pt"  # app. C: ImageNet's PCs used on CelebA
    assert plan.study_pca_bases(cfg, "appc_parameter_reduction") == {"xs_pca": basis}
    assert plan.report_inputs(cfg, "appc_parameter_reduction")["pca_basis_xs_pca"] == basis
    assert plan.study_description(cfg, "appc_parameter_reduction")["pca_bases"] == {"xs_pca": basis}
    assert plan.study_pca_bases(cfg, "fig6_local_vs_global") == {}
    # paper-004 states split: shuffle, the default: its prepare jobs see the same spec as before the key existed
    assert cfg["datasets"]["celeba"]["split"] == "shuffle" and "split" not in plan.data_spec(cfg, "celeba")
    assert plan.dataset_split(cfg, "celeba") == "shuffle"


def test_counts_by_length_counts_each_architecture_at_the_listed_sides():
    from diffbias.counts import length_sweep

    cfg = load("workflow/configs/micro.yaml")
    study = plan.study_description(cfg, "micro")
    assert study["count_sides"] == [] and length_sweep(study).empty  # opt-in: exact counts of XL models take minutes
    table = length_sweep(study | {"count_sides": [4, 8, 16, 32]})
    for variant, sub in table.groupby("variant"):
        assert set(sub["side"]) <= {4, 8, 16, 32} and len(sub) >= 2, variant
        assert (sub["seq_len"] == sub["side"] ** 2).all() and sub.sort_values("side")["gmacs"].is_monotonic_increasing
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
