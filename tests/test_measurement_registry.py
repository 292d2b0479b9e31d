"""The measurement registry (diffbias.measurements): built-ins and plugins are the same kind of object, declared in one
module each, and everything else (config schema, rehearsal, plan, cost, DAG, report) reads the registry.

The example plugin (tests/plugins/loss_at_end_measurement.py, docs/adding-a-measurement.md) is enabled with one line
(the plugin variable) and is then found in the schema, the plan, the cost estimate, the rehearsal, the DAG
(snakemake -n) and the rendered report."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffbias import measurements, plan, report
from diffbias.measurements import PLUGINS_ENV, Measurement
from diffbias.models import BACKBONES

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "tests/plugins"
PLUGIN = "loss_at_end_measurement"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def temp_registry(monkeypatch):
    """A copy of the registry for one test, with the example plugin importable and enabled."""
    monkeypatch.setattr(measurements, "MEASUREMENTS", dict(measurements.load()))
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)
    monkeypatch.setenv(PLUGINS_ENV, PLUGIN)
    yield measurements
    sys.modules.pop(PLUGIN, None)


def micro() -> dict:
    return yaml.safe_load((ROOT / "workflow/configs/micro.yaml").read_text())


def test_registry_order_is_builtin_order_whatever_the_import_order():
    code = ("import importlib; [importlib.import_module(f'diffbias.measurements.{n}') for n in "
            "sorted(['psnr', 'attention', 'jacobian', 'fid', 'gmm_masks', 'fid_curve', 'freeu'])]; "
            "from diffbias import measurements; print(','.join(measurements.load()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert out.stdout.strip().split(",")[: len(measurements.BUILTIN)] == list(measurements.BUILTIN)


def test_builtins_are_one_module_each_and_fully_declared():
    registry = measurements.load()
    assert list(registry)[: len(measurements.BUILTIN)] == list(measurements.BUILTIN)
    for name in measurements.BUILTIN:
        m = registry[name]
        assert (ROOT / f"src/diffbias/measurements/{name}.py").exists()
        assert callable(m.compute) and m.description and m.sections, name
        for section in m.sections:  # every section says what it is and which tables it needs
            assert section.title and section.needs and name in section.needs or "counts" in section.needs, name
    assert registry["freeu"].scope == "study" and registry["freeu"].key == "freeu_grid"
    assert registry["fid_curve"].needs == ("snapshots", "shared:fid_reference", "table:fid")
    assert "fid_reference" in measurements.SHARED_INPUTS


def test_no_module_outside_a_measurement_names_one():
    """The harness's core modules and the workflow rules hold no measurement's name: they read the registry."""
    registry = measurements.load()
    names = set(registry) | {m.key for m in registry.values()} | set(measurements.SHARED_INPUTS)
    # a string that is a measurement's name but means something else there
    other_meaning = {("config.py", "attention"): "the DiT option options.attention, a per-layer window spec"}
    core = ["config.py", "plan.py", "cost.py", "report.py", "cli.py", "measure.py", "runs.py", "sections.py",
            "analysis.py", "typeset.py", "io.py", "counts.py"]
    for module in core:
        tree = ast.parse((ROOT / "src/diffbias" / module).read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        found = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
                 and id(node) not in docstrings and node.value in names and (module, node.value) not in other_meaning}
        assert not found, f"{module} names measurements {found}"
    for rules in [ROOT / "Snakefile", *sorted((ROOT / "workflow/rules").glob("*.smk"))]:
        code = "\n".join(line.split("#")[0] for line in rules.read_text().splitlines())
        found = {n for n in names if re.search(rf"[\"']{n}[\"']|\b{n}\.", code)}
        assert not found, f"{rules.name} names measurements {found}"


def test_applies_by_n_and_by_declared_capability():
    registry = measurements.load()
    fid, gmm, psnr, att = (registry[k] for k in ("fid", "gmm_masks", "psnr", "attention"))
    assert fid.applies({"N": [50]}, 50, BACKBONES["dit"], {}) and not fid.applies({"N": [50]}, 10, BACKBONES["dit"], {})
    assert psnr.applies({"N": None}, 10, BACKBONES["diffussm"], {})
    assert gmm.applies({"N": None}, 10, BACKBONES["uvit"], {"gmm": True})
    assert not gmm.applies({"N": None}, 10, BACKBONES["uvit"], {"gmm": False})
    assert not gmm.applies({"N": None}, 10, BACKBONES["dit"], {"gmm": True})  # DiT declares no GMM masks
    assert not att.applies({"N": None}, 10, BACKBONES["dice"], {})  # attention-free: nothing to measure
    for cls in BACKBONES.values():  # capabilities are declared by every backbone, not inferred from its name
        assert isinstance(cls.records_attention, bool)


def test_a_measurement_is_one_module_plus_one_registry_line(temp_registry):
    """With the plugin variable set (its one line), the plugin's module alone reaches schema, plan, cost, rehearsal
    and report."""
    from diffbias import cost
    from diffbias.config import ConfigError, validate_config

    assert "loss_at_end" not in temp_registry.MEASUREMENTS
    temp_registry.load()
    m = temp_registry.MEASUREMENTS["loss_at_end"]
    with pytest.raises(ValueError, match="registered twice"):
        temp_registry.register_measurement(Measurement("loss_at_end", compute=len))

    raw = micro()
    cfg = validate_config(raw)  # schema: its section with its defaults
    assert cfg["evaluation"]["loss_at_end"] == {"N": None, "t": [10, 100, 500], "num_images": 8, "noise_seed": 0}
    raw["evaluation"]["loss_at_end"] = {"tee": [1]}  # a typo is an error naming the key
    with pytest.raises(ConfigError, match="evaluation.loss_at_end"):
        validate_config(raw)

    assert "loss_at_end" in plan.instances(cfg)  # plan: every run of the study, a study table
    assert plan.study_tables(cfg, "micro")["loss_at_end"].endswith("studies/micro/loss_at_end.parquet")
    assert len(plan.table_inputs(cfg, "micro", "loss_at_end")) == 4

    runs = cost.run_costs(cfg)  # cost: its own column, 3 t x 8 images forwards
    row = runs.iloc[0]
    assert row["loss_at_end"] == pytest.approx(3 * 8 * 2 * row["gmacs"] / 1e3)

    overlay = yaml.safe_load((ROOT / "workflow/configs/rehearsal.yaml").read_text())
    overlay["rehearsal"]["min_resolution"] = 8  # the micro config's 8x8 images
    rehearsed = validate_config({**micro(), "evaluation": {**micro()["evaluation"], "loss_at_end": {"N": [50]}}, **overlay})
    assert rehearsed["evaluation"]["loss_at_end"]["N"] == [16] and rehearsed["evaluation"]["loss_at_end"]["num_images"] == 4

    assert m.sections[0] in report.sections()  # report: its section after the built-ins'


def test_measure_runs_a_plugin_like_a_builtin(temp_registry, tiny_dataset, tmp_path):
    from diffbias.cli import main
    from diffbias.config import RunKey, run_spec, validate_config
    from diffbias.train import Trainer

    cfg = validate_config({
        "datasets": {"tiny": {"source": "npz", "path": "unused.npz", "resolution": 16, "channels": 1, "test_size": 20}},
        "training": {"steps": 2, "batch_size": 4, "checkpoint_every": 10, "log_every": 1},
        "variants": {"v": {"preset": "DiT-T/2"}},
        "studies": {"s": {"dataset": "tiny", "variants": ["v"], "N": [40], "seeds": [0]}},
    })
    Trainer(run_spec(cfg, RunKey("tiny", "v", 40, 0)), tiny_dataset, tmp_path, tmp_path / "ck.pt", device="cpu").run(progress=False)
    main(["measure", "loss_at_end", "--model", str(tmp_path / "model.pt"), "--data", str(tiny_dataset), "--out",
          str(tmp_path / "loss.parquet"), "--config", '{"t": [5, 50], "num_images": 3}', "--device", "cpu"])
    table = pd.read_parquet(tmp_path / "loss.parquet")
    assert list(table["t"]) == [5, 50] and (table["num_images"] == 3).all() and set(table["N"]) == {40}


def _config(tmp: Path) -> Path:
    """The micro study at N=10 only, without FID, Jacobian and attention (seconds per job)."""
    cfg = micro()
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
    import json

    contents = json.loads((study_dir / "tables/report_sections.json").read_text())
    assert "Held-out denoising loss at the end of training" in [s["title"] for s in contents["sections"]]
