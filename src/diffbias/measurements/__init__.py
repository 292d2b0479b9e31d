"""The measurement registry: what is measured on a trained run, on which runs, with which settings, at what cost,
how the rehearsal shrinks it, and how the report draws it.

A measurement is **one module** that calls :func:`register_measurement` when imported:

- the built-ins are the modules of this package named in :data:`BUILTIN` (one line each);
- plugins are importable modules named in ``$DIFFBIAS_MEASUREMENT_PLUGINS`` (comma-separated).

Built-ins and plugins are the same kind of object and go through the same path: one generic Snakemake rule
(``measure`` in workflow/rules/evaluate.smk), one command (``python -m diffbias measure <name>``), one config
section whose schema the measurement declares, one set of report sections. The workflow plan
(:mod:`diffbias.plan`), the config schema and rehearsal (:mod:`diffbias.config`), the cost estimate
(:mod:`diffbias.cost`) and the report (:mod:`diffbias.report`) read this registry; none of them names a
measurement. docs/adding-a-measurement.md walks through one.

Which runs a measurement applies to:

- its ``N`` list (``evaluation.<config_key>.N``; ``null``: every N) holds the run's N;
- ``class_conditional``: the run is class-conditional (``training.class_conditional``), e.g. guided sampling;
- its ``capability`` (a backbone class attribute, docs/model-contract.md) is truthy on the run's backbone, and
  ``option``, when set, is a truthy option of the variant;
- a study-scoped measurement (``study_key`` set, e.g. FreeU's (b, s) grid under ``studies.<s>.freeu_grid``)
  applies to the runs of the studies that declare that key, once per study, with that study's settings.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

PLUGINS_ENV = "DIFFBIAS_MEASUREMENT_PLUGINS"

# The built-in measurements, in report order: one module each under diffbias/measurements/.
BUILTIN = ("psnr", "memorisation", "reproducibility", "fid", "fid_guided", "fid_curve", "freeu", "jacobian", "attention",
           "gmm_masks", "signal_function")

# What a measurement may need besides its run's model and data (Measurement.needs), resolved by diffbias.plan:
#   "snapshots"       the run's EMA snapshots (training.snapshot_steps)
#   "twin"            the model of the run's split-B twin: the same dataset, N and seed, a variant that differs from
#                     the run's only by `split: B`, listed in the same study. The measurement then applies only to
#                     split-A runs that have such a twin (plan.twin_run), once per pair
#   "shared:<name>"   a SharedInput built once per (dataset, N, seed, split), e.g. "shared:fid_reference"
#   "table:<name>"    another measurement's table of the same run, when that measurement applies to the run
NEED_KINDS = ("snapshots", "twin", "shared:", "table:")
REQUIRED_NEEDS = ("snapshots", "twin")  # the job cannot compute without them (a shared input or table is a shortcut)


@dataclass
class Result:
    """What ``compute`` returns (a plain DataFrame is read as ``Result(table)``): the per-run table (the run's keys
    are added), per-run arrays (written to ``<name>.npz`` when the measurement declares ``arrays``) and extra
    parquet metadata."""

    table: Any
    arrays: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Cost:
    """Forward-pass equivalents of one job on one run, in units of one image forward of the run's model, plus the
    images it pushes through Inception-v3 (diffbias.cost turns both into FLOPs)."""

    forwards: float = 0.0
    inception_images: float = 0.0


@dataclass(frozen=True)
class SharedInput:
    """A file several measurements read, built once per (dataset, N, seed, split) by the generic ``shared_input``
    rule (``python -m diffbias shared-input <name>``), e.g. the Inception features of an FID reference set.

    ``build(images, labels, split, key, cfg, device, threads) -> dict of arrays`` gets the pool's images (the prepared
    uint8 array, or for a latent data set a lazy data.PixelImages of its real images: read it in chunks), the
    (train, test) indices of the runs it serves (data.run_split), their key ``{"N", "seed", "split"}`` and its
    settings ``cfg`` = ``evaluation.<config_key>``. ``applies(cfg, N)``, when given, says whether runs of size N
    use it at all (a measurement computes without it otherwise); no job builds it where it does not."""

    name: str
    config_key: str
    build: Callable[..., dict]
    cost: Callable[[dict, dict, int], Cost] | None = None  # (dataset spec, settings, N) -> Cost
    applies: Callable[[dict, int], bool] | None = None  # (settings, N) -> whether the runs of size N read it


@dataclass(frozen=True)
class Quantity:
    """One number per run that report tables compare with the study's baselines and that claims
    (``studies.<s>.claims``) name, e.g. the mean PSNR gap.

    ``per_run(table) -> DataFrame`` gets the measurement's study table and returns one row per run: the run keys
    (dataset, variant, N, seed), ``value`` and, when the run has one, its own interval ``low``/``high`` (e.g. a
    bootstrap 95 % CI over the run's evaluation images). ``interval`` says what that interval covers."""

    name: str
    description: str  # one line, with its unit
    per_run: Callable[[Any], Any] = field(compare=False)
    lower_is_better: bool = True  # for tables' "best" marks only: a claim says its own direction
    interval: str = ""  # what a run's low/high cover ("" when runs have none)


@dataclass(frozen=True)
class Measurement:
    name: str  # per-run files <name>.parquet (+ <name>.npz); the study table studies/<study>/<name>.parquet
    # compute(run: diffbias.runs.TrainedRun, cfg: dict) -> pandas.DataFrame | Result. cfg is the measurement's
    # config section, validated and completed from `settings`; run.inputs holds the paths of its `needs`.
    compute: Callable[..., Any] = field(compare=False)
    description: str = ""  # one line: what it measures (schema description, docs, report's closing line)
    settings: dict = field(default_factory=dict, compare=False)  # JSON-schema properties, each with its default
    required: tuple[str, ...] = ()  # settings without a default (study-scoped grids: FreeU's b and s)
    N: list[int] | None = None  # default of evaluation.<config_key>.N (None: every N); run scope only
    config_key: str | None = None  # evaluation.<config_key> (default: the name)
    settings_from: str | None = None  # also uses another measurement's settings (all but N): fid_curve uses fid's
    study_key: str | None = None  # set: configured per study under studies.<s>.<study_key> (scope "study")
    capability: str | None = None  # backbone class attribute the run's backbone must declare truthy
    option: str | None = None  # ...and this variant option must be truthy (U-ViT's `gmm`)
    pixel_only: bool = False  # reads the pool's pixels (run.images): not measurable on a latent data set
    arrays: bool = False  # writes per-run arrays (<name>.npz), packed per study for the report
    preview_items: int | None = None  # items of each array kept in the study-level pack (a preview for figures)
    needs: tuple[str, ...] = ()  # see NEED_KINDS
    # files named by its settings, per data set: (settings, dataset) -> {subkey of its section: path}, e.g. FID's
    # reference statistics; checked on disk at DAG build with the data sets (config.check_datasets)
    files: Callable[[dict, str], dict[str, str]] | None = field(default=None, compare=False)
    class_conditional: bool = False  # applies only to class-conditional runs (training.class_conditional): guidance
    rehearse: Callable[[dict, dict], None] | None = field(default=None, compare=False)  # (settings, rehearsal)
    cost: Callable[[dict, dict], Cost] | None = field(default=None, compare=False)  # (run spec, settings)
    runtime_units: Callable[[dict, dict], float] | None = field(default=None, compare=False)  # x evaluate runtime
    renamed: dict = field(default_factory=dict, compare=False)  # old setting name -> new (fails with the new name)
    check: Callable[[dict], tuple[str, str] | None] | None = field(default=None, compare=False)  # -> (subkey, why)
    sections: tuple[Callable[[dict], None], ...] = field(default=(), compare=False)  # report sections, in order
    findings: Callable[[dict], list[str]] | None = field(default=None, compare=False)  # lines for the overview
    cost_columns: Callable[[dict], Any] | None = field(default=None, compare=False)  # per-variant columns
    quantities: tuple[Quantity, ...] = field(default=(), compare=False)  # numbers claims and comparisons name

    def __post_init__(self):
        for need in self.needs:
            if not (need in ("snapshots", "twin") or need.startswith(("shared:", "table:"))):
                raise ValueError(f"measurement {self.name!r}: unknown need {need!r} (kinds: {NEED_KINDS})")

    @property
    def key(self) -> str:
        """Its config section: ``evaluation.<key>`` (run scope) or ``studies.<s>.<key>`` (study scope)."""
        return self.study_key or self.config_key or self.name

    @property
    def scope(self) -> str:
        return "study" if self.study_key else "run"

    def schema(self) -> dict:
        """The JSON schema of its config section (``N`` added for run-scoped measurements)."""
        props = dict(self.settings)
        if self.scope == "run":
            props = {"N": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 1}, "default": self.N,
                           "description": "training-set sizes whose runs are measured (null: every N; []: none)"},
                     **props}
        schema = {"type": "object", "additionalProperties": False, "properties": props,
                  "description": self.description}
        if self.required:
            schema["required"] = list(self.required)
        elif self.scope == "run":  # a study-scoped section is switched on by being there: no default
            schema["default"] = {}
        return schema

    def applies(self, settings: dict, n: int, backbone_cls: type, options: dict) -> bool:
        ns = settings.get("N") if self.scope == "run" else None
        if ns is not None and n not in ns:
            return False
        if self.capability and not getattr(backbone_cls, self.capability, False):
            return False
        return not self.option or bool(options.get(self.option))


