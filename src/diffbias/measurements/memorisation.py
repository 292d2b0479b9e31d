"""Memorisation as the field reads it, beside the PSNR gap: copies, nearest neighbours, galleries and distances to the
training set against reference distributions. Beyond the papers this harness reproduces (docs/memorisation.md).

- **Copies** (Gu et al. 2023, ``sail-sg/DiffMemorize`` ``mem_ratio.py``; Bonnaire et al.): a generated sample is a copy
  when the L2 distance to its nearest training image, divided by the distance to the second nearest, is below 1/3.
  Pixel space, images in [-1, 1]; distances are RMS, ``||a - b|| / sqrt(C H W)`` (the ratio does not depend on it).
  The memorised fraction comes with a percentile bootstrap 95 % CI over the samples (Bonnaire et al.'s method) and a
  Wilson score interval, which the comparison rule uses: the bootstrap interval collapses to [0, 0] at 0 copies.
  Per (variant, N, seed) for the final EMA model and, with ``snapshots``, for every EMA snapshot.
- **Nearest neighbours**: each sample's nearest training images (pixel L2) and, where ``inception_max_N`` allows,
  its highest cosine similarity to a training image in Inception-v3 pool features (the offline FID weights).
- **Reference distributions** (Somepalli et al.): the same distances for held-out test images (test-to-train) and
  for training images to their nearest *other* training image (train-to-train), so that "close to the training
  set" has a baseline.
- **Gallery**: the first samples (uncurated) beside their nearest training images, with distances.

The search (:mod:`diffbias.metrics.nearest_neighbours`) streams the training set in chunks on the run's device: it
scales to N = 10^5 - 10^6. Inception on a CPU runs a few images per second: ``inception_max_N`` and
``inception_samples`` bound it, and the report says where it was not computed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import analysis
from ..sections import (NotMeasured, datasets, display, first_runs, frame_table, layout_table, plt, save_figure,
                        section, variants, write_table)
from . import Cost, Measurement, Quantity, Result, SharedInput, register_measurement, register_shared_input

SETTINGS = {
    "num_samples": {"type": "integer", "minimum": 2, "default": 1000,
                    "description": "samples per model (Gu et al. and Bonnaire et al.: 10k)"},
    "sampling_steps": {"type": "integer", "minimum": 2, "default": 250, "description": "respaced DDPM sampling steps"},
    "sample_seed": {"type": "integer", "default": 0},
    "batch_size": {"type": "integer", "minimum": 1, "default": 256},
    "threshold": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1 / 3,
                  "description": "a sample is a copy when d1/d2 is below this (Gu et al. 2023: 1/3)"},
    "neighbours": {"type": "integer", "minimum": 2, "default": 3, "description": "training images beside each "
                   "gallery sample"},
    "gallery": {"type": "integer", "minimum": 0, "default": 8, "description": "samples in the gallery (the first ones: "
                "uncurated)"},
    "reference_images": {"type": "integer", "minimum": 0, "default": 1000,
                         "description": "test images (test-to-train) and training images (train-to-train) of the "
                                        "reference distributions"},
    "snapshots": {"type": "boolean", "default": True, "description": "also the memorised fraction of every EMA "
                  "snapshot (training.snapshot_steps)"},
    "bootstrap": {"type": "integer", "minimum": 0, "default": 1000, "description": "bootstrap resamples of the samples"},
    "confidence": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.95},
    "bootstrap_seed": {"type": "integer", "default": 0},
    "inception_max_N": {"type": ["integer", "null"], "minimum": 0, "default": None,
                        "description": "Inception-space nearest neighbours for runs with N at most this (null: every "
                                       "run; 0: none): features of all N training images (a shared input per dataset, "
                                       "N, seed and split); Inception on a CPU runs a few images/s"},
    "inception_samples": {"type": ["integer", "null"], "minimum": 2, "default": None,
                          "description": "samples (and test images) searched in Inception space (null: all)"},
    "search_chunk": {"type": "integer", "minimum": 256, "default": 16384,
                     "description": "training images per chunk of the nearest-neighbour search"},
}


def inception_applies(cfg: dict, n: int) -> bool:
    limit = cfg["inception_max_N"]
    return limit is None or 0 < n <= limit


# ----------------------------------------------------------------------------------------------------
# The shared input: Inception features of a run's training set
# ----------------------------------------------------------------------------------------------------


def test_count(cfg: dict, num_test: int) -> int:
    wanted = cfg["reference_images"] if cfg["inception_samples"] is None else min(cfg["reference_images"],
                                                                                cfg["inception_samples"])
    return min(wanted, num_test)


def build_train_inception(images, labels, split, key: dict, cfg: dict, device: str, threads) -> dict:
    """Inception pool features of all N training images of the runs with this (dataset, N, seed, split), and of the
    first test images of the reference distribution."""
    from ..metrics.fid import inception_features

    train, test = split
    m = test_count(cfg, len(test))
    feats = inception_features(np.concatenate([images[train], images[test[:m]]]), device=device, cpu_threads=threads)
    print(f"[train-inception {key}] {len(train)} training + {m} test images")
    return {"train": feats[: len(train)].numpy(), "test": feats[len(train):].numpy(), "N": key["N"],
            "seed": key["seed"], "split": key.get("split", "A")}


def train_inception_cost(dataset: dict, cfg: dict, n: int) -> Cost:
    return Cost(inception_images=float(n + min(cfg["reference_images"], dataset["test_size"])))


def inception_neighbours(run, samples: np.ndarray, cfg: dict) -> dict:
    """Highest cosine similarity of samples and of test images to a training image, in Inception pool features."""
    import torch

    from ..metrics.fid import inception_features
    from ..metrics.nearest_neighbours import nearest, unit

    train_idx, test_idx = run.split
    k = len(samples) if cfg["inception_samples"] is None else min(cfg["inception_samples"], len(samples))
    m = test_count(cfg, len(test_idx))
    path = run.inputs.get("shared:train_inception")
    if path:
        with np.load(path) as f:
            found = {"N": int(f["N"]), "seed": int(f["seed"]), "split": str(f["split"])}
            expected = {"N": run.run["N"], "seed": run.run["seed"], "split": run.spec.get("split", "A")}
            if found != expected or len(f["test"]) < m:
                raise SystemExit(f"{path} holds the features of {found} ({len(f['test'])} test images); this run "
                                 f"needs {expected} and {m} test images")
            train_f, test_f = torch.from_numpy(f["train"]), torch.from_numpy(f["test"][:m])
        sample_f = inception_features(samples[:k], device=str(run.device), cpu_threads=run.threads)
    else:  # one Inception load for everything (loading the weights costs seconds on a CPU)
        stacked = np.concatenate([samples[:k], run.images[test_idx[:m]], run.images[train_idx]])
        feats = inception_features(stacked, device=str(run.device), cpu_threads=run.threads)
        sample_f, test_f, train_f = feats[:k], feats[k:k + m], feats[k + m:]
    device = run.device
    sim_s, _ = nearest(sample_f, train_f, 1, metric="cosine", embed=unit, device=device)
    sim_t, _ = nearest(test_f, train_f, 1, metric="cosine", embed=unit, device=device) if m else (np.zeros((0, 1)), None)
    return {"samples_cos": sim_s[:, 0], "test_cos": sim_t[:, 0]}


# ----------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------


def copies(run, samples: np.ndarray, cfg: dict) -> dict:
    """Nearest training images of the samples and the copy statistics: distances, ratios, the fraction below the
    threshold with its bootstrap and Wilson intervals."""
    from ..metrics.nearest_neighbours import Rows, bootstrap_interval, copy_ratio, nearest, wilson_interval

    train = Rows(run.images, run.split[0])
    k = min(max(2, cfg["neighbours"]), len(train))
    t0 = time.perf_counter()
    dist, idx = nearest(samples, train, k, device=run.device, reference_chunk=cfg["search_chunk"])
    search_s = time.perf_counter() - t0
    out = {"distances": dist, "indices": idx, "search_s": search_s, "d1": dist[:, 0]}
    if k < 2:  # N = 1: no second neighbour, the copy rule does not apply
        out.update(ratio=np.full(len(samples), np.nan), copies=0, fraction=np.nan, ci=(np.nan, np.nan),
                   wilson=(np.nan, np.nan))
        return out
    ratio = copy_ratio(dist)
    is_copy = (ratio < cfg["threshold"]).astype(np.float64)
    out.update(ratio=ratio, copies=int(is_copy.sum()), fraction=float(is_copy.mean()),
               ci=bootstrap_interval(is_copy, resamples=cfg["bootstrap"], confidence=cfg["confidence"],
                                     seed=cfg["bootstrap_seed"]),
               wilson=wilson_interval(int(is_copy.sum()), len(is_copy), cfg["confidence"]))
    return out


def row(step: int, final: bool, found: dict, cfg: dict, sampling_s: float) -> dict:
    return {"step": step, "final": final, "num_samples": len(found["d1"]), "copies": found["copies"],
            "fraction": found["fraction"], "ci_low": found["ci"][0], "ci_high": found["ci"][1],
            "wilson_low": found["wilson"][0], "wilson_high": found["wilson"][1], "threshold": cfg["threshold"],
            "d1_median": float(np.median(found["d1"])), "d1_mean": float(np.mean(found["d1"])),
            "ratio_median": float(np.nanmedian(found["ratio"])) if np.isfinite(found["ratio"]).any() else np.nan,
            "sampling_steps": cfg["sampling_steps"], "sampling_s": sampling_s, "search_s": found["search_s"]}


def compute(run, cfg: dict) -> Result:
    from ..metrics.nearest_neighbours import Rows, copy_ratio, nearest

    train_idx, test_idx = run.split
    n = len(train_idx)

    def sample(model=None):
        t0 = time.perf_counter()
        images = run.sample(cfg["num_samples"], sampling_steps=cfg["sampling_steps"], seed=cfg["sample_seed"],
                            batch_size=cfg["batch_size"], model=model)  # the same seeds for every model and snapshot
        return images, time.perf_counter() - t0

    rows = []
    snapshots = sorted(Path(run.inputs["snapshots"]).glob("ema_*.pt")) if cfg["snapshots"] and run.inputs.get(
        "snapshots") else []
    for path in snapshots:
        model, checkpoint = run.load_model(path)
        samples, sampling_s = sample(model)
        rows.append(row(int(checkpoint["step"]), False, copies(run, samples, cfg), cfg, sampling_s))
        print(f"[memorisation {run.run}] step {rows[-1]['step']}: {rows[-1]['copies']}/{len(samples)} copies", flush=True)
    samples, sampling_s = sample()
    found = copies(run, samples, cfg)
    rows.append(row(run.step, True, found, cfg, sampling_s))

    # reference distributions: held-out images to the training set, training images to their nearest other one
    m_test = min(cfg["reference_images"], len(test_idx))
    test = run.images[test_idx[:m_test]]
    arrays = {"samples_d1": found["d1"], "samples_ratio": found["ratio"]}
    if m_test and n >= 2:
        d_test, _ = nearest(test, Rows(run.images, train_idx), 2, device=run.device, reference_chunk=cfg["search_chunk"])
        arrays.update(test_d1=d_test[:, 0], test_ratio=copy_ratio(d_test))
    m_train = min(cfg["reference_images"], n)
    if m_train and n >= 3:
        d_train, _ = nearest(Rows(run.images, train_idx[:m_train]), Rows(run.images, train_idx), 2,
                             device=run.device, reference_chunk=cfg["search_chunk"], exclude_self=True)
        arrays.update(train_d1=d_train[:, 0], train_ratio=copy_ratio(d_train))
    inception = inception_applies(cfg, n)
    if inception:
        arrays.update(inception_neighbours(run, samples, cfg))

    g = min(cfg["gallery"], len(samples))
    k = found["indices"].shape[1]
    arrays.update(gallery_samples=samples[:g], gallery_distances=found["distances"][:g],
                  gallery_indices=train_idx[found["indices"][:g]],
                  gallery_neighbours=run.images[train_idx[found["indices"][:g].reshape(-1)]].reshape(
                      g, k, *samples.shape[1:]))

    def stat(name, fn):
        return float(fn(arrays[name])) if name in arrays and len(arrays[name]) else np.nan

    reference = {
        "test_images": len(arrays.get("test_d1", [])), "test_d1_median": stat("test_d1", np.median),
        "test_copy_fraction": stat("test_ratio", lambda r: np.mean(r < cfg["threshold"])),
        "train_images": len(arrays.get("train_d1", [])), "train_d1_median": stat("train_d1", np.median),
        "inception": inception, "inception_samples": len(arrays.get("samples_cos", [])),
        "samples_cos_median": stat("samples_cos", np.median), "samples_cos_mean": stat("samples_cos", np.mean),
        "test_cos_median": stat("test_cos", np.median),
    }
    table = pd.DataFrame([{**r, **reference} for r in rows])
    final = rows[-1]
    print(f"[memorisation {run.run}] {final['copies']}/{final['num_samples']} copies (fraction {final['fraction']:.3f}, "
          f"95% CI [{final['ci_low']:.3f}, {final['ci_high']:.3f}]); median d1 samples {final['d1_median']:.3f}, "
          f"test {reference['test_d1_median']:.3f}, train-to-train {reference['train_d1_median']:.3f}; "
          f"search over N={n} {found['search_s']:.2f}s", flush=True)
    return Result(table, arrays=arrays, meta={"memorisation": {"N_searched": n}})


def cost(spec: dict, cfg: dict) -> Cost:
    models = 1 + (len(spec["training"].get("snapshot_steps", [])) if cfg["snapshots"] else 0)
    n = spec["run"]["N"]
    inception = 0.0
    if inception_applies(cfg, n):
        inception = cfg["num_samples"] if cfg["inception_samples"] is None else min(cfg["num_samples"],
                                                                                   cfg["inception_samples"])
    return Cost(forwards=float(models * cfg["num_samples"] * cfg["sampling_steps"]), inception_images=float(inception))


def runtime_units(spec: dict, cfg: dict) -> float:
    return 1.0 + (len(spec["training"].get("snapshot_steps", [])) if cfg["snapshots"] else 0)


def rehearse(cfg: dict, r: dict) -> None:
    # the smallest N only: paper-004 measures every run (120 in its rehearsal), and a rehearsal job is mostly process
    # start; one N exercises every code path, the closing page of the other studies' reports says it is off
    cfg["N"] = [min(r["N_values"])] if cfg["N"] is None else sorted(cfg["N"])[:1]
    cfg.update(num_samples=min(cfg["num_samples"], max(r["fid_samples"], 4)),
               sampling_steps=min(cfg["sampling_steps"], r["respacing"]), batch_size=min(cfg["batch_size"], 64),
               gallery=min(cfg["gallery"], 2), reference_images=min(cfg["reference_images"], r["fid_reference"]),
               bootstrap=min(cfg["bootstrap"], 100))
    if cfg["inception_max_N"] != 0:  # Inception only on the smallest rehearsal N: its weights load for seconds
        cfg["inception_max_N"] = min(r["N_values"])
        cfg["inception_samples"] = min(cfg["inception_samples"] or 4, 4)


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

REPRODUCES = ("beyond the papers: Gu et al. 2023's copy rule (d1/d2 < 1/3; Bonnaire et al.'s bootstrap CI), "
              "nearest neighbours as Somepalli et al. and Carlini et al. show them")


def final_rows(memo: pd.DataFrame) -> pd.DataFrame:
    return memo[memo["final"].astype(bool)] if "final" in memo else memo


def fraction_per_run(memo: pd.DataFrame) -> pd.DataFrame:
    """The memorised_fraction quantity: the final model's fraction of copies, with the Wilson 95 % interval over
    its samples."""
    final = final_rows(memo)
    return final[analysis.RUN_KEYS].assign(value=final["fraction"].to_numpy(), low=final["wilson_low"].to_numpy(),
                                           high=final["wilson_high"].to_numpy())


def settings_note(memo: pd.DataFrame) -> str:
    final = final_rows(memo)
    samples = int(final["num_samples"].min())
    threshold = float(final["threshold"].iloc[0])
    return (f"A sample is a copy when d1/d2 < {threshold:.3g} (d1, d2: L2 distances to its nearest and second-nearest "
            f"training image in pixel space, images in [-1, 1], RMS-normalised by sqrt(C·H·W); Gu et al. 2023). "
            f"{samples} samples per model ({int(final['sampling_steps'].iloc[0])} sampling steps), all N training "
            f"images searched. Intervals: Wilson 95 % over the samples (used by the comparison rule); the bootstrap "
            f"percentile CI (Bonnaire et al.) is in the details table; it collapses to [0, 0] at 0 copies.")


def findings(ctx: dict) -> list[str]:
    memo = ctx.get("memorisation")
    if memo is None or memo.empty:
        return []
    cells = analysis.summarise(fraction_per_run(memo))
    lines = ["Memorised fraction (samples with d1/d2 < 1/3 to the training set, final EMA model, "
             "[95 % interval]):"]
    for d in datasets(ctx, memo):
        for v in variants(ctx, memo):
            sub = cells[(cells["dataset"] == d) & (cells["variant"] == v)].sort_values("N")
            if len(sub):
                lines.append(f"  {d}, {display(ctx, v)}: " + "; ".join(
                    f"N={int(c.N)}: {analysis.interval_text(c._asdict(), 2)}" for c in sub.itertuples()))
    return lines


@section("Copies: memorised fraction", REPRODUCES, needs=("memorisation",))
def section_fraction(ctx: dict) -> None:
    memo, study = ctx["memorisation"], ctx["study"]
    long = analysis.compare(fraction_per_run(memo).rename(columns={"value": "fraction"}), study, "fraction")
    layout = analysis.layout_comparison(long, study, digits=3, datasets=datasets(ctx, memo))
    write_table(ctx, "memorised_fraction", layout)
    ctx["pdf"].table("Memorised fraction (lower: fewer copies)", layout_table(layout),
                     caption=settings_note(memo) + f" Changes against the baseline marked {analysis.RESOLVED_MARK} "
                                                   "when the comparison rule resolves them.",
                     notes=["Comparison rule: " + analysis.COMPARISON_RULE, analysis.basis_note(long)])
    final = final_rows(memo).copy()
    order = {v: i for i, v in enumerate(variants(ctx, final))}
    final = final.sort_values(["dataset", "N", "variant", "seed"], key=lambda s: s.map(order) if s.name == "variant" else s)
    details = pd.DataFrame({
        "dataset": final["dataset"], "model": final["variant"].map(lambda v: display(ctx, v)), "N": final["N"],
        "seed": final["seed"], "copies": [f"{int(c)}/{int(s)}" for c, s in zip(final["copies"], final["num_samples"])],
        "bootstrap CI": [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(final["ci_low"], final["ci_high"])],
        "Wilson CI": [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(final["wilson_low"], final["wilson_high"])],
        "d1 samples": final["d1_median"], "d1 test": final["test_d1_median"], "d1 train": final["train_d1_median"],
        "test copies": final["test_copy_fraction"],
        "cos samples": final["samples_cos_median"], "cos test": final["test_cos_median"]})
    write_table(ctx, "memorisation_details", details, ".3f")
    no_inception = final[~final["inception"].astype(bool)]
    ctx["pdf"].table("Copies and nearest-neighbour distances, per run", frame_table(details, formats={
        c: ".3f" for c in ("d1 samples", "d1 test", "d1 train", "test copies", "cos samples", "cos test")}),
        notes=["d1: median RMS pixel distance to the nearest training image of the samples, of held-out test images "
               "(test-to-train) and of training images to their nearest other training image (train-to-train): "
               "samples closer than test images are closer to the training set than new data from the same "
               "distribution. test copies: held-out images that pass the copy rule (near-duplicates in the data).",
               "cos: median of each sample's (test image's) highest cosine similarity to a training image in "
               "Inception-v3 pool features (offline FID weights). "
               + (f"Not computed (—) for {len(no_inception)} run(s): evaluation.memorisation.inception_max_N = "
                  f"{ctx['study']['settings'].get('memorisation', {}).get('inception_max_N')} (Inception on a CPU "
                  "runs a few images/s)." if len(no_inception) else "")])


@section("Memorisation over training", "beyond the papers: the memorised fraction of every EMA snapshot (Bonnaire et "
         "al. report it per checkpoint)", needs=("memorisation",))
def section_over_training(ctx: dict) -> None:
    memo = ctx["memorisation"]
    if memo.groupby(analysis.RUN_KEYS)["step"].nunique().max() < 2:
        raise NotMeasured("no EMA snapshots (training.snapshot_steps, evaluation.memorisation.snapshots)")
    pyplot = plt()
    panels = list(memo[["dataset", "N"]].drop_duplicates().sort_values(["dataset", "N"]).itertuples(index=False))
    fig, axes = pyplot.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1.5, 2.8), squeeze=False)
    for ax, (d, n) in zip(axes[0], panels):
        sub = memo[(memo["dataset"] == d) & (memo["N"] == n)]
        for v in variants(ctx, sub):
            line = sub[sub["variant"] == v].groupby("step").agg(f=("fraction", "mean"), lo=("wilson_low", "mean"),
                                                                 hi=("wilson_high", "mean"))
            ax.errorbar(line.index, line["f"], yerr=[line["f"] - line["lo"], line["hi"] - line["f"]], marker="o", ms=3,
                        capsize=2, label=display(ctx, v))
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{d}, N={n}")
        ax.set_xlabel("training step")
        ax.set_ylabel("memorised fraction")
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Memorised fraction of the EMA snapshots (same sample seeds at every step; Wilson 95 % intervals)")
    save_figure(ctx, fig, "memorisation_over_training")


@section("Nearest-neighbour gallery", "beyond the papers: samples beside their nearest training images (Somepalli et "
         "al., Carlini et al., Kadkhodaie et al.)", needs=("memorisation",))
def section_gallery(ctx: dict) -> None:
    packed = ctx["arrays"].get("memorisation") or {}
    memo = final_rows(ctx["memorisation"])
    runs = first_runs(memo)
    shown = 0
    for (d, n), cell in runs.groupby(["dataset", "N"]):
        rows = [r for r in cell.itertuples() if analysis.run_key(d, r.variant, n, r.seed) in packed]
        rows.sort(key=lambda r: variants(ctx, memo).index(r.variant) if r.variant in variants(ctx, memo) else 0)
        if not rows:
            continue
        draw_gallery(ctx, d, n, [(r.variant, packed[analysis.run_key(d, r.variant, n, r.seed)]) for r in rows])
        shown += 1
    if not shown:
        raise NotMeasured("no gallery arrays (evaluation.memorisation.gallery = 0?)")


def draw_gallery(ctx: dict, dataset: str, n: int, runs: list) -> None:
    pyplot = plt()
    per_row = max(1, min(4, min(len(a["gallery_samples"]) for _, a in runs)))
    k = int(runs[0][1]["gallery_distances"].shape[1])
    cols = per_row * (k + 1)
    fig, axes = pyplot.subplots(len(runs), cols, figsize=(0.75 * cols + 1.2, 0.95 * len(runs) + 0.6), squeeze=False)
    for i, (variant, arrays) in enumerate(runs):
        samples, neighbours = arrays["gallery_samples"], arrays["gallery_neighbours"]
        dist = arrays["gallery_distances"]
        for j in range(per_row):
            ratio = dist[j, 0] / dist[j, 1] if dist.shape[1] > 1 and dist[j, 1] > 0 else float("nan")
            images = [samples[j]] + [neighbours[j, m] for m in range(k)]
            titles = [f"d1/d2 {ratio:.2f}"] + [f"{dist[j, m]:.3f}" for m in range(k)]
            for m, (image, title) in enumerate(zip(images, titles)):
                ax = axes[i][j * (k + 1) + m]
                ax.imshow(image.transpose(1, 2, 0).squeeze(-1) if image.shape[0] == 1 else image.transpose(1, 2, 0),
                          cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(title, fontsize=5, color="crimson" if m == 0 and ratio < 1 / 3 else "black")
                for spine in ax.spines.values():
                    spine.set_color("crimson" if m == 0 else "0.7")
        axes[i][0].set_ylabel(display(ctx, variant), fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(f"{dataset}, N={n}: each sample (red frame; title d1/d2, red when a copy) beside its {k} nearest "
                 f"training images (titles: RMS pixel distance). First samples, uncurated.", fontsize=7)
    save_figure(ctx, fig, f"memorisation_gallery_{dataset}_N{n}")


@section("Distances to the training set", "beyond the papers: generated-to-train against test-to-train and "
         "train-to-train distances (Somepalli et al.)", needs=("memorisation",))
def section_histograms(ctx: dict) -> None:
    packed = ctx["arrays"].get("memorisation") or {}
    memo = final_rows(ctx["memorisation"])
    runs = first_runs(memo)
    panels = list(runs[["dataset", "N"]].drop_duplicates().sort_values(["dataset", "N"]).itertuples(index=False))
    if not panels or not packed:
        raise NotMeasured("no distance arrays")
    pyplot = plt()
    fig, axes = pyplot.subplots(2, len(panels), figsize=(3.3 * len(panels) + 1.5, 5.0), squeeze=False)

    def hist(ax, values, bins, **style):  # fractions per bin: a spike of exact copies stays readable beside the rest
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if len(values):
            ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, weights=np.full(len(values), 1 / len(values)),
                    histtype="step", **style)

    for j, (d, n) in enumerate(panels):
        cell = runs[(runs["dataset"] == d) & (runs["N"] == n)]
        found = [(v, packed.get(analysis.run_key(d, v, n, int(cell[cell["variant"] == v]["seed"].iloc[0]))))
                 for v in variants(ctx, cell)]
        found = [(v, a) for v, a in found if a is not None]
        top = max([float(np.nanmax(a[k])) for _, a in found for k in ("samples_d1", "test_d1", "train_d1")
                   if k in a and len(a[k]) and np.isfinite(a[k]).any()] + [1e-3])
        d_bins, r_bins = np.linspace(0, 1.05 * top, 31), np.linspace(0, 1, 31)
        for v, arrays in found:
            hist(axes[0][j], arrays["samples_d1"], d_bins, label=display(ctx, v))
            hist(axes[1][j], arrays["samples_ratio"], r_bins, label=display(ctx, v))
        if found:  # reference distributions of the first variant's training set
            arrays = found[0][1]
            for key, row_, bins, name, colour, style in (
                    ("test_d1", 0, d_bins, "test-to-train", "k", "--"),
                    ("train_d1", 0, d_bins, "train-to-train (nearest other)", "0.5", ":"),
                    ("test_ratio", 1, r_bins, "test-to-train", "k", "--")):
                if key in arrays:
                    hist(axes[row_][j], arrays[key], bins, color=colour, linestyle=style,
                         label=f"{name} ({display(ctx, found[0][0])})")
        threshold = float(memo["threshold"].iloc[0])
        axes[1][j].axvline(threshold, color="crimson", lw=0.8)
        axes[0][j].set_title(f"{d}, N={n}", fontsize=8)
        axes[0][j].set_xlabel("d1: RMS distance to the nearest training image")
        axes[1][j].set_xlabel(f"d1/d2 (copy below {threshold:.2g}, red line)")
        axes[0][j].set_ylabel("fraction of images")
        axes[1][j].set_ylabel("fraction of images")
    axes[0][-1].legend(fontsize=5, loc="upper left", bbox_to_anchor=(1.02, 1))
    axes[1][-1].legend(fontsize=5, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Distances to the training set: generated samples per variant against held-out test images "
                 "(test-to-train) and training images (train-to-train, nearest other image)")
    save_figure(ctx, fig, "memorisation_distances")


register_shared_input(SharedInput(name="train_inception", config_key="memorisation", build=build_train_inception,
                                  cost=train_inception_cost, applies=inception_applies))

register_measurement(Measurement(
    name="memorisation",
    description="copies among the samples (d1/d2 < 1/3, Gu et al. 2023) with bootstrap and Wilson 95 % intervals, per "
                "EMA snapshot; nearest-neighbour distances in pixel and Inception space, against test-to-train and "
                "train-to-train references; a nearest-neighbour gallery",
    compute=compute,
    settings=SETTINGS,
    N=[],  # opt-in: sampling and searching every run is a config's choice (config.yaml, paper-004.yaml)
    pixel_only=True,  # searches the pool's pixels; a latent pool holds latents (docs/memorisation.md "Not done")
    arrays=True,
    needs=("snapshots", "shared:train_inception"),
    cost=cost,
    runtime_units=runtime_units,
    rehearse=rehearse,
    sections=(section_fraction, section_over_training, section_gallery, section_histograms),
    findings=findings,
    quantities=(Quantity("memorised_fraction", "fraction of samples with d1/d2 < 1/3 (copies)", fraction_per_run,
                         lower_is_better=True, interval="Wilson 95 % interval over the samples"),),
))
