"""What the workflow runs, derived from a validated config: the configured measurements, the runs each applies to,
every job's inputs and settings, the files each study's report reads, and how trainings are grouped on SLURM.

The Snakemake rules (workflow/rules/*.smk) hold input functions only; each calls one function here, so the logic is
unit-tested without Snakemake (tests/test_plan.py). Paths are built from the patterns in :data:`PATTERNS`, the one
place that says where a file lives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import measurements
from .config import RunKey, pca_basis_path, run_spec, study_datasets, study_runs, variant_label
from .measurements import Measurement

# Where each file lives, as Snakemake patterns (wildcards in braces) under {results}.
PATTERNS = {
    "data": "{results}/data/{dataset}.npz",
    "latents": "{results}/latents/{dataset}/meta.json",  # written last: the cache is complete when it exists
    "tiny_autoencoder": "{results}/autoencoders/tiny-sd-vae",
    "run_dir": "{results}/runs/{dataset}/{variant}/N{n}/seed{seed}",
    "checkpoint": "{results}/checkpoints/{dataset}/{variant}/N{n}/seed{seed}/checkpoint.pt",
    # {part}: "" for split-A runs (their paths unchanged), "_splitB" for split-B runs, whose training set differs
    "shared": "{results}/shared/{shared}/{dataset}/N{n}/seed{seed}{part}.npz",
    "study_table": "{results}/studies/{study}/{table}.parquet",
    "study_arrays": "{results}/studies/{study}/arrays/{measurement}.npz",
    "logs": "{results}/logs",
}
# Tables every study has besides its measurements': the training log (rule aggregate_study) and the models' counts
# (rule counts: at the study's input, and at other input sizes).
STUDY_TABLES = ("train_log", "counts", "counts_by_length")
# SLURM job groups: small trainings (N <= SMALL_TRAIN_N, a time budget resources.train.runtime of at most
# SMALL_TRAIN_MINUTES) are bundled into "train_small" group jobs; long ones stay single jobs, since a group asks for
# the sum of its members' runtimes and a failed group job reruns its finished members too.
SMALL_TRAIN_N = 10
SMALL_TRAIN_MINUTES = 240


def path(kind: str, results: str, **wildcards) -> str:
    return PATTERNS[kind].format(results=results, **wildcards)


def pattern(kind: str, results: str) -> str:
    """A Snakemake pattern with {results} filled in and the other wildcards left."""
    return PATTERNS[kind].replace("{results}", results)


def run_dir(config: dict, run: RunKey) -> str:
    return path("run_dir", config["results_dir"], dataset=run.dataset, variant=run.variant, n=run.n, seed=run.seed)


def resource(config: dict, group: str, key: str, default):
    return config.get("resources", {}).get(group, {}).get(key, default)


def data_input(config: dict, dataset: str) -> str:
    """What training and measurement jobs read a data set from: its latent cache (``meta.json``, rule
    ``encode_latents``) when it has ``latents``, else its prepared pixel pool (rule ``prepare_data``)."""
    kind = "latents" if config["datasets"][dataset].get("latents") else "data"
    return path(kind, config["results_dir"], dataset=dataset)


def tiny_autoencoder(config: dict) -> str:
    """Where rule ``tiny_autoencoder`` writes the seeded, SD-shaped tiny AutoencoderKL (the rehearsal's)."""
    return path("tiny_autoencoder", config["results_dir"])


def encode_inputs(config: dict, dataset: str) -> dict[str, str]:
    """Inputs of a data set's encode job: its autoencoder when a rule makes it (the rehearsal's tiny one); a real VAE
    is a folder fetched once, checked at DAG build (config.check_datasets)."""
    autoencoder = config["datasets"][dataset]["latents"]["autoencoder"]
    return {"autoencoder": autoencoder} if autoencoder == tiny_autoencoder(config) else {}


def _training(config: dict, variant: str) -> dict:
    return {**config.get("training", {}), **config["variants"][variant].get("training", {})}


# ----------------------------------------------------------------------------------------------------
# Training parts (variants.<v>.split) and split-B twins
# ----------------------------------------------------------------------------------------------------

SPLIT_SUFFIX = "_split"  # shared-input file suffix of a split-B run: seed<s>_splitB.npz
SPLIT_WILDCARD = r"(_split[B-Z])?"  # the {part} wildcard: empty for split A


def split_of(config: dict, variant: str) -> str:
    return config["variants"][variant].get("split", "A")


def part_suffix(split: str) -> str:
    """The {part} of a shared-input path: "" for split A (paths unchanged), "_splitB" for split B."""
    return "" if split == "A" else f"{SPLIT_SUFFIX}{split}"


def split_from_suffix(part: str) -> str:
    return part.removeprefix(SPLIT_SUFFIX) or "A"


def _recipe(config: dict, variant: str) -> str:
    """What a variant trains, apart from its training part: backbone and resolved options, training overrides, PCA
    source."""
    from .models import resolve_options

    v = config["variants"][variant]
    backbone, options = resolve_options(v.get("backbone"), v.get("preset"), v.get("options"))
    rest = {k: val for k, val in v.items() if k not in ("label", "split", "backbone", "preset", "options")}
    return json.dumps({"backbone": backbone, "preset": v.get("preset"), "options": options, **rest}, sort_keys=True,
                      default=str)


def twin_variant(config: dict, variant: str, among) -> str | None:
    """The split-B twin of a split-A variant among ``among``: the first variant with the same recipe and
    ``split: B``; None when there is none (or the variant is itself split B)."""
    if split_of(config, variant) != "A":
        return None
    recipe = _recipe(config, variant)
    return next((v for v in among if split_of(config, v) == "B" and _recipe(config, v) == recipe), None)


def twin_run(config: dict, run: RunKey, study: str | None = None) -> RunKey | None:
    """The run's split-B twin (same dataset, N and seed, twin variant) in ``study``, or in any study that lists
    the run (``study`` None); None when there is none."""
    for name in [study] if study else sorted(config["studies"]):
        s = config["studies"][name]
        if (run.variant in s["variants"] and run.dataset in study_datasets(s) and run.n in s["N"]
                and run.seed in s["seeds"]):
            twin = twin_variant(config, run.variant, s["variants"])
            if twin is not None:
                return RunKey(run.dataset, twin, run.n, run.seed)
    return None


# ----------------------------------------------------------------------------------------------------
# Configured measurements
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """A measurement as configured: a run-scoped one once (named as the measurement), a study-scoped one once per
    study that declares its key (named ``<measurement>-<study>``). Its per-run files are ``<name>.parquet`` and
    ``<name>.npz``."""

    name: str
    measurement: Measurement
    study: str | None = None


def instances(config: dict) -> dict[str, Instance]:
    out = {}
    for m in measurements.load().values():
        if m.scope == "run":
            out[m.name] = Instance(m.name, m)
        else:
            for study, spec in config["studies"].items():
                if m.key in spec:
                    out[f"{m.name}-{study}"] = Instance(f"{m.name}-{study}", m, study)
    return out


def settings(config: dict, m: Measurement, study: str | None = None) -> dict:
    """A measurement's resolved settings (the schema filled the defaults): its own section, after the settings it
    shares with ``settings_from`` (all but N)."""
    own = config["studies"][study][m.key] if m.scope == "study" else config["evaluation"][m.key]
    if m.settings_from:
        other = measurements.get(m.settings_from)
        return {**{k: v for k, v in config["evaluation"][other.key].items() if k != "N"}, **own}
    return dict(own)


def instance_settings(config: dict, name: str) -> dict:
    inst = instances(config)[name]
    return settings(config, inst.measurement, inst.study)


def _backbone(config: dict, variant: str) -> tuple[type, dict]:
    from .models import BACKBONES, resolve_options

    v = config["variants"][variant]
    backbone, options = resolve_options(v.get("backbone"), v.get("preset"), v.get("options"))
    return BACKBONES[backbone], options


def applies(config: dict, inst: Instance, run: RunKey, study: str | None = None) -> bool:
    """Whether the instance measures ``run``: its settings, the backbone's capability, the variant's option and,
    for a measurement that needs the twin, a split-B twin listed with the run (in ``study``, or in any study)."""
    cls, options = _backbone(config, run.variant)
    if inst.measurement.class_conditional and not _training(config, run.variant).get("class_conditional"):
        return False
    if not inst.measurement.applies(settings(config, inst.measurement, inst.study), run.n, cls, options):
        return False
    return "twin" not in inst.measurement.needs or twin_run(config, run, study or inst.study) is not None


def measured_runs(config: dict, study: str, inst: Instance) -> list[RunKey]:
    if inst.study not in (None, study):
        return []
    return [r for r in study_runs(config, study) if applies(config, inst, r, study)]


def study_instances(config: dict, study: str) -> dict[str, Instance]:
    """The instances that concern a study, keyed by measurement name (a study has at most one of each)."""
    return {i.measurement.name: i for i in instances(config).values() if i.study in (None, study)}


def switched_off(config: dict, study: str) -> dict[str, str]:
    """Measurements the config switched off for a study, with the switch: measurements that could apply to some of
    its backbones (capability) but measure none of its runs. Measurements no backbone of the study can take
    (attention maps of an attention-free backbone) are not switched off: they do not apply."""
    spec = config["studies"][study]
    backbones = {v: _backbone(config, v) for v in spec["variants"]}
    mine = study_instances(config, study)
    out = {}
    conditional = any(_training(config, v).get("class_conditional") for v in spec["variants"])
    for m in measurements.load().values():
        if m.capability and not any(getattr(cls, m.capability, False) for cls, _ in backbones.values()):
            continue
        if m.class_conditional and not conditional:
            continue
        inst = mine.get(m.name)
        if inst is None:
            out[m.name] = f"studies.{study}.{m.key} is not set"
        elif not measured_runs(config, study, inst):
            if m.option and not any(opts.get(m.option) for _, opts in backbones.values()):
                out[m.name] = f"no variant sets options.{m.option}"
            elif "twin" in m.needs and not any(twin_variant(config, v, spec["variants"]) for v in spec["variants"]):
                out[m.name] = "no variant of the study has a split-B twin (a variant differing only by split: B)"
            else:
                out[m.name] = f"evaluation.{m.key}.N = {settings(config, m).get('N')} (study N: {spec['N']})"
    return out


# ----------------------------------------------------------------------------------------------------
# Job inputs
# ----------------------------------------------------------------------------------------------------


def measurement_inputs(config: dict, name: str, run: RunKey) -> dict[str, str]:
    """Input files of measurement instance ``name`` on ``run``: its model and data, then its needs (named as in
    ``Measurement.needs``); a ``table:`` need only when that measurement applies to the run."""
    results, inst = config["results_dir"], instances(config)[name]
    inputs = {"model": f"{run_dir(config, run)}/model.pt", "data": data_input(config, run.dataset)}
    for need in inst.measurement.needs:
        if need == "snapshots":
            inputs[need] = f"{run_dir(config, run)}/ema_snapshots"
        elif need == "twin":
            twin = twin_run(config, run, inst.study)
            if twin is None:
                raise ValueError(f"{name} on {run.path}: no split-B twin of {run.variant!r} is listed with it")
            inputs[need] = f"{run_dir(config, twin)}/model.pt"
        elif need.startswith("shared:"):
            shared = need.split(":", 1)[1]
            if shared_applies(config, shared, run.n):
                inputs[need] = shared_path(config, shared, run)
        elif need.startswith("table:"):
            other = instances(config).get(need.split(":", 1)[1])
            if other is not None and applies(config, other, run):
                inputs[need] = f"{run_dir(config, run)}/{other.name}.parquet"
    return inputs


def measurement_files(config: dict, inst: Instance, dataset: str) -> dict[str, str]:
    """Files a measurement's settings name for a data set's runs (``Measurement.files``), keyed by their place in
    the config (``evaluation.<measurement>.<setting>.<dataset>``). Like data sources, they are checked on disk at DAG
    build (config.check_datasets, skipped with DIFFBIAS_SKIP_DATA_CHECK=1), not job inputs: their paths are job
    parameters, so a changed path reruns the jobs."""
    m = inst.measurement
    if m.files is None:
        return {}
    own = f"studies.{inst.study}.{m.key}" if inst.study else f"evaluation.{m.key}"
    shared = f"evaluation.{measurements.get(m.settings_from).key}" if m.settings_from else own
    return {f"{own if k.split('.')[0] in m.settings else shared}.{k}": v  # a setting it shares lives in the other's
            for k, v in m.files(settings(config, m, inst.study), dataset).items()}


def extra_inputs(inputs: dict[str, str]) -> list[str]:
    """``--input need=path`` arguments of the measure command for the inputs beyond the model and data."""
    return [f"{k}={v}" for k, v in inputs.items() if k not in ("model", "data")]


def runtime_minutes(config: dict, name: str, run: RunKey) -> float:
    inst = instances(config)[name]
    base = resource(config, "evaluate", "runtime", 30)
    units = inst.measurement.runtime_units
    return base * (units(run_spec(config, run), instance_settings(config, name)) if units else 1)


def data_spec(config: dict, dataset: str) -> dict:
    """A data set's entry as its prepare and encode jobs receive it: ``split: shuffle`` (the default) left out, so that
    stating it does not rerun them; ``split: official`` kept (a pool prepared before masks were stored is rebuilt)."""
    spec = dict(config["datasets"][dataset])
    if spec.get("split") == "shuffle":
        del spec["split"]
    return spec


def dataset_split(config: dict, dataset: str) -> str:
    """``shuffle`` or ``official``: how the runs of a data set split its pool (data.run_test_mask)."""
    return config["datasets"][dataset].get("split", "shuffle")


def shared_settings(config: dict, shared: str) -> dict:
    return dict(config["evaluation"][measurements.SHARED_INPUTS[shared].config_key])


def shared_applies(config: dict, shared: str, n: int) -> bool:
    """Whether runs of size ``n`` read shared input ``shared`` (SharedInput.applies; default: yes)."""
    check = measurements.SHARED_INPUTS[shared].applies
    return check is None or bool(check(shared_settings(config, shared), n))


def shared_path(config: dict, shared: str, run: RunKey) -> str:
    """The shared input of the runs with ``run``'s dataset, N, seed and training part."""
    return path("shared", config["results_dir"], shared=shared, dataset=run.dataset, n=run.n, seed=run.seed,
                part=part_suffix(split_of(config, run.variant)))


def train_inputs(config: dict, run: RunKey) -> dict[str, str]:
    inputs = {"data": data_input(config, run.dataset)}
    pca = config["variants"][run.variant].get("pca_from")
    if pca:  # paper 004 app. C: a PCA variant trains after its baseline, from that baseline's attention maps
        inputs["pca_basis"] = pca_basis_path(config["results_dir"], run, pca)
    return inputs


def pca_request(config: dict, run: RunKey) -> dict:
    """The PCA settings asked of baseline run ``run`` by the variants that take their basis from it (they must
    agree: one basis file per baseline run)."""
    wanted = {
        json.dumps({k: v.get("pca_from", {}).get(k) for k in ("num_images", "timesteps", "respacing")}
                   | {"layers": v["options"]["pca_layers"], "components": v["options"].get("pca_components", 50)},
                   sort_keys=True)
        for v in config["variants"].values()
        if v.get("pca_from", {}).get("variant") == run.variant
        and v["pca_from"].get("dataset") in (None, run.dataset)  # a basis from another data set (paper 004 app. C)
    }
    if len(wanted) != 1:
        raise ValueError(f"variants using {run.variant!r} as pca_from ask for different PCA settings: {sorted(wanted)}")
    return json.loads(wanted.pop())


def train_group(config: dict, run: RunKey) -> str | None:
    """SLURM group of a training job: "train_small" for small trainings, none otherwise. Runs on either side of a PCA
    basis stay single: bundling a baseline with its PCA variant would make a group that depends on itself
    (train -> pca_basis -> train). So do trainings on several GPUs (``training.gpus_per_run``): their job asks for
    one node (``nodes=1``), which a group would add up over its members."""
    pca_runs = {v for v, spec in config["variants"].items() if spec.get("pca_from")}
    pca_runs |= {spec["pca_from"]["variant"] for spec in config["variants"].values() if spec.get("pca_from")}
    small = run.n <= SMALL_TRAIN_N and resource(config, "train", "runtime", 60) <= SMALL_TRAIN_MINUTES
    several_gpus = int(_training(config, run.variant).get("gpus_per_run", 1)) > 1  # one node of its own
    return "train_small" if small and run.variant not in pca_runs and not several_gpus else None


# ----------------------------------------------------------------------------------------------------
# What a study's report reads
# ----------------------------------------------------------------------------------------------------


def table_inputs(config: dict, study: str, table: str) -> list[str]:
    """Per-run files aggregated into study table ``table``: a measurement's table of the runs it applies to, or the
    training log of every run."""
    runs = study_runs(config, study)
    if table == "train_log":
        return [f"{run_dir(config, r)}/train_log.parquet" for r in runs]
    inst = study_instances(config, study)[table]
    return [f"{run_dir(config, r)}/{inst.name}.parquet" for r in measured_runs(config, study, inst)]


def study_tables(config: dict, study: str) -> dict[str, str]:
    """Study-level tables the report reads: the training log, the counts, and each measurement that measures some
    run of the study."""
    names = list(STUDY_TABLES) + [name for name, inst in study_instances(config, study).items()
                                  if measured_runs(config, study, inst)]
    return {name: path("study_table", config["results_dir"], study=study, table=name) for name in names}


@dataclass(frozen=True)
class ArrayPack:
    """A measurement's per-run arrays of one study, packed into one file for the report."""

    measurement: str
    out: str  # the study-level pack
    files: tuple[str, ...]  # per-run arrays, in the order of `runs`
    runs: tuple[str, ...]  # "<dataset>/<variant>/N<n>/seed<seed>"
    preview_items: int | None


def study_arrays(config: dict, study: str) -> dict[str, ArrayPack]:
    packs = {}
    for name, inst in study_instances(config, study).items():
        runs = measured_runs(config, study, inst) if inst.measurement.arrays else []
        if runs:
            packs[name] = ArrayPack(name, path("study_arrays", config["results_dir"], study=study, measurement=name),
                                    tuple(f"{run_dir(config, r)}/{inst.name}.npz" for r in runs),
                                    tuple(r.path for r in runs), inst.measurement.preview_items)
    return packs


def study_pca_bases(config: dict, study: str) -> dict[str, str]:
    """The attention PCA basis each PCA-attention variant of the study trains from (paper 004 app. C), the one of its
    first run (first data set, N and seed): the report draws it (fig. 13)."""
    s = config["studies"][study]
    out = {}
    for v in s["variants"]:
        pca = config["variants"][v].get("pca_from")
        if pca:
            out[v] = pca_basis_path(config["results_dir"], RunKey(study_datasets(s)[0], v, s["N"][0], s["seeds"][0]), pca)
    return out


def report_inputs(config: dict, study: str) -> dict[str, str]:
    return (study_tables(config, study) | {f"arrays_{n}": p.out for n, p in study_arrays(config, study).items()}
            | {f"pca_basis_{v}": p for v, p in study_pca_bases(config, study).items()})


def _papers(paper) -> list[str]:
    return [] if paper is None else [paper] if isinstance(paper, str) else list(paper)


def study_description(config: dict, study: str) -> dict:
    """Everything the study's report and its study-level commands need to know about it."""
    from .config import KNOWN_NUM_CLASSES

    s = config["studies"][study]
    datasets = study_datasets(s)
    specs = {}
    for v in s["variants"]:
        cls, options = _backbone(config, v)
        training = _training(config, v)
        conditional = training.get("class_conditional")  # the label table counts in its parameters
        specs[v] = {"backbone": cls.backbone_name, "preset": config["variants"][v].get("preset"), "options": options,
                    "steps": training.get("steps"), "batch_size": training.get("batch_size"),
                    "num_classes": KNOWN_NUM_CLASSES.get(config["datasets"][datasets[0]]["source"], 10) if conditional else 0}
    mine = study_instances(config, study)
    return {
        "name": study,
        "title": s.get("title", study),
        "scale_note": s.get("scale_note", ""),
        "summary": s.get("summary", ""),
        "papers": _papers(s.get("paper")),
        "variants": s["variants"],
        "baseline": s.get("baseline"),
        "datasets": datasets,
        "N": s["N"],
        "seeds": s["seeds"],
        "count_sides": s.get("count_sides", []),
        "labels": {v: variant_label(config, v) for v in s["variants"]},
        "variant_specs": specs,
        "dataset_specs": {d: config["datasets"][d] for d in datasets},
        "twins": {v: t for v in s["variants"] if (t := twin_variant(config, v, s["variants"]))},
        "claims": s.get("claims") or [],
        "count_dataset": datasets[0],
        "settings": {name: settings(config, inst.measurement, inst.study) for name, inst in mine.items()
                     if measured_runs(config, study, inst)},
        "switched_off": switched_off(config, study),
        "pca_bases": study_pca_bases(config, study),
    }
