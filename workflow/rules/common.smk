# Config loading, validation and the run grid. Everything else reads CFG, never `config` directly.
import json
import os
import re as _re

from snakemake.exceptions import WorkflowError

from diffbias.config import (
    SKIP_DATA_CHECK_ENV,
    ConfigError,
    RunKey,
    all_runs,
    check_datasets,
    pca_basis_path,
    run_spec,
    study_datasets,
    study_runs,
    validate_config,
    variant_label,
)
from diffbias import measurements
from diffbias.analysis import study_array_name
from diffbias.models import BACKBONES, resolve_options

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
RUN_DIR = f"{R}/runs/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}"
CHECKPOINT = f"{R}/checkpoints/{{dataset}}/{{variant}}/N{{n}}/seed{{seed}}/checkpoint.pt"
LOGS = f"{R}/logs"


wildcard_constraints:
    dataset=r"[A-Za-z0-9_.\-]+",
    variant=r"[A-Za-z0-9_.\-]+",
    study=r"[A-Za-z0-9_.\-]+",
    n=r"\d+",
    seed=r"\d+",


def run_key(wc) -> RunKey:
    return RunKey(wc.dataset, wc.variant, int(wc.n), int(wc.seed))


def run_spec_json(wc) -> str:
    return json.dumps(run_spec(CFG, run_key(wc)), sort_keys=True)


# Which measurement applies to which runs: the registry (diffbias.measurements) says, from its N list under
# `evaluation:` and the capabilities a backbone class declares (FID only at the configured N, seed 004 table 1).
def measured(m, run: RunKey) -> bool:
    v = CFG["variants"][run.variant]
    backbone, options = resolve_options(v.get("backbone"), v.get("preset"), v.get("options"))
    return m.applies(CFG["evaluation"], run.n, BACKBONES[backbone], options)


PER_RUN = measurements.per_run()
PLUGINS = measurements.plugins()
MEASURED_RUNS = {m.table: (lambda run, m=m: measured(m, run)) for m in PER_RUN.values()}
FREEU = measurements.MEASUREMENTS["freeu"]


def measured_runs(study: str, m) -> list[RunKey]:
    """Runs of a study that measurement m applies to; an evaluation-time grid (study_key, e.g. FreeU's (b, s))
    only where the study declares its parameters."""
    if m.study_key and m.study_key not in CFG["studies"][study]:
        return []
    return [r for r in study_runs(CFG, study) if measured(m, r)]


def per_run_file(study: str, m, index: int = 0) -> str:
    """Measurement m's per-run output file name (a study-scoped grid's files are named after the study)."""
    return m.outputs[index].format(study=study)


def run_files(study: str, name: str) -> list[str]:
    """Per-run files `name` of a study's runs: a measurement's output on the runs it applies to, or (train_log)
    every run."""
    for m in measurements.MEASUREMENTS.values():
        if name in (per_run_file(study, m, i) for i in range(len(m.outputs))):
            return [f"{R}/runs/{r.path}/{name}" for r in measured_runs(study, m)]
    return [f"{R}/runs/{r.path}/{name}" for r in study_runs(CFG, study)]


def study_tables(study: str) -> dict[str, str]:
    """The study-level tables its report needs (a table only when some run is measured)."""
    tables = {"psnr": "psnr", "train_log": "train_log", "counts": "counts"}
    for name, m in measurements.MEASUREMENTS.items():
        if measured_runs(study, m):
            tables[name] = name
    return {k: f"{R}/studies/{study}/{v}.parquet" for k, v in tables.items()}


# The aggregate_study rule's tables: every measurement of the registry and the training log.
AGGREGATED_TABLES = "|".join(["train_log", *measurements.MEASUREMENTS])
# The generic `measure` rule's measurements (plugins); a pattern that matches nothing when there are none.
PLUGIN_NAMES = "|".join(PLUGINS) or "(?!)"


def aggregate_inputs(wc) -> list[str]:
    m = measurements.MEASUREMENTS.get(wc.table)
    return run_files(wc.study, per_run_file(wc.study, m) if m else f"{wc.table}.parquet")


def settings_json(*section) -> str:
    """A config section as the JSON a measurement command takes (--config); the schema filled its defaults."""
    value = CFG
    for key in section:
        value = value[key]
    return json.dumps(value, sort_keys=True)


def resource(group: str, key: str, default):
    return CFG.get("resources", {}).get(group, {}).get(key, default)


def study_json(wc) -> str:
    s = CFG["studies"][wc.study]
    variant_specs = {}
    for v in s["variants"]:
        backbone, options = resolve_options(CFG["variants"][v].get("backbone"), CFG["variants"][v].get("preset"),
                                            CFG["variants"][v].get("options"))
        variant_specs[v] = {"backbone": backbone, "preset": CFG["variants"][v].get("preset"), "options": options}
    datasets = study_datasets(s)
    return json.dumps(
        {
            "name": wc.study,
            "title": s.get("title", wc.study),
            "scale_note": s.get("scale_note", ""),
            "summary": s.get("summary", ""),
            "variants": s["variants"],
            "baseline": s.get("baseline"),
            "datasets": datasets,
            "freeu_grid": s.get("freeu_grid"),
            "N": s["N"],
            "seeds": s["seeds"],
            "labels": {v: variant_label(CFG, v) for v in s["variants"]},
            "variant_specs": variant_specs,
            "dataset_specs": {d: CFG["datasets"][d] for d in datasets},
            "count_dataset": datasets[0],
        },
        sort_keys=True,
    )


