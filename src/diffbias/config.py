"""Study configuration: schema validation, semantic checks, and the runs a config implies.

A run is keyed by (dataset, variant, N, seed) and fully determined by the config entries of its dataset
and variant plus the global training defaults, so a run used by several studies is trained once.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from .paths import REPO_ROOT  # re-exported: config.REPO_ROOT is used by callers

SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"

# Pool sizes known without touching the data, so "N too large" fails before any job starts.
KNOWN_POOL_SIZES = {"fashion_mnist": 70_000, "cifar10": 60_000}
# (official training images, official test images) of the sources whose sizes are fixed, for split: official.
KNOWN_OFFICIAL_SIZES = {"fashion_mnist": (60_000, 10_000), "cifar10": (50_000, 10_000)}
# Class counts used only to build class-conditional models at DAG time (the trainer reads the real count
# from the labels; the embedding table's size cannot make a constructor fail).
KNOWN_NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "imagenet32": 1000, "imagenet": 1000}


class ConfigError(ValueError):
    """A bad config. The message names the offending key, e.g. ``variants.local.options.attention``."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config error at '{key}': {message}")
        self.key = key


# ----------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------


def _fill_defaults(schema: dict, instance: Any, root: dict) -> Any:
    """Fill JSON-schema defaults recursively (objects, $refs, additionalProperties)."""
    if "$ref" in schema:
        ref = schema["$ref"].split("/")[-1]
        schema = root["$defs"][ref]
    if not isinstance(instance, dict) or schema.get("type") not in ("object", None):
        return instance
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            instance[key] = _fill_defaults(sub, instance[key], root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in instance:
            if key not in schema.get("properties", {}):
                instance[key] = _fill_defaults(extra, instance[key], root)
    return instance


def load_schema() -> dict:
    """The config schema: workflow/schemas/config.schema.yaml, plus every registered measurement's settings
    (diffbias.measurements: each declares its section's properties and defaults) under ``evaluation.<key>``, or under
    ``studies.<s>.<key>`` for a study-scoped one (FreeU's grid). A fresh copy: callers may change it."""
    from .measurements import load

    registered = tuple((name, id(m)) for name, m in load().items())
    return copy.deepcopy(_built_schema(SCHEMA_PATH.stat().st_mtime_ns, registered))


@functools.lru_cache(maxsize=4)
def _built_schema(mtime_ns: int, registered: tuple) -> dict:
    # Built once per schema file version and registry (~0.06 s that every measurement job paid); the job worker
    # builds it before it forks (worker._warm_up).
    from .measurements import load, quantities

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    evaluation = schema["properties"]["evaluation"]["properties"]
    study = schema["properties"]["studies"]["additionalProperties"]["properties"]
    for m in load().values():
        (study if m.scope == "study" else evaluation)[m.key] = m.schema()
    claim = study["claims"]["items"]["properties"]  # a claim names a quantity some measurement declares
    claim["quantity"]["enum"] = sorted(quantities())
    claim["quantity"]["description"] += "; registered: " + "; ".join(
        f"{name} ({m.name}: {q.description})" for name, (m, q) in sorted(quantities().items()))
    return schema


def section_settings(path: Sequence[str], given: dict) -> dict:
    """One config section (e.g. ``("evaluation", "psnr")``; ``"*"`` steps into a named entry such as a study)
    validated against its schema and completed with the schema's defaults."""
    root = load_schema()
    schema = root
    for key in path:
        schema = schema["additionalProperties"] if key == "*" else schema["properties"][key]
    return _validated(schema, given, root, ".".join(path))


def measurement_settings(name: str, given: dict) -> dict:
    """What ``python -m diffbias measure <name>`` receives as ``--config``, validated and completed with the
    defaults: the measurement's own section, plus the settings it shares with ``settings_from`` (all but N), so the
    command is complete whether the workflow or a user passes them."""
    from .measurements import get

    m = get(name)
    schema = m.schema()
    if m.settings_from:
        other = get(m.settings_from).schema()
        schema = {**schema, "properties": {**{k: v for k, v in other["properties"].items() if k != "N"},
                                           **schema["properties"]}}
    where = f"studies.<study>.{m.key}" if m.scope == "study" else f"evaluation.{m.key}"
    return _validated(schema, given, load_schema(), where)


def _validated(schema: dict, given: dict, root: dict, where: str) -> dict:
    import jsonschema

    given = copy.deepcopy(dict(given))
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(given), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        err = errors[0]
        raise ConfigError(".".join([where, *map(str, err.absolute_path)]), err.message)
    return _fill_defaults(schema, given, root)


def _check_renamed(config: dict) -> None:
    """Keys renamed so that "steps" means optimiser steps only fail with their new name: measurements declare theirs
    (``Measurement.renamed``), and ``pca_from.steps`` became ``pca_from.timesteps``."""
    from .measurements import load

    sections = []
    for m in load().values():
        if m.scope == "run":
            sections.append((f"evaluation.{m.key}", (config.get("evaluation") or {}).get(m.key), m.renamed))
        else:
            sections += [(f"studies.{name}.{m.key}", (study or {}).get(m.key), m.renamed)
                         for name, study in (config.get("studies") or {}).items()]
    sections += [(f"variants.{name}.pca_from", (v or {}).get("pca_from"), {"steps": "timesteps"})
                 for name, v in (config.get("variants") or {}).items()]
    for where, section, renamed in sections:
        for old, new in renamed.items():
            if isinstance(section, dict) and old in section:
                raise ConfigError(f"{where}.{old}", f"renamed: use {where}.{new}")


def validate_config(config: dict) -> dict:
    """Validate against the JSON schema, fill defaults, then check meaning. Returns the filled config.

    Raises ConfigError naming the first offending key.
    """
    import jsonschema

    schema = load_schema()
    config = copy.deepcopy(dict(config))
    _check_renamed(config)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        err = errors[0]
        key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
        raise ConfigError(key, err.message)
    config = _fill_defaults(schema, config, schema)
    _check_semantics(config)
    if config.get("rehearsal") and not config["rehearsal"]["applied"]:
        # the paper config passed every check above (a rehearsal also rehearses its validation); so does the shrunk one
        config = validate_config(apply_rehearsal(config))
    return config


def load_config(path: str | Path) -> dict:
    return validate_config(yaml.safe_load(Path(path).read_text()))


def _declares(backbone: str, capability: str) -> bool:
    """Whether a backbone class declares a capability (a class attribute, docs/model-contract.md)."""
    from .models import BACKBONES

    return bool(getattr(BACKBONES.get(backbone), capability, False))


def _check_semantics(config: dict) -> None:
    from .measurements import load
    from .models import resolve_options

    measurements = load()
    from .models.attention import check_windows_fit, parse_attention_spec

    for name, variant in config["variants"].items():
        key = f"variants.{name}"
        try:
            backbone, options = resolve_options(variant.get("backbone"), variant.get("preset"), variant.get("options"))
        except (KeyError, ValueError) as exc:
            raise ConfigError(key, str(exc).strip("'\"")) from None
        if _declares(backbone, "has_attention_spec"):
            try:
                parse_attention_spec(options.get("attention"), options.get("depth", 12))
            except ValueError as exc:
                raise ConfigError(f"{key}.options.attention", str(exc)) from None
        training = {**config.get("training", {}), **variant.get("training", {})}
        late = [s for s in training.get("snapshot_steps", []) if s >= training["steps"]]
        if late:
            where = "training" if "snapshot_steps" not in variant.get("training", {}) else f"{key}.training"
            raise ConfigError(f"{where}.snapshot_steps", f"steps {late} are not below training.steps={training['steps']} "
                              f"(the final model is always evaluated)")
        pca = variant.get("pca_from")
        if pca is not None:
            if pca["variant"] not in config["variants"] or "pca_from" in config["variants"][pca["variant"]]:
                raise ConfigError(f"{key}.pca_from.variant", f"{pca['variant']!r} is not a trained baseline variant")
            if not options.get("pca_layers"):
                raise ConfigError(f"{key}.options.pca_layers", "a pca_from variant needs the (1-based) layers to replace")
            if pca.get("dataset") is not None and pca["dataset"] not in config["datasets"]:
                raise ConfigError(f"{key}.pca_from.dataset", f"unknown dataset {pca['dataset']!r}; known: {sorted(config['datasets'])}")

    for study_name, study in config["studies"].items():
        skey = f"studies.{study_name}"
        for dataset in study_datasets(study):
            if dataset not in config["datasets"]:
                raise ConfigError(f"{skey}.dataset", f"unknown dataset {dataset!r}; known: {sorted(config['datasets'])}")
            ds = config["datasets"][dataset]
            pool = pool_size(ds)
            official = _official_sizes(config, dataset)
            parts = split_parts(config, study["variants"])
            for n in study["N"]:
                twice = (f"N={n} twice ({2 * n}: a split-B variant trains on the N images before split A's)"
                         if parts == 2 else f"N={n}")
                if official is not None and (parts * n > official[0] or ds["test_size"] > official[1]):
                    raise ConfigError(
                        f"{skey}.N" if parts * n > official[0] else f"datasets.{dataset}.test_size",
                        f"{twice} and test_size={ds['test_size']} with split: official need at most {official[0]} "
                        f"training and {official[1]} test images of dataset {dataset!r}")
                if official is None and pool is not None and parts * n + ds["test_size"] > pool:
                    raise ConfigError(
                        f"{skey}.N",
                        f"{twice} plus test_size={ds['test_size']} exceeds the {pool} images of dataset {dataset!r}",
                    )
            try:
                model_input(ds)
            except ValueError as exc:
                raise ConfigError(f"datasets.{dataset}.resolution", str(exc)) from None
            for variant in study["variants"]:
                if variant not in config["variants"]:
                    raise ConfigError(f"{skey}.variants", f"unknown variant {variant!r}; known: {sorted(config['variants'])}")
                _check_variant_fits(config, variant, ds, f"variants.{variant}")
                pca_dataset = (config["variants"][variant].get("pca_from") or {}).get("dataset")
                if pca_dataset is not None and pca_dataset in config["datasets"]:  # the PCs are maps of the same token grid
                    other = config["datasets"][pca_dataset]
                    if model_input(other) != model_input(ds):
                        (c1, r1), (c2, r2) = model_input(other), model_input(ds)
                        raise ConfigError(f"variants.{variant}.pca_from.dataset",
                                          f"{pca_dataset!r} is {c1}x{r1}^2 but study "
                                          f"{study_name!r} trains on {dataset!r} at {c2}x{r2}^2")
                _check_variant_builds(config, variant, ds)
        baseline = study.get("baseline")  # a variant or a list of them (one per backbone, analysis.resolve_baselines)
        for b in [] if baseline is None else [baseline] if isinstance(baseline, str) else baseline:
            if b not in study["variants"]:
                raise ConfigError(f"{skey}.baseline", f"baseline {b!r} is not one of the study's variants")
        latent = [d for d in study_datasets(study) if config["datasets"][d].get("latents")]
        for m in measurements.values():  # a measurement's own checks of its settings (FreeU: points on its grid)
            if m.check and m.scope == "study" and m.key in study:
                _raise_check(m, study[m.key], f"{skey}.{m.key}")
            measured = config["evaluation"][m.key].get("N") if m.scope == "run" else None
            if m.pixel_only and latent and (measured is None or set(measured) & set(study["N"])):
                raise ConfigError(f"evaluation.{m.key}.N", f"{m.name} reads the training pool's pixels, but study "
                                  f"{study_name!r} trains on the latent data set {latent[0]!r}: leave its N "
                                  f"{sorted(set(study['N']) & set(measured or study['N']))} out")
        for i, claim in enumerate(study.get("claims") or []):
            _check_claim(config, study, claim, f"{skey}.claims.{i}")
    for m in measurements.values():
        if m.check and m.scope == "run":
            _raise_check(m, config["evaluation"][m.key], f"evaluation.{m.key}")


def _official_sizes(config: dict, dataset: str) -> tuple[int, int] | None:
    """(training, test) images of a ``split: official`` data set when known without the data (CIFAR-10,
    Fashion-MNIST, capped by max_images); raises ConfigError naming ``datasets.<key>.split`` when its source (with its
    loader arguments) has no official split."""
    from .data import official_split_problem

    ds = config["datasets"][dataset]
    if ds.get("split", "shuffle") != "official":
        return None
    problem = official_split_problem(ds["source"], ds.get("loader_kwargs"), ds.get("test_path"))
    if problem:
        raise ConfigError(f"datasets.{dataset}.split", f"split: official, but {problem}")
    if ds.get("test_path"):  # counted from the folders only when the data are read
        return None
    if ds["source"] == "fixture":  # data.official_test_mask: the last quarter of the fixture pool is its test part
        from .data import official_test_mask

        mask = official_test_mask("fixture", ds.get("path"), max_images=ds.get("max_images"))
        return int((~mask).sum()), int(mask.sum())
    sizes = KNOWN_OFFICIAL_SIZES.get(ds["source"])
    if sizes is None or not ds.get("max_images"):
        return sizes
    cap = ds["max_images"]  # the pool's first max_images in file order: training images come first
    return min(sizes[0], cap), max(0, min(sizes[1], cap - sizes[0]))
def _check_claim(config: dict, study: dict, claim: dict, key: str) -> None:
    """A claim names the study's variants, N and data sets, its sides fix the same keys (variant, N or both), and
    the measurement behind its quantity measures the N it compares."""
    from .measurements import quantities

    direction = "lower" if "lower" in claim else "higher"
    than = claim["than"] if isinstance(claim["than"], list) else [claim["than"]]
    sides = [(direction, claim[direction])] + [(f"than.{j}" if isinstance(claim["than"], list) else "than", t)
                                               for j, t in enumerate(than)]
    fixed = set()
    for where, side in sides:
        side = {"variant": side} if isinstance(side, str) else side
        keys = frozenset(side)
        if fixed and keys not in fixed:
            raise ConfigError(f"{key}.{where}", f"every side of a claim fixes the same keys ({sorted(next(iter(fixed)))}), "
                              f"this one fixes {sorted(keys)}")
        fixed.add(keys)
        if "variant" in side and side["variant"] not in study["variants"]:
            raise ConfigError(f"{key}.{where}", f"{side['variant']!r} is not one of the study's variants")
        if "N" in side and side["N"] not in study["N"]:
            raise ConfigError(f"{key}.{where}", f"N={side['N']} is not one of the study's N {study['N']}")
    for name, known in (("variants", study["variants"]), ("N", study["N"]), ("datasets", study_datasets(study))):
        unknown = [x for x in claim.get(name) or [] if x not in known]
        if unknown:
            raise ConfigError(f"{key}.{name}", f"{unknown} not in the study's {name} {known}")
    m, _ = quantities()[claim["quantity"]]
    compared = {side["N"] for _, side in sides if isinstance(side, dict) and "N" in side} or set(claim.get("N") or study["N"])
    measured = config["evaluation"][m.key].get("N") if m.scope == "run" else None
    if measured is not None and not compared & set(measured):
        raise ConfigError(f"{key}.quantity", f"{claim['quantity']} comes from {m.name}, measured at "
                          f"evaluation.{m.key}.N = {measured}; the claim compares N {sorted(compared)}")


def _raise_check(m, settings: dict, where: str) -> None:
    found = m.check(settings)
    if found:
        raise ConfigError(f"{where}.{found[0]}", found[1])


def _check_variant_fits(config: dict, variant: str, dataset: dict, key: str) -> None:
    """Build-free checks that depend on the data resolution (e.g. a window larger than the token grid)."""
    from .models import resolve_options
    from .models.attention import check_windows_fit, parse_attention_spec

    v = config["variants"][variant]
    backbone, options = resolve_options(v.get("backbone"), v.get("preset"), v.get("options"))
    if _declares(backbone, "has_attention_spec"):
        patch = options.get("patch_size", 1)
        _, side = model_input(dataset)  # a latent data set's model sees the latent grid
        if side % patch:
            raise ConfigError(f"{key}.options.patch_size", f"input side {side} not divisible by {patch}")
        grid = side // patch
        try:
            check_windows_fit(parse_attention_spec(options.get("attention"), options.get("depth", 12)), (grid, grid))
        except ValueError as exc:
            raise ConfigError(f"{key}.options.attention", str(exc)) from None


def _check_variant_builds(config: dict, variant: str, dataset: dict) -> None:
    """Build the variant's model on the ``meta`` device at the data set's shape (no weights allocated).

    Unknown options (a ``TypeError`` from the constructor) and inconsistent ones (e.g. a width not
    divisible by the heads) fail here, before any job, with the model's own message.
    """
    from .models import resolve_options

    v = config["variants"][variant]
    backbone, options = resolve_options(v.get("backbone"), v.get("preset"), v.get("options"))
    training = {**config.get("training", {}), **v.get("training", {})}
    num_classes = KNOWN_NUM_CLASSES.get(dataset["source"], 10) if training.get("class_conditional") else 0
    channels, side = model_input(dataset)  # a latent data set: the autoencoder's latent grid (4 x resolution/8)
    error = _meta_build_error(backbone, json.dumps(options, sort_keys=True, default=str), channels, side, num_classes)
    if error is not None:
        raise ConfigError(f"variants.{variant}.options", f"{error} (building {backbone!r} for a "
                          f"{channels}x{side}x{side} input{' of latents' if dataset.get('latents') else ''})")


@functools.lru_cache(maxsize=None)
def _meta_build_error(backbone: str, options_json: str, channels: int, resolution: int, num_classes: int) -> str | None:
    """The constructor's error message, or None when the model builds. Cached per distinct model and shape,
    so the cost grows with the number of distinct variants, not with variants x N x seeds x data sets."""
    import torch

    from .models import BACKBONES

    try:
        with torch.device("meta"), skip_init_on_meta():
            BACKBONES[backbone](input_size=resolution, in_channels=channels, num_classes=num_classes,
                                learn_sigma=True, **json.loads(options_json))
    except Exception as exc:  # the constructor's own message, whatever its type
        message = (str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)) or type(exc).__name__
        return message if isinstance(exc, (ValueError, AssertionError)) else f"{type(exc).__name__}: {message}"
    return None


