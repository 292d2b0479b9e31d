"""requirements.txt is the one list of pinned versions; the conda environment files must agree with it.

``environment.yml`` installs it with ``pip: [-r requirements.txt]`` (``conda env create`` resolves the path
against the env file's folder, the repository root). ``workflow/envs/diffbias.yaml`` cannot: Snakemake (9.27)
copies an env file to ``.snakemake/conda/<hash>.yaml`` and creates the environment from that copy, so a
relative ``-r`` no longer finds the file, and the env hash would not see a changed requirements.txt
(snakemake/snakemake PR 3940 proposes both). So it repeats the pins, and this test fails when they disagree.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# In requirements.txt but not in the rules' environment: they drive the workflow or test it, no rule imports them.
NOT_NEEDED_BY_RULES = {"snakemake", "snakemake-executor-plugin-slurm", "pytest"}


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert "==" in line, f"requirements.txt pins every package exactly, not {line!r}"
            pins[_name(line)] = line.split("==", 1)[1].strip()
    return pins


def pip_section(env_file: Path) -> list[str]:
    env = yaml.safe_load(env_file.read_text())
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, f"{env_file}: one pip section expected"
    return [str(x) for x in sections[0]]


def test_requirements_pin_torch_and_torchvision_as_a_pair():
    pins = requirement_pins()
    # torchvision's compiled operators are built against one torch release: pinning one without the other lets
    # pip pair it with a torch it was not built for (or replace the pinned torch to satisfy torchvision)
    assert "torch" in pins and "torchvision" in pins


def test_environment_yml_installs_requirements_txt():
    pip = pip_section(ROOT / "environment.yml")
    assert "-r requirements.txt" in pip and (ROOT / "requirements.txt").is_file()
    assert not [x for x in pip if "==" in x], "environment.yml must not repeat pins: requirements.txt has them"


def test_workflow_env_pins_equal_requirements_txt():
    pins = requirement_pins()
    env_pins = {}
    for item in pip_section(ROOT / "workflow" / "envs" / "diffbias.yaml"):
        assert "==" in item, f"workflow/envs/diffbias.yaml: pin {item!r} exactly, as requirements.txt does"
        env_pins[_name(item)] = item.split("==", 1)[1].strip()
    differ = {k: (v, pins.get(k)) for k, v in env_pins.items() if pins.get(k) != v}
    assert not differ, f"workflow/envs/diffbias.yaml disagrees with requirements.txt (env, requirements): {differ}"
    missing = set(pins) - set(env_pins) - NOT_NEEDED_BY_RULES
    assert not missing, f"in requirements.txt but not in workflow/envs/diffbias.yaml: {sorted(missing)}"
