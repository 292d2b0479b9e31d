"""What a study costs before it runs: training and evaluation GPU-hours from FLOP counts and a throughput.

For every run of a config (:func:`diffbias.config.all_runs`) the model's forward cost F (fvcore
multiply-accumulates per image x 2 = FLOPs, :func:`diffbias.metrics.flops.count_flops`, counted once per
distinct model and input shape) is multiplied by the number of image-passes each job makes:

- training: steps x batch x 3F (forward + backward = 3 forwards);
- each measurement on each run it applies to: the forwards and Inception-v3 images (5.7 GMACs each) its module
  declares (``Measurement.cost``, e.g. PSNR: 2 splits x K images x respaced steps; FID: samples x sampling steps;
  Jacobian: its product budget); a shared input (the FID reference set) once per (dataset, N, seed);
- PCA bases (``pca_from``): num_images x len(timesteps) forwards of the source baseline.

A latent data set's models are counted at the latent grid they train on (4 x 32 x 32 for ImageNet 256); the
autoencoder's own work (encoding the data set once, decoding each sample) is not priced.

GPU-hours = FLOPs / sustained FLOP/s / 3600. Wall-clock hours per run divide a training's GPU-hours by its
``training.gpus_per_run`` (DDP at a fixed global batch: ideal scaling, communication not priced); each evaluation job
runs on one GPU. The sustained rate is ``--throughput-tflops`` (default 40%
of an A100's 312 bf16 TFLOP/s = 124.8, a good utilisation for mid-sized transformers; small models at
32x32 often reach less) or the achieved TFLOP/s of the benchmark's training table (``scripts/benchmark.py``
run on the node type: its ``achieved_tflops`` per preset, else the table's median). It is an estimate of
arithmetic time: data loading, start-up, queueing and checkpointing are not in it.
"""

from __future__ import annotations

import functools
import json

import pandas as pd

from . import plan
from .config import all_runs, run_spec, study_runs

A100_BF16_TFLOPS = 312.0
DEFAULT_UTILISATION = 0.40
DEFAULT_TFLOPS = A100_BF16_TFLOPS * DEFAULT_UTILISATION
INCEPTION_GMACS = 5.7  # Inception-v3 at 299x299, per image (FID features)
NUM_CLASSES_FOR_COUNTING = 1000  # a class-conditional model's label table does not change its MACs measurably


@functools.lru_cache(maxsize=None)
def forward_gmacs(backbone: str, options_json: str, channels: int, resolution: int, num_classes: int) -> float:
    """fvcore MACs per image (in 1e9) of one forward pass, counted once per distinct model and shape.

    The model stays on the meta device and is traced there (``count_flops``): no weights, no activations,
    no arithmetic, so a DiffuSSM-XL costs about what a tiny model does (the count is the same as on real
    tensors, tested)."""
    from .metrics.flops import build_for_counting, count_flops

    model = build_for_counting(backbone, None, json.loads(options_json), input_size=resolution,
                               in_channels=channels, num_classes=num_classes, materialize=False).eval()
    macs, _ = count_flops(model, input_size=resolution, in_channels=channels, num_classes=num_classes)
    return macs / 1e9


def run_costs(config: dict) -> pd.DataFrame:
    """One row per distinct run: forward GMACs, and TFLOPs per job kind: ``train``, one column per measurement
    (each prices its own job, ``Measurement.cost``), ``inception`` (Inception-v3 on samples and reference sets;
    a shared reference set is counted once, split between the runs that read it) and ``pca_basis``."""
    from .config import pca_source
    from .measurements import SHARED_INPUTS

    from .distributed import gpus_per_run
    from .latents import model_input

    instances = plan.instances(config)
    rows, shared_users = [], {}
    for run in all_runs(config):
        spec = run_spec(config, run)
        m, ds = spec["model"], spec["dataset"]
        num_classes = NUM_CLASSES_FOR_COUNTING if spec["training"].get("class_conditional") else 0
        channels, side = model_input(ds)  # latents: the grid the model trains on
        gmacs = forward_gmacs(m["backbone"], json.dumps(m["options"], sort_keys=True, default=str),
                              channels, side, num_classes)
        tflops = 2 * gmacs / 1e3  # one forward, TFLOPs
        tr = spec["training"]
        row = {"dataset": run.dataset, "variant": run.variant, "N": run.n, "seed": run.seed, "preset": m.get("preset"),
               "gmacs": gmacs, "gpus": gpus_per_run(spec),
               "train": 3.0 * tr["steps"] * tr["batch_size"] * tflops}  # forward + backward = 3F
        inception = 0.0
        for name, inst in instances.items():
            if inst.study and run not in study_runs(config, inst.study):
                continue
            if not plan.applies(config, inst, run, inst.study) or inst.measurement.cost is None:
                continue
            c = inst.measurement.cost(spec, plan.instance_settings(config, name))
            row[inst.measurement.name] = row.get(inst.measurement.name, 0.0) + c.forwards * tflops
            inception += c.inception_images
            for need in inst.measurement.needs:  # once per (dataset, N, seed, split) where runs of size N read it
                if need.startswith("shared:") and plan.shared_applies(config, need[7:], run.n):
                    key = (need[7:], run.dataset, run.n, run.seed, plan.split_of(config, run.variant))
                    shared_users.setdefault(key, set()).add(len(rows))
        row["inception"] = inception * 2 * INCEPTION_GMACS / 1e3
        rows.append(row)
    for (name, dataset, n, _seed, _split), users in shared_users.items():  # once per key, split between its users
        shared = SHARED_INPUTS[name]
        if shared.cost:
            c = shared.cost(config["datasets"][dataset], plan.shared_settings(config, name), n)
            for i in users:
                rows[i]["inception"] += c.inception_images * 2 * INCEPTION_GMACS / 1e3 / len(users)
    df = pd.DataFrame(rows).fillna(0.0)
    # PCA bases (paper 004 app. C): forwards of the source baseline, once per (source run, request)
    extra = {}
    for run in all_runs(config):
        pca = config["variants"][run.variant].get("pca_from")
        if pca:
            src = pca_source(run, pca)
            extra[src] = max(extra.get(src, 0.0), pca["num_images"] * len(pca["timesteps"]))
    for src, passes in extra.items():
        sel = (df.dataset == src.dataset) & (df.variant == src.variant) & (df.N == src.n) & (df.seed == src.seed)
        df.loc[sel, "pca_basis"] = passes * 2 * df.loc[sel, "gmacs"] / 1e3
    return df.fillna(0.0)