@functools.lru_cache(maxsize=None)
def _skip_init_mode():
    import torch
    from torch.overrides import TorchFunctionMode

    class SkipInitOnMeta(TorchFunctionMode):
        """In-place initialisers (``normal_``, ``uniform_``, ``copy_`` ...) on meta tensors become no-ops.

        A meta tensor has no values to initialise, but PyTorch routes e.g. ``normal_`` on meta through its
        Python reference implementations, which import ``torch._dynamo`` (about 2 s and 100s of MB)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name.endswith("_") and not name.startswith("_") and name != "requires_grad_":
                # torch.nn.init.* pass their tensor as a keyword, Tensor methods as the first argument
                target = args[0] if args else kwargs.get("tensor")
                if isinstance(target, torch.Tensor) and target.is_meta:
                    return target
            return func(*args, **kwargs)

    return SkipInitOnMeta


def skip_init_on_meta():
    """Context manager: in-place initialisers on meta tensors are skipped (use inside ``torch.device("meta")``)."""
    return _skip_init_mode()()


SKIP_DATA_CHECK_ENV = "DIFFBIAS_SKIP_DATA_CHECK"


def check_datasets(config: dict, prepared_dir: str | Path | None = None) -> None:
    """Check at DAG build that every data set some study uses is on disk with its source's layout.

    For each such data set: the path exists and has the layout its ``source`` loader reads (headers only,
    see :func:`diffbias.data.check_source`), and, where the files say how many images they hold, the
    count equals a configured ``pool_size`` and the pool (capped by ``max_images``) holds every study's
    largest N plus ``test_size`` (a ``test_path``: its layout, and ``test_size`` images there). A data set
    is skipped only when its prepared pool ``<prepared_dir>/<key>.npz`` (a latent data set: its latent cache
    ``<prepared_dir>/../latents/<key>/meta.json``) exists and was made from exactly its current config entry
    (recorded in the pool's or cache's metadata): then no job reads its source. After any edit of the entry Snakemake
    schedules ``prepare_data`` (``encode_latents``) again (its params are the entry), so the source is checked. A
    latent data set's autoencoder folder must hold an AutoencoderKL, and files that measurement settings name (FID's
    reference statistics) must exist. Raises ConfigError naming the key (``datasets.<key>.path``, ...).
    Needs the files: on a cluster, run Snakemake where the data are mounted (the login node); set
    ``DIFFBIAS_SKIP_DATA_CHECK=1`` to build a DAG elsewhere (e.g. a dry run of a paper config on a laptop).
    """
    from .data import check_source

    wanted: dict[str, int] = {}
    twice: dict[str, bool] = {}
    for study in config["studies"].values():
        for dataset in study_datasets(study):  # a split-B variant uses the N images before split A's
            parts = split_parts(config, study["variants"])
            wanted[dataset] = max(wanted.get(dataset, 0), *(parts * n for n in study["N"]))
            twice[dataset] = twice.get(dataset, False) or parts == 2
        for variant in study["variants"]:  # a PCA basis from another data set's run reads that data set too
            pca = config["variants"][variant].get("pca_from") or {}
            if pca.get("dataset"):
                wanted[pca["dataset"]] = max(wanted.get(pca["dataset"], 0), int(pca["N"]))
    for key in sorted(wanted):
        ds = config["datasets"][key]
        if ds.get("latents"):
            _check_autoencoder(config, key)
        if prepared_dir is not None:  # <results_dir>/data; latent caches live beside it, in <results_dir>/latents
            done = (_encoded_from(Path(prepared_dir).parent / "latents" / key / "meta.json", ds) if ds.get("latents")
                    else _prepared_from(Path(prepared_dir) / f"{key}.npz", ds))
            if done:
                continue  # no job reads its source
        where = f"datasets.{key}.path"
        shown = ds.get("path") or f"<default {ds['source']} location>"
        kwargs = dict(ds.get("loader_kwargs") or {})
        try:
            count = check_source(ds["source"], ds.get("path"), **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(where, f"data set {key!r} ({ds['source']}) at {shown}: {exc}") from None
        if ds.get("test_path"):  # the official test images in a second folder: its layout, and enough of them
            try:
                test_count = check_source(ds["source"], ds["test_path"], **kwargs)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"datasets.{key}.test_path", f"data set {key!r} ({ds['source']}) test images at "
                                  f"{ds['test_path']}: {exc}") from None
            if test_count is not None and ds["test_size"] > test_count:
                raise ConfigError(f"datasets.{key}.test_size", f"test_size={ds['test_size']} but {ds['test_path']} "
                                  f"holds {test_count} images")
        elif ds.get("split") == "official":
            _check_official_on_disk(key, ds, wanted[key], shown)
            if count is None:
                continue
        if count is None:
            continue
        if ds.get("pool_size") and ds["pool_size"] != count:  # pool_size is the source's size, before max_images
            raise ConfigError(f"datasets.{key}.pool_size", f"pool_size={ds['pool_size']} but {shown} holds {count} images")
        usable = min(count, ds["max_images"]) if ds.get("max_images") else count
        if ds.get("split") != "official" and wanted[key] + ds["test_size"] > usable:
            need = (f"{wanted[key]} training images (the largest N twice: a study has a split-B variant)"
                    if twice.get(key) else f"N={wanted[key]}")
            raise ConfigError(where, f"{shown} holds {usable} usable images, fewer than {need} plus "
                              f"test_size={ds['test_size']}")
    _check_measurement_files(config, wanted)


def _check_autoencoder(config: dict, key: str) -> None:
    """A latent data set's autoencoder is a local folder fetched once (jobs never download), unless a rule makes it
    (the rehearsal's tiny one)."""
    from . import plan

    folder = Path(config["datasets"][key]["latents"]["autoencoder"])
    if str(folder) == plan.tiny_autoencoder(config) or (folder / "config.json").is_file():
        return
    raise ConfigError(f"datasets.{key}.latents.autoencoder", f"{folder}: no AutoencoderKL here (config.json missing). "
                      "Fetch it once where there is network access: hf download stabilityai/sd-vae-ft-ema config.json "
                      f"diffusion_pytorch_model.safetensors --local-dir {folder} (docs/latents-and-multi-gpu.md)")


def _check_measurement_files(config: dict, datasets: Iterable[str]) -> None:
    """Files that measurement settings name for the data sets in use (FID's reference statistics) exist."""
    from . import plan

    for inst in plan.instances(config).values():
        for dataset in datasets:
            for where, file in plan.measurement_files(config, inst, dataset).items():
                if not Path(file).is_file():
                    raise ConfigError(where, f"{file} does not exist")


def model_input(dataset: dict) -> tuple[int, int]:
    """(channels, side) of what a model of this data set sees (diffbias.latents.model_input: latents or pixels)."""
    from .latents import model_input as model_input_of

    return model_input_of(dataset)


def _encoded_from(meta: Path, entry: dict) -> bool:
    """Whether the complete latent cache whose ``meta.json`` is ``meta`` was encoded from exactly ``entry`` (its
    ``spec``, the ``encode_latents`` rule's params): then Snakemake will not encode it again."""
    from .latents import cache_spec

    try:
        recorded = json.loads(meta.read_text())["spec"]
    except Exception:  # noqa: BLE001 - no cache, or none readable: check the source
        return False
    return json.dumps(recorded, sort_keys=True) == json.dumps(cache_spec(entry), sort_keys=True, default=str)


def _prepared_from(path: Path, entry: dict) -> bool:
    """Whether the prepared pool at ``path`` exists and records ``entry`` as the config entry it was prepared
    from (``data.prepare_dataset`` writes it into the pool's metadata). Compared as the ``prepare_data`` rule's
    params are (sorted-key JSON), so this is true exactly when Snakemake will not prepare it again. A missing
    file, a pool without the record (an older one) or one that cannot be read: False (check the source)."""
    import numpy as np

    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as d:
            recorded = json.loads(str(d["meta"]))["config_entry"]
    except Exception:  # noqa: BLE001 - no readable record: check the source
        return False
    return json.dumps(recorded, sort_keys=True) == json.dumps(entry, sort_keys=True, default=str)


def _check_official_on_disk(key: str, ds: dict, largest_n: int, shown: str) -> None:
    """A ``split: official`` data set on disk: its files mark official test images, enough for test_size, and enough
    others for the largest N. Image folders other than CelebA's partition are not counted (too many files)."""
    from .data import official_test_mask

    if ds["source"] in ("imagenet", "cifar10"):  # ImageNet: 1.3M files to list; CIFAR-10: fixed sizes, checked
        return                                     # without the data (KNOWN_OFFICIAL_SIZES); prepare_data reads both
    where = f"datasets.{key}.split"
    try:
        mask = official_test_mask(ds["source"], ds.get("path"), max_images=ds.get("max_images"),
                                  **dict(ds.get("loader_kwargs") or {}))
    except (OSError, ValueError) as exc:
        raise ConfigError(where, f"data set {key!r} at {shown}: {exc}") from None
    if mask is None:
        raise ConfigError(where, f"split: official, but {shown} marks no official test images ({ds['source']})")
    n_test, n_train = int(mask.sum()), int((~mask).sum())
    if ds["test_size"] > n_test or largest_n > n_train:
        raise ConfigError(where, f"{shown} has {n_train} official training and {n_test} official test images: fewer "
                          f"than N={largest_n} or test_size={ds['test_size']}")


def split_parts(config: dict, variants: Iterable[str]) -> int:
    """How many disjoint training parts of N images these variants use (2 when one trains on split B)."""
    return 2 if any(config["variants"][v].get("split", "A") == "B" for v in variants if v in config["variants"]) else 1


def pool_size(dataset: dict) -> int | None:
    size = dataset.get("pool_size") or KNOWN_POOL_SIZES.get(dataset["source"])
    if size is not None and dataset.get("max_images"):
        size = min(size, dataset["max_images"])
    return size


def study_datasets(study: dict) -> list[str]:
    return list(study.get("datasets") or [study["dataset"]])


# ----------------------------------------------------------------------------------------------------
# Rehearsal: a paper config at toy sizes (workflow/configs/rehearsal.yaml, README "Rehearsal")
# ----------------------------------------------------------------------------------------------------

def _spread(values: list, count: int) -> list:
    """``count`` entries of a sorted list: the first, the last, then evenly between (order kept)."""
    if len(values) <= count:
        return list(values)
    if count == 1:
        return [values[-1]]
    picks = {round(i * (len(values) - 1) / (count - 1)) for i in range(count)}
    return [v for i, v in enumerate(values) if i in picks]


def _scaled_steps(steps: list[int], from_total: int, to_total: int, keep: int) -> list[int]:
    """Snapshot steps of a ``from_total``-step run at the same fractions of a ``to_total``-step run (each in
    1..to_total-1, duplicates merged), at most ``keep`` of them (the first and the last first)."""
    scaled = sorted({min(to_total - 1, max(1, round(s * to_total / from_total))) for s in steps})
    return _spread(scaled, keep) if keep else []


def rehearsal_resolution(config: dict, rehearsal: dict) -> int:
    """The smallest multiple of ``resolution_multiple`` that is at least ``min_resolution`` and holds every
    attention window of the config at its patch size (window k needs k tokens a side: k * patch pixels)."""
    from .models import resolve_options
    from .models.attention import parse_attention_spec

    need = rehearsal["min_resolution"]
    for variant in config["variants"].values():
        backbone, options = resolve_options(variant.get("backbone"), variant.get("preset"), variant.get("options"))
        if _declares(backbone, "has_attention_spec"):
            windows = [k for k in parse_attention_spec(options.get("attention"), options.get("depth", 12)) if k]
            need = max([need] + [k * options.get("patch_size", 1) for k in windows])
    multiple = rehearsal["resolution_multiple"]
    return -(-need // multiple) * multiple


def _rehearsed_claim(claim: dict, n_map: dict, study: dict) -> dict | None:
    """A claim on the rehearsal's grid: N mapped like the study's, data sets cut like the study's; None when a side
    names an N or the claim only data sets the rehearsal dropped."""
    claim = copy.deepcopy(claim)
    for key in ("lower", "higher", "than"):
        sides = claim.get(key)
        for side in sides if isinstance(sides, list) else [sides]:
            if isinstance(side, dict) and "N" in side:
                if side["N"] not in n_map or n_map[side["N"]] not in study["N"]:
                    return None
                side["N"] = n_map[side["N"]]
    for key, kept in (("N", [n_map.get(n) for n in claim.get("N") or [] if n_map.get(n) in study["N"]]),
                      ("datasets", [d for d in claim.get("datasets") or [] if d in study_datasets(study)])):
        if key in claim:
            if not kept:
                return None
            claim[key] = kept
    return claim


def apply_rehearsal(config: dict) -> dict:
    """The config's rehearsal: the same variants, studies, attention specs, backbones, N order and DAG shape,
    at toy sizes. Called by :func:`validate_config` when a ``rehearsal:`` section is present.

    - Models: each backbone's ``rehearsal_options`` (a class attribute: width and heads, never depth) replace
      the size options of every variant; PCA variants keep their layers with fewer components.
    - Data: every data set becomes a ``fixture`` data set of the same name and channels (data.load_fixture:
      deterministic, structured, labelled) at one model input size that holds the largest attention window. A data
      set with ``latents`` stays latent: its fixture images are 8x that size and are encoded by the tiny SD-shaped
      VAE of rule ``tiny_autoencoder`` (nothing downloaded); ``split`` is kept (the fixture's last quarter is its
      official test part).
    - Grid: per study the first ``max_seeds`` seeds and ``max_datasets`` data sets, ``max_N`` of its N (the
      smallest, the largest, then evenly between); the k-th smallest N left becomes ``N_values[k]`` everywhere
      it is named (studies, evaluation N lists, pca_from), so every comparison over N keeps its order.
    - Training: ``steps`` steps of batch ``batch_size`` for every variant, EMA with warm-up; snapshot and
      warm-up steps at the same fractions of the run; ``gpus_per_run`` > 1 becomes at most ``max_gpus_per_run``
      processes dividing the batch (torchrun with gloo on the CPU). Evaluation: a few images and samples, few sampling steps.
    - Outputs: ``<results_root>/<name of the config's results_dir>`` (reports in its ``reports/``), CPU, no GPU
      requests.
    """
    from .measurements import load as load_measurements
    from .models import BACKBONES, resolve_options

    cfg = copy.deepcopy(config)
    r = cfg["rehearsal"]
    name = Path(cfg["results_dir"]).name or "config"
    cfg["results_dir"] = f"{r['results_root'].rstrip('/')}/{name}"
    cfg["reports_dir"] = f"{cfg['results_dir']}/reports"
    for group in cfg.get("resources", {}).values():  # local rehearsal: no GPU request, short jobs
        group.update({"gpu": 0, "runtime": min(group.get("runtime", 10), 10), "mem_mb": min(group.get("mem_mb", 4000), 4000)})

    # grid: seeds, data sets and N per study
    kept_n: dict[str, list[int]] = {}
    for study_name, study in cfg["studies"].items():
        study["seeds"] = study["seeds"][: r["max_seeds"]]
        if "datasets" in study:
            study["datasets"] = study["datasets"][: r["max_datasets"]]
        kept = set(_spread(sorted(set(study["N"])), r["max_N"]))
        kept_n[study_name] = [n for n in study["N"] if n in kept]
    pca_n = {int(v["pca_from"]["N"]) for v in cfg["variants"].values() if v.get("pca_from")}
    domain = sorted({n for ns in kept_n.values() for n in ns} | pca_n)
    if len(domain) > len(r["N_values"]):
        raise ConfigError("rehearsal.N_values", f"{len(domain)} distinct N kept ({domain}) but only "
                          f"{len(r['N_values'])} rehearsal values {r['N_values']}")
    targets = sorted(r["N_values"])[: len(domain)]
    n_map = dict(zip(domain, targets))
    for study_name, study in cfg["studies"].items():
        study["N"] = [n_map[n] for n in kept_n[study_name]]
        study["claims"] = [c for c in (_rehearsed_claim(c, n_map, study) for c in study.get("claims") or []) if c]
    parts = split_parts(cfg, cfg["variants"])  # a split-B variant trains on the N images before split A's
    if parts * targets[-1] + r["test_size"] > r["fixture_images"]:
        raise ConfigError("rehearsal.fixture_images", f"{r['fixture_images']} fixture images cannot hold "
                          f"{parts} x N={targets[-1]} plus test_size={r['test_size']}")
    # measurements: N lists mapped like the studies' N, sizes shrunk by each measurement's own `rehearse`
    for m in load_measurements().values():
        sections = [cfg["evaluation"][m.key]] if m.scope == "run" else [
            study[m.key] for study in cfg["studies"].values() if m.key in study]
        for settings in sections:
            if settings.get("N") is not None:
                settings["N"] = [n_map[n] for n in settings["N"] if n in n_map]
            if m.rehearse:
                m.rehearse(settings, r)

    # data: one fixture data set per name, the same grid for every model; latent data sets stay latent
    from . import plan
    from .autoencoder import SD_GEOMETRY

    resolution = rehearsal_resolution(cfg, r)
    for key, ds in cfg["datasets"].items():
        side = model_input(ds)[1]
        if resolution > side:
            raise ConfigError(f"datasets.{key}.resolution", f"the rehearsal needs a {resolution}x{resolution} input "
                              f"(largest attention window x patch), more than the configured {side}")
        fixture = {"source": "fixture", "path": key, "resolution": resolution, "channels": ds["channels"],
                   "test_size": r["test_size"], "pool_size": None, "max_images": r["fixture_images"]}
        if "split" in ds:  # the fixture has an official test part (its last quarter): the same split code runs
            fixture["split"] = ds["split"]
        if ds.get("latents"):  # images 8x the grid, encoded by the tiny SD-shaped VAE a rule makes
            fixture["resolution"] = resolution * SD_GEOMETRY[1]
            fixture["latents"] = {**ds["latents"], "autoencoder": plan.tiny_autoencoder(cfg),
                                  "shard_size": r["latent_shard_size"]}
        cfg["datasets"][key] = fixture

    # models: backbone-declared tiny widths, depth and attention spec kept
    for variant_name, variant in cfg["variants"].items():
        backbone, _ = resolve_options(variant.get("backbone"), variant.get("preset"), variant.get("options"))
        tiny = getattr(BACKBONES[backbone], "rehearsal_options", None)
        if tiny is None:
            raise ConfigError(f"variants.{variant_name}", f"backbone {backbone!r} declares no rehearsal_options "
                              f"(a class attribute: tiny width options that keep the depth)")
        variant["options"] = {**variant.get("options", {}), **copy.deepcopy(tiny)}
        if variant.get("pca_from"):
            variant["pca_from"]["N"] = n_map[int(variant["pca_from"]["N"])]
            variant["pca_from"]["num_images"] = min(variant["pca_from"]["num_images"], r["pca_images"])
            variant["options"]["pca_components"] = min(variant["options"].get("pca_components", 50), r["pca_components"])

    # training: a few steps; snapshots and warm-up at the same fractions of the run
    def shrink_training(training: dict, total: int) -> None:
        if "snapshot_steps" in training:
            training["snapshot_steps"] = _scaled_steps(training["snapshot_steps"], total, r["steps"], r["max_snapshots"])
        if training.get("warmup_steps"):
            training["warmup_steps"] = max(1, round(training["warmup_steps"] * r["steps"] / total))
        # EMA warm-up: with a paper's 0.9999 a few steps leave the EMA at the initialisation, and every model
        # (zero output at init) would sample the same images: FID and PSNR would not see the trained weights
        for key, value in (("steps", r["steps"]), ("batch_size", r["batch_size"]),
                           ("checkpoint_every", max(1, r["steps"] // 2)), ("log_every", max(1, r["steps"] // 3)),
                           ("compile", False), ("ema_warmup", True)):
            if key in training or training is cfg["training"]:
                training[key] = value
        if training.get("gpus_per_run", 1) > 1:  # still several processes (torchrun, gloo), each an equal share
            gpus = min(training["gpus_per_run"], r["max_gpus_per_run"])
            while r["batch_size"] % gpus:
                gpus -= 1
            training["gpus_per_run"] = gpus

    for variant in cfg["variants"].values():
        if "training" in variant:
            shrink_training(variant["training"], variant["training"].get("steps", cfg["training"]["steps"]))
    shrink_training(cfg["training"], cfg["training"]["steps"])

    for study in cfg["studies"].values():
        latent = any(cfg["datasets"][d].get("latents") for d in study_datasets(study))
        data = (f"{resolution}x{resolution}x4 latents of {resolution * SD_GEOMETRY[1]}x{resolution * SD_GEOMETRY[1]} "
                "fixture images through a tiny random VAE" if latent else f"{resolution}x{resolution} fixture data")
        note = f"REHEARSAL (not a result): {data}, tiny widths, {r['steps']} training steps, N mapped {n_map}."
        study["scale_note"] = f"{note} {study.get('scale_note', '')}".strip()
    r["applied"] = True
    return cfg


# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class RunKey:
    dataset: str
    variant: str
    n: int
    seed: int

    @property
    def path(self) -> str:
        return f"{self.dataset}/{self.variant}/N{self.n}/seed{self.seed}"


def study_runs(config: dict, study: str) -> list[RunKey]:
    s = config["studies"][study]
    return sorted(
        RunKey(d, v, int(n), int(seed)) for d in study_datasets(s) for v in s["variants"] for n in s["N"] for seed in s["seeds"]
    )


def pca_basis_path(results_dir: str, run: RunKey, pca_from: dict) -> str:
    return f"{results_dir}/runs/{pca_source(run, pca_from).path}/pca_basis.pt"


def all_runs(config: dict) -> list[RunKey]:
    return sorted({run for study in config["studies"] for run in study_runs(config, study)})


def run_spec(config: dict, run: RunKey) -> dict:
    """Everything that determines a run's result (and nothing else): hashing it names the run's content."""
    from .models import resolve_options

    variant = config["variants"][run.variant]
    backbone, options = resolve_options(variant.get("backbone"), variant.get("preset"), variant.get("options"))
    training = dict(config.get("training", {}))
    training.update(variant.get("training", {}))
    if training.get("gpus_per_run") == 1:  # one process is the default: existing runs keep their hash
        del training["gpus_per_run"]
    dataset = dict(config["datasets"][run.dataset])
    if dataset.get("split") == "shuffle":  # the default, stated or not: existing runs keep their hash
        del dataset["split"]
    spec = {
        "run": {"dataset": run.dataset, "variant": run.variant, "N": run.n, "seed": run.seed},
        "dataset": dataset,
        "model": {"backbone": backbone, "preset": variant.get("preset"), "options": options},
        "training": training,
    }
    if "pca_from" in variant:  # the basis's source run is part of what determines this run
        spec["model"]["pca_from"] = {**variant["pca_from"], "source": pca_source(run, variant["pca_from"]).path}
    if variant.get("split", "A") != "A":  # only split B is recorded: split-A runs keep their hash
        spec["split"] = variant["split"]
    return spec


def pca_source(run: RunKey, pca_from: dict) -> RunKey:
    """The baseline run whose attention maps give a PCA variant's basis: same seed, and the run's own data set
    unless ``pca_from.dataset`` names another (paper 004 app. C: PCs of the ImageNet N = 1e5 model used on CelebA)."""
    return RunKey(pca_from.get("dataset") or run.dataset, pca_from["variant"], int(pca_from["N"]), run.seed)


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def variant_label(config: dict, variant: str) -> str:
    return config["variants"][variant].get("label", variant)


def iter_variants(config: dict, names: Iterable[str]) -> list[tuple[str, str]]:
    return [(name, variant_label(config, name)) for name in names]
