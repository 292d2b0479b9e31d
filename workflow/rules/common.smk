# Config loading, validation and the run grid. Everything else reads CFG, never `config` directly.
import json

from snakemake.exceptions import WorkflowError

from diffbias.config import ConfigError, RunKey, all_runs, run_spec, study_runs, validate_config, variant_label

# A --configfile replaces the embedded default instead of being merged into it.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


try:
    CFG = validate_config(config)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

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


def run_files(study: str, name: str) -> list[str]:
    return [f"{R}/runs/{r.path}/{name}" for r in study_runs(CFG, study)]


def resource(group: str, key: str, default):
    return CFG.get("resources", {}).get(group, {}).get(key, default)


def study_json(wc) -> str:
    s = CFG["studies"][wc.study]
    variant_specs = {}
    for v in s["variants"]:
        variant_specs[v] = CFG["variants"][v].get("options", {}) | {"preset": CFG["variants"][v].get("preset")}
    return json.dumps(
        {
            "name": wc.study,
            "title": s.get("title", wc.study),
            "scale_note": s.get("scale_note", ""),
            "variants": s["variants"],
            "baseline": s.get("baseline"),
            "N": s["N"],
            "seeds": s["seeds"],
            "labels": {v: variant_label(CFG, v) for v in s["variants"]},
            "variant_specs": variant_specs,
        },
        sort_keys=True,
    )