def throughput_from_benchmark(path: str) -> tuple[dict[str, float], float]:
    """Achieved TFLOP/s per preset from a benchmark ``training.parquet``, and the table's median."""
    table = pd.read_parquet(path)
    table = table[table["achieved_tflops"].map(lambda v: v == v and v > 0)]
    if table.empty:
        raise ValueError(f"{path}: no row with a positive achieved_tflops (was it the training table?)")
    per_preset = table.groupby("preset")["achieved_tflops"].median().to_dict()
    return per_preset, float(table["achieved_tflops"].median())


def gpu_hours(config: dict, *, tflops: float | None = None, benchmark: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Per-run GPU-hours (``runs``) and the per-study summary with a total row (``summary``), plus a note
    saying which throughput was used."""
    df = run_costs(config)
    kinds = [c for c in df.columns if c not in ("dataset", "variant", "N", "seed", "preset", "gmacs", "gpus")]
    if benchmark:
        per_preset, median = throughput_from_benchmark(benchmark)
        rate = df["preset"].map(lambda p: per_preset.get(p, median))
        note = (f"throughput from {benchmark}: achieved TFLOP/s per preset "
                f"({', '.join(f'{k} {v:.3g}' for k, v in sorted(per_preset.items()))}), else the median {median:.3g}")
    else:
        tflops = DEFAULT_TFLOPS if tflops is None else float(tflops)
        rate = pd.Series(tflops, index=df.index)
        note = (f"sustained {tflops:.4g} TFLOP/s per GPU"
                + (" (default: 40% of an A100's 312 bf16 TFLOP/s)" if tflops == DEFAULT_TFLOPS else ""))
    hours = df[["dataset", "variant", "N", "seed", "preset", "gmacs", "gpus"]].copy()
    for kind in kinds:
        hours[kind] = df[kind] / rate / 3600.0
    eval_kinds = [k for k in kinds if k != "train"]
    hours["evaluation"] = hours[eval_kinds].sum(axis=1) if eval_kinds else 0.0
    hours["total"] = hours["train"] + hours["evaluation"]
    # wall-clock: the training on its gpus_per_run GPUs of one node, then its evaluations on one GPU each
    hours["train_wall_h"] = hours["train"] / hours["gpus"]
    hours["wall_h"] = hours["train_wall_h"] + hours["evaluation"]

    def summarise(name: str, sub: pd.DataFrame) -> dict:
        return {"study": name, "runs": len(sub), "train_gpu_h": sub["train"].sum(),
                "eval_gpu_h": sub["evaluation"].sum(), "total_gpu_h": sub["total"].sum(),
                **{f"{k}_gpu_h": sub[k].sum() for k in eval_kinds}}

    key = hours.set_index(["dataset", "variant", "N", "seed"])
    rows = []
    for study in sorted(config["studies"]):
        idx = [(r.dataset, r.variant, r.n, r.seed) for r in study_runs(config, study)]
        rows.append(summarise(study, key.loc[idx].reset_index()))
    rows.append(summarise("total (distinct runs)", hours))
    return hours, pd.DataFrame(rows), note


def format_summary(summary: pd.DataFrame, note: str, config_name: str = "") -> str:
    cols = ["study", "runs", "train_gpu_h", "eval_gpu_h", "total_gpu_h"]
    detail = [c for c in summary.columns if c not in cols]
    table = summary[cols + detail].to_markdown(index=False, floatfmt=".4g")
    total = summary.iloc[-1]

    def h(x: float) -> str:
        return f"{x:,.0f}" if x >= 10 else f"{x:.3g}"

    head = (f"{config_name}: {int(total['runs'])} distinct runs, {h(total['train_gpu_h'])} GPU-h training + "
            f"{h(total['eval_gpu_h'])} GPU-h evaluation = {h(total['total_gpu_h'])} GPU-h at {note}")
    tail = ("Arithmetic only (FLOPs / throughput): start-up, data loading, checkpoints and queueing are not "
            "included. A run shared by several studies is counted in each study row and once in the total.")
    return f"{head}\n\n{table}\n\n{tail}"


def format_wall_clock(runs: pd.DataFrame) -> str:
    """Wall-clock hours per run at the configured GPU count: one row per variant and N (the longest of its data sets
    and seeds), training on ``gpus`` GPUs of one node, evaluations on one GPU each."""
    per = (runs.groupby(["variant", "N"], as_index=False, sort=False)
           .agg(gpus=("gpus", "max"), runs=("seed", "size"), train_gpu_h=("train", "max"),
                train_wall_h=("train_wall_h", "max"), eval_h=("evaluation", "max"), wall_h=("wall_h", "max")))
    table = per.to_markdown(index=False, floatfmt=".4g")
    return ("Wall-clock hours per run (the longest run of each variant and N; training on `gpus` GPUs of one node, "
            "ideal DDP scaling; evaluations on one GPU each):\n\n" + table)
