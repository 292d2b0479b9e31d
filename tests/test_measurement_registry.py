"""The measurement registry (diffbias.measurements): what the workflow and the report read, and a plugin
measurement (tests/plugins/loss_at_end_measurement.py, docs/adding-a-measurement.md) registered in a
temporary registry that reaches the DAG (snakemake -n) and the rendered report."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffbias import measurements, report
from diffbias.measurements import PLUGINS_ENV, Measurement
from diffbias.models import BACKBONES

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "tests/plugins"
PLUGIN = "loss_at_end_measurement"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def temp_registry(monkeypatch):
    """A copy of the registry for one test, with the example plugin importable and enabled."""
    monkeypatch.setattr(measurements, "MEASUREMENTS", dict(measurements.MEASUREMENTS))
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    monkeypatch.setenv(PLUGINS_ENV, PLUGIN)
    yield measurements
    sys.modules.pop(PLUGIN, None)


def test_builtin_registry_lists_todays_measurements():
    per_run = {k: m.table for k, m in measurements.MEASUREMENTS.items() if m.scope == "run"}
    assert per_run == {"psnr": "psnr.parquet", "fid": "fid.parquet", "fid_curve": "fid_curve.parquet",
                       "jacobian": "jacobian.parquet", "attention": "attention.parquet", "gmm_masks": "gmm_masks.parquet"}
    freeu = measurements.MEASUREMENTS["freeu"]
    assert freeu.scope == "study" and freeu.params == ("b", "s")
    assert measurements.MEASUREMENTS["fid_curve"].needs_fid_reference and measurements.MEASUREMENTS["fid_curve"].needs_snapshots
    # every built-in section is one of the report's sections
    names = {s.__name__ for s in report.SECTIONS}
    assert {m.section for m in measurements.MEASUREMENTS.values()} <= names


@pytest.mark.parametrize("name", sorted(measurements.MEASUREMENTS))
def test_every_registered_command_is_a_cli_subcommand(name):
    from diffbias.cli import main

    with pytest.raises(SystemExit) as exc:
        main([measurements.MEASUREMENTS[name].command, "--help"])
    assert exc.value.code == 0


def test_applies_by_n_and_by_declared_capability():
    ev = {"fid": {"N": [50]}, "gmm_masks": {"N": None}}
    fid, gmm, psnr = (measurements.MEASUREMENTS[k] for k in ("fid", "gmm_masks", "psnr"))
    assert fid.applies(ev, 50, BACKBONES["dit"], {}) and not fid.applies(ev, 10, BACKBONES["dit"], {})
    assert psnr.applies(ev, 10, BACKBONES["diffussm"], {})
    assert gmm.applies(ev, 10, BACKBONES["uvit"], {"gmm": True})
    assert not gmm.applies(ev, 10, BACKBONES["uvit"], {"gmm": False})
    assert not gmm.applies(ev, 10, BACKBONES["dit"], {"gmm": True})  # DiT declares no GMM masks
    # capabilities are declared by every backbone, not inferred from its name
    for cls in BACKBONES.values():
        assert isinstance(cls.records_attention, bool)


def test_plugin_registers_in_a_temporary_registry(temp_registry):
    assert "loss_at_end" not in temp_registry.MEASUREMENTS
    assert temp_registry.load_plugins() == [PLUGIN]
    m = temp_registry.plugins()["loss_at_end"]
    assert m.table == "loss_at_end.parquet" and not m.builtin and callable(m.section)
    assert "loss_at_end" in temp_registry.per_run() and "loss_at_end" in temp_registry.report_tables()
    with pytest.raises(ValueError, match="registered twice"):
        temp_registry.register_measurement(Measurement("loss_at_end", builtin=False, compute=len))


def test_plugin_settings_are_schema_validated_with_their_defaults(temp_registry):
    from diffbias.config import ConfigError, section_settings, validate_config

    temp_registry.load_plugins()
    base = yaml.safe_load((ROOT / "workflow/configs/micro.yaml").read_text())
    filled = validate_config(base)["evaluation"]["loss_at_end"]
    assert filled == {"N": None, "t": [10, 100, 500], "num_images": 8, "noise_seed": 0}  # the plugin's defaults
    assert section_settings(("evaluation", "loss_at_end"), {"t": [50]})["num_images"] == 8
    base["evaluation"]["loss_at_end"] = {"t": "late"}
    with pytest.raises(ConfigError, match=r"evaluation\.loss_at_end\.t"):
        validate_config(base)
    base["evaluation"]["loss_at_end"] = {"tee": [1]}  # a typo is an error, not an ignored key
    with pytest.raises(ConfigError, match="evaluation.loss_at_end"):
        validate_config(base)


def _config(tmp: Path) -> Path:
    """The micro study at N=10 only, without FID, Jacobian and attention (seconds per job)."""
    cfg = yaml.safe_load((ROOT / "workflow/configs/micro.yaml").read_text())
    cfg["studies"]["micro"]["N"] = [10]
    cfg["evaluation"].update(fid={"N": []}, fid_curve={"N": []}, jacobian={"N": []}, attention={"N": []})
    path = tmp / "micro-plugin.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _snakemake(tmp: Path, *args: str, plugins: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(PLUGIN_DIR)]), DIFFBIAS_SKIP_DATA_CHECK="1")
    env.pop(PLUGINS_ENV, None)
    if plugins:
        env[PLUGINS_ENV] = PLUGIN
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "2",
                           "--configfile", str(_config(tmp)), *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=900)


def test_plugin_measurement_is_in_the_dag(tmp_path):
    dry = _snakemake(tmp_path, "-n")
    assert dry.returncode == 0, dry.stderr[-4000:]
    out = dry.stdout + dry.stderr
    runs = set(re.findall(r"results/runs/fmnist8/(\w+)/N10/seed0/loss_at_end\.parquet", out))
    assert runs == {"dit", "dit_local"}
    assert re.search(r"rule measure:", out) and "results/studies/micro/loss_at_end.parquet" in out
    # without the plugin, the same DAG has no trace of it
    plain = _snakemake(tmp_path, "-n", plugins=False)
    assert plain.returncode == 0 and "loss_at_end" not in plain.stdout + plain.stderr


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make setup installs it)")
def test_plugin_measurement_reaches_the_rendered_report(tmp_path, temp_registry):
    done = _snakemake(tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    study_dir = tmp_path / "results/studies/micro"
    table = pd.read_parquet(study_dir / "loss_at_end.parquet")
    assert set(table["variant"]) == {"dit", "dit_local"} and set(table["t"]) == {10, 100, 500}
    assert table["loss"].between(0, 10).all() and "label" in table
    assert "w/ Local" in (study_dir / "tables/loss_at_end.md").read_text()  # written by the plugin's section
    assert (tmp_path / "reports/micro.pdf").read_bytes()[:4] == b"%PDF"

    # the plugin's section is one page of the rendered report: render it with and without the plugin
    study = {"name": "micro", "title": "micro end-to-end study", "scale_note": "", "summary": "",
             "variants": ["dit", "dit_local"], "baseline": "dit", "N": [10], "seeds": [0],
             "labels": {"dit": "dit", "dit_local": "w/ Local"}}
    pages = {}
    for enabled in (True, False):
        os.environ[PLUGINS_ENV] = PLUGIN if enabled else ""
        registry = dict(measurements.MEASUREMENTS)
        if not enabled:
            measurements.MEASUREMENTS.pop("loss_at_end", None)
        (study_dir / "tables/loss_at_end.md").unlink(missing_ok=True)
        out = tmp_path / f"report-{enabled}.pdf"
        report.build_report(study, study_dir, out)
        pages[enabled] = len(re.findall(rb"/Type\s*/Page\b", out.read_bytes()))
        assert (study_dir / "tables/loss_at_end.md").exists() == enabled
        measurements.MEASUREMENTS.clear()
        measurements.MEASUREMENTS.update(registry)
    assert pages[True] == pages[False] + 1