def pca_request(wc) -> str:
    """The PCA settings asked of baseline run `wc` by the variants that use it (they must agree)."""
    wanted = {
        json.dumps({k: v.get("pca_from", {}).get(k) for k in ("num_images", "steps", "respacing")}
                   | {"layers": v["options"]["pca_layers"], "components": v["options"].get("pca_components", 50)}, sort_keys=True)
        for v in CFG["variants"].values()
        if v.get("pca_from", {}).get("variant") == wc.variant
        and v["pca_from"].get("dataset") in (None, wc.dataset)  # a basis from another data set (seed 004 app. C)
    }
    if len(wanted) != 1:
        raise WorkflowError(f"variants using {wc.variant!r} as pca_from ask for different PCA settings: {sorted(wanted)}")
    return wanted.pop()


def train_inputs(wc):
    inputs = {"data": f"{R}/data/{wc.dataset}.npz"}
    pca = CFG["variants"][wc.variant].get("pca_from")
    if pca:  # seed 004 app. C: a PCA variant trains after its baseline, from that baseline's attention maps
        inputs["pca_basis"] = pca_basis_path(R, run_key(wc), pca)
    return inputs


# The FID reference set depends only on (dataset, N, seed): its Inception features are computed once and
# shared by every variant's FID and FID-curve jobs (evaluate.smk, rule fid_reference).
FID_REFERENCE = f"{R}/fid_reference/{{dataset}}/N{{n}}/seed{{seed}}/inception.npz"


def fid_curve_inputs(wc):
    inputs = {"model": f"{RUN_DIR}/model.pt".format(**wc), "snapshots": f"{RUN_DIR}/ema_snapshots".format(**wc),
              "data": f"{R}/data/{wc.dataset}.npz", "reference": FID_REFERENCE.format(**wc)}
    if MEASURED_RUNS["fid.parquet"](run_key(wc)):  # the final model's FID is already measured: reuse it
        inputs["final_fid"] = f"{RUN_DIR}/fid.parquet".format(**wc)
    return inputs


# SLURM job groups (slurm/config.yaml, group-components): small trainings, N <= SMALL_TRAIN_N with a time
# budget (resources.train.runtime) of at most SMALL_TRAIN_MINUTES, are bundled into "train_small" group jobs.
# Long ones stay single jobs: a group asks for the sum of its members' runtimes, and a failed group job (e.g.
# one member's time-budget exit) reruns its finished members too. Runs on either side of a PCA basis are left
# out: bundling a baseline with its PCA variant would make a group that leaves itself (train -> pca_basis ->
# train). Local runs ignore groups.
SMALL_TRAIN_N = 10
SMALL_TRAIN_MINUTES = 240


def train_group(wc):
    pca_runs = {v for v, spec in CFG["variants"].items() if spec.get("pca_from")}
    pca_runs |= {spec["pca_from"]["variant"] for spec in CFG["variants"].values() if spec.get("pca_from")}
    small = int(wc.n) <= SMALL_TRAIN_N and resource("train", "runtime", 60) <= SMALL_TRAIN_MINUTES
    return "train_small" if small and wc.variant not in pca_runs else None



# Study-level array packs: a measurement's per-run outputs after its table (diffbias.measurements) are packed
# per study by rule aggregate_arrays, so the report reads only files its rule declares.
# Previews: the FID sample set is tens of thousands of images per run and the report shows 16; attention maps
# (L x L per layer, 1024^2 at 32x32 patch 1) are drawn for at most six images (seed 004 figs. 9-11).
ARRAY_PREVIEW_ITEMS = {"fid": 16, "attention": 6}


def study_arrays(study: str) -> dict[str, tuple]:
    """Study-level pack name -> (measurement, per-run file name, per-run files, run keys), for every measured pack."""
    packs = {}
    for m in measurements.MEASUREMENTS.values():
        table = m.table.format(study=study)
        tables = run_files(study, table)
        for output in m.outputs[1:]:
            per_run = output.format(study=study)
            files = [f"{os.path.dirname(t)}/{per_run}" for t in tables]  # a run's arrays sit beside its table
            runs = [os.path.relpath(os.path.dirname(t), f"{R}/runs") for t in tables]
            if files:
                packs[study_array_name(output).removesuffix(".npz")] = (m, per_run, files, runs)
    return packs


def study_array_files(study: str) -> dict[str, str]:
    """The report's array inputs: one study-level pack per measured per-run array file."""
    return {f"arrays_{name}": f"{R}/studies/{study}/arrays/{name}.npz" for name in study_arrays(study)}


def report_inputs(study: str) -> dict[str, str]:
    return study_tables(study) | study_array_files(study)


# The aggregate_arrays rule's pack names (every registered per-run array file); matches nothing when none.
ARRAY_NAMES = "|".join(
    _re.escape(study_array_name(o).removesuffix(".npz"))
    for m in measurements.MEASUREMENTS.values() for o in m.outputs[1:]
) or "(?!)"
