"""What a study costs before it runs: training and evaluation GPU-hours from FLOP counts and a throughput.

For every run of a config (:func:`diffbias.config.all_runs`) the model's forward cost F (fvcore
multiply-accumulates per image x 2 = FLOPs, :func:`diffbias.metrics.flops.count_flops`, counted once per
distinct model and input shape) is multiplied by the number of image-passes each job makes:

- training: steps x batch x 3F (forward + backward = 3 forwards);
- PSNR gap: 2 splits x K images x respacing steps forwards;
- FID (runs at ``evaluation.fid.N``): num_samples x steps forwards, plus Inception-v3 (5.7 GMACs per image)
  on the samples and the reference set; FID curve: the same per EMA snapshot and for the final model;
- Jacobian (runs at ``evaluation.jacobian.N``), per image and t: "full" = D vector-Jacobian products
  (3F each), "lanczos" = at most ``max_products`` symmetric products (a forward-mode and a reverse
  pass: 6F each, an upper bound since Lanczos usually stops earlier);
- attention maps: 2 x num_images x len(t) forwards; PCA bases (``pca_from``): num_images x len(steps);
  FreeU grids: |b| x |s| x num_samples x steps forwards per U-ViT run.

GPU-hours = FLOPs / sustained FLOP/s / 3600. The sustained rate is ``--throughput-tflops`` (default 40%
of an A100's 312 bf16 TFLOP/s = 124.8, a good utilisation for mid-sized transformers; small models at
32x32 often reach less) or the achieved TFLOP/s of the benchmark's training table (``scripts/benchmark.py``
run on the node type: its ``achieved_tflops`` per preset, else the table's median). It is an estimate of
arithmetic time: data loading, start-up, queueing and checkpointing are not in it.
"""

from __future__ import annotations

import functools
import json

import pandas as pd

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


def _passes(config: dict, run, spec: dict) -> dict[str, float]:
    """Forward-pass equivalents (in units of one image forward) per job kind for one run."""
    ev = config["evaluation"]
    tr = spec["training"]
    ds = spec["dataset"]
    D = ds["channels"] * ds["resolution"] ** 2
    out = {"train": 3.0 * tr["steps"] * tr["batch_size"]}
    psnr = ev["psnr"]
    out["psnr"] = 2.0 * psnr["num_images"] * psnr["respacing"]
    fid = ev["fid"]
    sampling = fid["num_samples"] * fid["steps"]
    if run.n in fid["N"]:
        out["fid"] = float(sampling)
    if run.n in ev["fid_curve"]["N"]:
        out["fid_curve"] = float(sampling * (len(tr.get("snapshot_steps", [])) + 1))
    jac = ev["jacobian"]
    if run.n in jac["N"]:
        method = jac.get("method", "auto")
        if method == "auto":
            method = "full" if D <= 1024 else "lanczos"
        per = 3.0 * D if method == "full" else 6.0 * jac.get("max_products", 512)
        out["jacobian"] = per * jac["num_images"] * len(jac["t"])
    att = ev["attention"]
    if att["N"] is None or run.n in att["N"]:
        out["attention"] = 2.0 * att["num_images"] * len(att["t"])
    return out


def _inception_gmacs(config: dict, run, spec: dict) -> float:
    fid, ev = config["evaluation"]["fid"], config["evaluation"]
    reference = min(run.n, fid["max_reference"]) if fid["reference"] == "train" else spec["dataset"]["test_size"]
    images = 0.0
    if run.n in fid["N"]:
        images += fid["num_samples"] + reference
    if run.n in ev["fid_curve"]["N"]:
        images += fid["num_samples"] * (len(spec["training"].get("snapshot_steps", [])) + 1) + reference
    return images * INCEPTION_GMACS


def run_costs(config: dict) -> pd.DataFrame:
    """One row per distinct run: forward GMACs, and TFLOPs per job kind (train, psnr, fid, ...)."""
    from .config import pca_source

    rows = []
    for run in all_runs(config):
        spec = run_spec(config, run)
        m, ds = spec["model"], spec["dataset"]
        num_classes = NUM_CLASSES_FOR_COUNTING if spec["training"].get("class_conditional") else 0
        gmacs = forward_gmacs(m["backbone"], json.dumps(m["options"], sort_keys=True, default=str),
                              int(ds["channels"]), int(ds["resolution"]), num_classes)
        row = {"dataset": run.dataset, "variant": run.variant, "N": run.n, "seed": run.seed,
               "preset": m.get("preset"), "gmacs": gmacs}
        for kind, passes in _passes(config, run, spec).items():
            row[kind] = passes * 2 * gmacs / 1e3  # TFLOPs
        inception = _inception_gmacs(config, run, spec)
        if inception:
            row["fid_inception"] = 2 * inception / 1e3
        rows.append(row)
    df = pd.DataFrame(rows).fillna(0.0)
    # PCA bases (seed 004 app. C): forwards of the source baseline, once per (source run, request)
    extra = {}
    for run in all_runs(config):
        pca = config["variants"][run.variant].get("pca_from")
        if pca:
            src = pca_source(run, pca)
            extra[src] = max(extra.get(src, 0.0), pca["num_images"] * len(pca["steps"]))
    for src, passes in extra.items():
        sel = (df.dataset == src.dataset) & (df.variant == src.variant) & (df.N == src.n) & (df.seed == src.seed)
        df.loc[sel, "pca_basis"] = passes * 2 * df.loc[sel, "gmacs"] / 1e3
    # FreeU grids: per study, every U-ViT run of it
    for study, s in config["studies"].items():
        grid = s.get("freeu_grid")
        if not grid:
            continue
        for run in study_runs(config, study):
            if run_spec(config, run)["model"]["backbone"] != "uvit":
                continue
            sel = (df.dataset == run.dataset) & (df.variant == run.variant) & (df.N == run.n) & (df.seed == run.seed)
            passes = len(grid["b"]) * len(grid["s"]) * grid["num_samples"] * grid["steps"]
            df.loc[sel, "freeu"] = df.loc[sel].get("freeu", 0.0) + passes * 2 * df.loc[sel, "gmacs"] / 1e3
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
    kinds = [c for c in ("train", "psnr", "fid", "fid_inception", "fid_curve", "jacobian", "attention", "pca_basis",
                         "freeu") if c in df.columns]
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
    hours = df[["dataset", "variant", "N", "seed", "preset", "gmacs"]].copy()
    for kind in kinds:
        hours[kind] = df[kind] / rate / 3600.0
    eval_kinds = [k for k in kinds if k != "train"]
    hours["evaluation"] = hours[eval_kinds].sum(axis=1) if eval_kinds else 0.0
    hours["total"] = hours["train"] + hours["evaluation"]

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
