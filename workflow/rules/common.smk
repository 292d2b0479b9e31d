# Config loading and validation, then input functions only: each calls one function of diffbias.plan, where the
# logic lives and is unit-tested (tests/test_plan.py). Everything else reads CFG, never `config` directly.
import json
import os

from snakemake.exceptions import WorkflowError

from diffbias import measurements, plan
from diffbias.config import SKIP_DATA_CHECK_ENV, ConfigError, RunKey, check_datasets, run_spec, validate_config

# A --configfile replaces the embedded default instead of being merged into it.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


# Validation before any job: schema, meaning, every model built on the meta device at its data shape and,
# unless DIFFBIAS_SKIP_DATA_CHECK=1, every data set a study uses checked on disk (README "Configuration").
try:
    CFG = validate_config(config)
    if os.environ.get(SKIP_DATA_CHECK_ENV, "") in ("", "0"):
        check_datasets(CFG, prepared_dir=f"{CFG['results_dir']}/data")
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

# Rules run the library from this checkout in whatever environment runs the job (venv, conda, SLURM node).
shell.prefix(f"export PYTHONPATH='{workflow.basedir}/src'${{{{PYTHONPATH:+:$PYTHONPATH}}}}; export DIFFBIAS_WORKER=${{{{DIFFBIAS_WORKER:-on}}}}; ")

R = CFG["results_dir"]
REPORTS = CFG["reports_dir"]
STUDIES = sorted(CFG["studies"])
RUN_DIR = plan.pattern("run_dir", R)
DATA = plan.pattern("data", R)
LOGS = plan.pattern("logs", R)
INSTANCES = plan.instances(CFG)


wildcard_constraints:
    dataset=r"[A-Za-z0-9_.\-]+",
    variant=r"[A-Za-z0-9_.\-]+",
    study=r"[A-Za-z0-9_.\-]+",
    n=r"\d+",
    seed=r"\d+",


def alternatives(names) -> str:
    """A wildcard constraint matching exactly these names (nothing when there are none)."""
    return "|".join(sorted(names)) or "(?!)"


def run_key(wc) -> RunKey:
    return RunKey(wc.dataset, wc.variant, int(wc.n), int(wc.seed))


def resource(group: str, key: str, default):
    return plan.resource(CFG, group, key, default)


def as_json(value) -> str:
    return json.dumps(value, sort_keys=True)


def study_json(wc) -> str:
    return as_json(plan.study_description(CFG, wc.study))
