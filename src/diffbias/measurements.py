"""The measurement registry: what is measured on a trained run, on which runs, into which files, and where
it lands in the report.

The Snakemake rules (workflow/rules/common.smk: ``MEASURED_RUNS``, ``run_files``, ``study_tables`` and the
``aggregate_study`` wildcard constraint) and the report's table list (``report.build_report``) read
:data:`MEASUREMENTS`; nothing else lists measurements by name.

A measurement applies to a run when

- its ``N`` list (``evaluation.<config_key>.N``; absent or null: every N) holds the run's N, and
- its ``capability`` (a backbone class attribute, see docs/model-contract.md) is declared truthy by the
  run's backbone and, where ``option`` is set, that option of the variant is truthy too.

Plugins: ``DIFFBIAS_MEASUREMENT_PLUGINS`` is a comma-separated list of importable module names; each is
imported by :func:`load_plugins` and registers its measurement with :func:`register_measurement`. A plugin
measurement (``builtin=False``) is run by the generic rule ``measure`` (evaluate.smk) through
``python -m diffbias measure <name>``, which calls its ``compute`` and writes its table; its ``section``
draws its report page. docs/adding-a-measurement.md walks through one.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

PLUGINS_ENV = "DIFFBIAS_MEASUREMENT_PLUGINS"


@dataclass(frozen=True)
class Measurement:
    name: str  # the study table: results/studies/<study>/<name>.parquet
    config_key: str | None = None  # section under `evaluation:` ({} when None or absent)
    command: str | None = None  # `python -m diffbias <command>` (built-ins have their own rule in evaluate.smk)
    outputs: tuple[str, ...] = ()  # per-run files; the first is the parquet table
    capability: str | None = None  # backbone class attribute the run's backbone must declare truthy
    option: str | None = None  # ...and this variant option must be truthy (e.g. U-ViT's `gmm`)
    needs_fid_reference: bool = False  # reads the shared (dataset, N, seed) Inception reference
    needs_snapshots: bool = False  # reads the run's EMA snapshots
    section: str | Callable[[dict], None] | None = None  # report section (name in report.py, or a callable)
    scope: str = "run"  # "run": one table per run; "study": parametrised per study (FreeU's grid)
    study_key: str | None = None  # scope "study": the study's config key holding the grid (studies.<s>.<key>)
    params: tuple[str, ...] = ()  # grid parameters of an evaluation-time ablation (FreeU: b, s)
    builtin: bool = True  # False: run by the generic `measure` rule through `compute`
    # plugins: compute(run: diffbias.runs.TrainedRun, cfg: dict) -> pandas.DataFrame (one per run; run keys are
    # added); cfg is its section evaluation.<config_key>, validated and completed from `settings`
    compute: Callable[..., Any] | None = field(default=None, compare=False)
    # plugins: JSON-schema properties of evaluation.<config_key> (with their defaults); `N` is always allowed
    settings: dict = field(default_factory=dict, compare=False)

    @property
    def table(self) -> str:
        return self.outputs[0] if self.outputs else f"{self.name}.parquet"

    def n_list(self, evaluation: dict) -> list[int] | None:
        return (evaluation.get(self.config_key) or {}).get("N") if self.config_key else None

    def applies(self, evaluation: dict, n: int, backbone_cls: type, options: dict) -> bool:
        ns = self.n_list(evaluation)
        if ns is not None and n not in ns:
            return False
        if self.capability and not getattr(backbone_cls, self.capability, False):
            return False
        return not self.option or bool(options.get(self.option))


MEASUREMENTS: dict[str, Measurement] = {}


def register_measurement(m: Measurement) -> Measurement:
    if m.name in MEASUREMENTS and MEASUREMENTS[m.name] != m:
        raise ValueError(f"measurement {m.name!r} registered twice")
    if not m.builtin and m.compute is None:
        raise ValueError(f"plugin measurement {m.name!r} needs a compute function")
    MEASUREMENTS[m.name] = m
    return m


for _m in (
    Measurement("psnr", "psnr", "psnr", ("psnr.parquet",), section="section_psnr_curves"),
    Measurement("fid", "fid", "fid", ("fid.parquet", "samples.npz"), needs_fid_reference=True, section="section_fid"),
    Measurement("fid_curve", "fid_curve", "fid-curve", ("fid_curve.parquet",), needs_fid_reference=True,
                needs_snapshots=True, section="section_fid_curve"),
    Measurement("jacobian", "jacobian", "jacobian", ("jacobian.parquet", "jacobian_vectors.npz"),
                section="section_jacobian"),
    Measurement("attention", "attention", "attention", ("attention.parquet", "attention_maps.npz"),
                section="section_attention"),
    Measurement("gmm_masks", "gmm_masks", "gmm-masks", ("gmm_masks.parquet", "gmm_masks.npz"),
                capability="has_gmm_masks", option="gmm", section="section_gmm_masks"),
    # An evaluation-time ablation: config under studies.<study>.freeu_grid, per-run files named after the study.
    Measurement("freeu", None, "freeu-grid", ("freeu-{study}.parquet", "freeu-{study}-samples.npz"),
                capability="supports_freeu", section="section_freeu", scope="study", study_key="freeu_grid",
                params=("b", "s")),
):
    register_measurement(_m)


def load_plugins(spec: str | None = None) -> list[str]:
    """Import the plugin modules named in ``spec`` (default: $DIFFBIAS_MEASUREMENT_PLUGINS)."""
    spec = os.environ.get(PLUGINS_ENV, "") if spec is None else spec
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        importlib.import_module(name)
    return names


def per_run() -> dict[str, Measurement]:
    """Measurements with one table per run (everything but study-scoped grids)."""
    load_plugins()
    return {k: m for k, m in MEASUREMENTS.items() if m.scope == "run"}


def plugins() -> dict[str, Measurement]:
    load_plugins()
    return {k: m for k, m in MEASUREMENTS.items() if not m.builtin}


def report_tables() -> list[str]:
    """Study tables the report reads when present (besides train_log and counts, which every study has)."""
    load_plugins()
    return list(MEASUREMENTS)
