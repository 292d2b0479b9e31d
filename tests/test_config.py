import copy
from pathlib import Path

import pytest
import yaml

from diffbias.config import ConfigError, all_runs, load_config, run_spec, spec_hash, study_runs, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def default():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def _merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge, as Snakemake merges several --configfile."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_default_and_paper_configs_validate():
    cfg = load_config(ROOT / "config.yaml")
    assert cfg["training"]["steps"] > 0
    default = yaml.safe_load((ROOT / "config.yaml").read_text())
    for path in sorted((ROOT / "workflow" / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        # extension configs (no datasets of their own) are layered on the default, like cpu-seeds.yaml
        validate_config(raw if "datasets" in raw else _merge(default, raw))


def test_defaults_are_filled(default):
    cfg = validate_config(default)
    assert cfg["evaluation"]["psnr"]["respacing"] == 50
    assert cfg["studies"]["locality"]["seeds"] == [0]
    assert cfg["datasets"]["fmnist16"]["test_size"] == 1000


def _error(cfg) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    return info.value


def test_unknown_variant_names_the_key(default):
    default["studies"]["locality"]["variants"].append("nope")
    err = _error(default)
    assert err.key == "studies.locality.variants" and "nope" in str(err)


def test_bad_attention_spec_names_the_key(default):
    default["variants"]["dit_local_head"]["options"]["attention"] = "3,4,G,G,G,G"
    err = _error(default)
    assert err.key == "variants.dit_local_head.options.attention" and "odd" in str(err)


def test_window_too_large_for_grid(default):
    default["variants"]["dit_local_head"]["options"]["attention"] = "9,3,G,G,G,G"  # 8x8 tokens at 16px, patch 2
    err = _error(default)
    assert err.key == "variants.dit_local_head.options.attention" and "larger than the 8x8" in str(err)


def test_n_too_large_for_pool(default):
    default["studies"]["locality"]["N"] = [10, 69_500]
    err = _error(default)
    assert err.key == "studies.locality.N" and "69500" in str(err)


@pytest.mark.parametrize("field,value", [("variants", ["dit", "dit_local_head", "dit"]), ("N", [10, 50, 10]),
                                         ("seeds", [0, 1, 0]), ("datasets", ["fmnist16", "fmnist16"])])
def test_a_study_list_with_a_repeated_entry_is_rejected(default, field, value):
    """The same variant, N, seed or data set listed twice in a study is a slip (its runs would be counted twice
    in the study's tables): rejected, naming the list."""
    study = default["studies"]["locality"]
    if field == "datasets":
        del study["dataset"]
    study[field] = value
    err = _error(default)
    assert err.key == f"studies.locality.{field}" and "non-unique" in str(err)
    study[field] = list(dict.fromkeys(value))  # each once: accepted
    study["claims"] = []  # (the default's claims name variants and N the shortened lists leave out)
    validate_config(default)


def test_unknown_key_and_wrong_type(default):
    default["training"]["stepz"] = 3
    assert _error(default).key == "training"
    bad = yaml.safe_load((ROOT / "config.yaml").read_text())
    bad["training"]["steps"] = "many"
    assert _error(bad).key == "training.steps"


def test_unknown_preset(default):
    default["variants"]["dit"]["preset"] = "DiT-Q/9"
    err = _error(default)
    assert err.key == "variants.dit" and "DiT-Q/9" in str(err)


def test_runs_shared_between_studies_are_trained_once(default):
    default["studies"]["second"] = copy.deepcopy(default["studies"]["locality"])
    default["studies"]["second"]["variants"] = ["dit", "dit_local_head"]
    del default["studies"]["second"]["claims"]  # they name variants this study does not list
    cfg = validate_config(default)
    assert len(all_runs(cfg)) == len(study_runs(cfg, "locality")) == 15  # 5 variants (one the split-B twin) x 3 N


def test_run_spec_hash_tracks_what_matters(default):
    cfg = validate_config(default)
    run = study_runs(cfg, "locality")[0]
    h = spec_hash(run_spec(cfg, run))
    cfg2 = copy.deepcopy(cfg)
    cfg2["training"]["lr"] = 1e-3
    assert spec_hash(run_spec(cfg2, run)) != h
    cfg3 = copy.deepcopy(cfg)
    cfg3["studies"]["locality"]["title"] = "other"
    assert spec_hash(run_spec(cfg3, run)) == h


def test_snapshot_steps_must_be_below_training_steps():
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["training"]["steps"] = 300  # independent of the default's step count
    cfg["training"]["snapshot_steps"] = [100, 300]
    with pytest.raises(ConfigError, match=r"training\.snapshot_steps.*\[300\]"):
        validate_config(cfg)
    cfg["training"]["snapshot_steps"] = [100, 200]
    assert validate_config(cfg)["training"]["snapshot_steps"] == [100, 200]


def test_freeu_sample_points_must_be_on_the_grid():
    cfg = yaml.safe_load((ROOT / "workflow/configs/paper-000.yaml").read_text())
    assert [1.8, 0.85] in validate_config(cfg)["studies"]["gmm_s"]["freeu_grid"]["sample_points"]
    cfg["studies"]["gmm_s"]["freeu_grid"]["sample_points"].append([1.8, 0.9])
    err = _error(cfg)
    assert err.key == "studies.gmm_s.freeu_grid.sample_points" and "(1.8, 0.9)" in str(err)


def test_the_schema_is_parsed_once_per_file_version_and_handed_out_as_a_copy():
    """Every measurement job validates its settings against the schema: it is built once per process (and schema
    file version), and a caller that changes the dict it got does not change the next caller's."""
    from diffbias import config

    first = config.load_schema()
    before = config._built_schema.cache_info()
    first["properties"].clear()
    second = config.load_schema()
    after = config._built_schema.cache_info()
    assert "evaluation" in second["properties"] and "psnr" in second["properties"]["evaluation"]["properties"]
    assert after.misses == before.misses and after.hits == before.hits + 1