MEASUREMENTS: dict[str, Measurement] = {}
SHARED_INPUTS: dict[str, SharedInput] = {}


def register_measurement(m: Measurement) -> Measurement:
    if m.name in MEASUREMENTS and MEASUREMENTS[m.name] != m:
        raise ValueError(f"measurement {m.name!r} registered twice")
    if m.name == "train_log" or not m.name.replace("_", "").isalnum():
        raise ValueError(f"measurement name {m.name!r}: letters, digits and _ only, and not 'train_log'")
    MEASUREMENTS[m.name] = m
    return m


def register_shared_input(s: SharedInput) -> SharedInput:
    if s.name in SHARED_INPUTS and SHARED_INPUTS[s.name] != s:
        raise ValueError(f"shared input {s.name!r} registered twice")
    SHARED_INPUTS[s.name] = s
    return s


def load(spec: str | None = None) -> dict[str, Measurement]:
    """Import the built-ins and the plugin modules named in ``spec`` (default: $DIFFBIAS_MEASUREMENT_PLUGINS);
    returns the registry, built-ins first in :data:`BUILTIN` order, then plugins in import order."""
    for name in BUILTIN:
        importlib.import_module(f"{__name__}.{name}")
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    for name in (s.strip() for s in spec.split(",")):
        if name:
            importlib.import_module(name)
    # built-ins in BUILTIN order whatever was imported first (a module imported directly registers itself early)
    ordered = {name: MEASUREMENTS[name] for name in BUILTIN if name in MEASUREMENTS}
    ordered.update((name, m) for name, m in MEASUREMENTS.items() if name not in ordered)
    if list(ordered) != list(MEASUREMENTS):
        MEASUREMENTS.clear()
        MEASUREMENTS.update(ordered)
    return MEASUREMENTS


def quantities() -> dict[str, tuple[Measurement, Quantity]]:
    """Every registered quantity by name, with the measurement that provides it."""
    out = {}
    for m in load().values():
        for q in m.quantities:
            if q.name in out and out[q.name][0].name != m.name:
                raise ValueError(f"quantity {q.name!r} declared by {out[q.name][0].name!r} and {m.name!r}")
            out[q.name] = (m, q)
    return out


def get(name: str) -> Measurement:
    registry = load()
    if name not in registry:
        raise KeyError(f"unknown measurement {name!r}; registered: {sorted(registry)}")
    return registry[name]
