"""FreeU-style (b, s) scaling at inference on one trained U-ViT, no retraining (paper 000 sec. 3.2, figs. 5-7;
paper 001): FID over a (b, s) grid and the samples at chosen points.

An evaluation-time ablation: configured per study (``studies.<s>.freeu_grid``), so the same trained run gets one
grid per study that asks for it. Every (b, s) point samples with the same seeds (paired samples).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pandas as pd

from .. import analysis
from ..sections import NotMeasured, display, plt, save_figure, section, text_page, tile
from . import Cost, Measurement, Result, register_measurement

SETTINGS = {
    "b": {"type": "array", "items": {"type": "number"}, "minItems": 1, "description": "backbone factors"},
    "s": {"type": "array", "items": {"type": "number"}, "minItems": 1, "description": "skip low-frequency factors"},
    "tau": {"type": "integer", "minimum": 1, "default": 1},
    "num_samples": {"type": "integer", "minimum": 4, "default": 1000},
    "reference": {"enum": ["train", "test"], "default": "train",
                  "description": "FID reference: the run's training images or its test set (paper 000: the CIFAR-10 test set)"},
    "max_reference": {"type": "integer", "minimum": 4, "default": 50000},
    "sampling_steps": {"type": "integer", "minimum": 2, "default": 250, "description": "respaced DDPM sampling steps"},
    "sample_seed": {"type": "integer", "default": 0, "description": "the same sample seeds at every (b, s): paired samples"},
    "batch_size": {"type": "integer", "minimum": 1, "default": 64},
    "guidance_scale": {"type": "number", "minimum": 1, "default": 1.0},
    "keep": {"type": "integer", "minimum": 1, "default": 16, "description": "samples kept per (b, s) for the sample figure "
             "(unconditional runs)"},
    "classes_shown": {"type": "integer", "minimum": 1, "default": 5, "description": "class-conditional runs: the sample "
                      "figure shows the first classes_shown classes, samples_per_class each (paper 000 figs. 5-7: five "
                      "classes, 25 samples)"},
    "samples_per_class": {"type": "integer", "minimum": 1, "default": 5},
    "sample_points": {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                      "default": [], "description": "(b, s) points whose samples the report shows (paper 000 figs. 5-7: "
                      "[1.8, 0.85], [1.0, 0.85]; paper 001: [1.3, 1.0]); each must be on the grid; [] shows every point"},
}


def compute(run, grid: dict) -> Result:
    from ..models.uvit import freeu_scaling
    from ..runs import sampling_labels
    from .fid import image_features, score

    cfg = {"num_samples": grid["num_samples"], "sampling_steps": grid["sampling_steps"], "sample_seed": grid["sample_seed"],
           "batch_size": grid["batch_size"], "guidance_scale": grid["guidance_scale"]}
    reference = image_features(run.reference_images(grid["reference"], grid["max_reference"]), str(run.device),
                               run.threads)  # once per grid
    rows, kept = [], {}
    picks = shown_samples(run.num_classes, grid)
    if picks is not None:  # the labels the samples were drawn with (the same at every point): rows of the figure
        kept["labels"] = sampling_labels(run.num_classes, grid["num_samples"], grid["sample_seed"]).numpy()[picks]
    for b, s in itertools.product(grid["b"], grid["s"]):
        t0 = time.perf_counter()
        with freeu_scaling(run.model, b=b, s=s, tau=grid["tau"]):  # the same seeds for every (b, s): paired
            metrics, samples, _, _ = score(run, cfg, reference)
        rows.append({**run.run, "b": b, "s": s, "tau": grid["tau"], **metrics, "sampling_steps": grid["sampling_steps"],
                     "seconds": time.perf_counter() - t0})
        kept[f"b{b}_s{s}"] = samples[: grid["keep"]] if picks is None else samples[picks]
        print(f"[freeu {run.run['variant']}] b={b} s={s} FID {metrics['fid']:.2f}", flush=True)
    return Result(pd.DataFrame(rows), arrays=kept, meta={"freeu_grid": grid})


def shown_samples(num_classes: int, grid: dict) -> np.ndarray | None:
    """Indices of the samples the figure shows for a class-conditional run: the first ``samples_per_class`` drawn with
    each of the first ``classes_shown`` labels, in class order (None: unconditional, the first ``keep``)."""
    from ..runs import sampling_labels

    labels = sampling_labels(num_classes, grid["num_samples"], grid["sample_seed"])
    if labels is None:
        return None
    labels = labels.numpy()
    return np.concatenate([np.flatnonzero(labels == c)[: grid["samples_per_class"]]
                           for c in range(min(grid["classes_shown"], num_classes))]).astype(np.int64)


def check(grid: dict) -> tuple[str, str] | None:
    """The report shows the samples of `sample_points`: each must be evaluated."""
    for b, s in grid.get("sample_points", []):
        if b not in grid["b"] or s not in grid["s"]:
            return "sample_points", f"({b}, {s}) is not on the grid b={grid['b']}, s={grid['s']}"
    return None


def cost(spec: dict, grid: dict) -> Cost:
    points = len(grid["b"]) * len(grid["s"])
    guided = spec["training"].get("class_conditional") and grid["guidance_scale"] > 1
    return Cost(forwards=float(points * grid["num_samples"] * grid["sampling_steps"] * (2 if guided else 1)),
                inception_images=float(points * grid["num_samples"] + grid["max_reference"]))


def rehearse(grid: dict, r: dict) -> None:
    """Every (b, s) point is kept: the grid is what the study reports."""
    grid.update(num_samples=r["fid_samples"], max_reference=r["fid_reference"],
                sampling_steps=min(grid["sampling_steps"], r["respacing"]))


@section("FreeU-style (b, s) scaling: FID grid", "this project's extension: paper 000 reports no FID over (b, s); it "
         "draws samples at chosen points (sec. 3.2, figs. 5-7)", needs=("freeu",))
def section_freeu(ctx: dict) -> None:
    pyplot, freeu = plt(), ctx["freeu"]
    runs = list(freeu.groupby(analysis.RUN_KEYS))
    fig, axes = pyplot.subplots(1, len(runs), figsize=(4.0 * len(runs), 3.4), squeeze=False)
    for ax, ((d, v, n, seed), sub) in zip(axes[0], runs):
        grid = sub.pivot_table(index="b", columns="s", values="fid")
        im = ax.imshow(grid.to_numpy(), cmap="viridis_r")
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(grid.shape[1]), [f"{s:g}" for s in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{b:g}" for b in grid.index])
        ax.set_xlabel("s"), ax.set_ylabel("b")
        ax.set_title(f"{d}, {display(ctx, v)}, N={n}, seed {seed}", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.04, label="FID")
    fig.suptitle(f"FID over (b, s): {int(freeu['num_samples'].iloc[0])} samples, {int(freeu['sampling_steps'].iloc[0])} steps")
    save_figure(ctx, fig, "freeu_fid")


@section("FreeU-style (b, s) scaling: samples", {"000": "figs. 5-7 (samples of five classes at (b, s) = (1, 1), "
         "(1.8, 0.85), (1.0, 0.85))", "001": "Models 1-3: (b, s) = (1.0, 1.0), (1.3, 1.0), (1.0, 0.8)"}, needs=("freeu",))
def section_freeu_samples(ctx: dict) -> None:
    pyplot = plt()
    packed = ctx["arrays"].get("freeu")
    if not packed:
        raise NotMeasured("no FreeU sample arrays")
    # the (b, s) points the config lists (freeu_grid.sample_points, [[b, s], ...]); every grid point otherwise
    grid = ctx["study"].get("settings", {}).get("freeu") or {}
    wanted = [(float(b), float(s)) for b, s in (grid.get("sample_points") or [])]
    for run, arrays in sorted(packed.items()):
        points = {tuple(float(x[1:]) for x in k.split("_")): k for k in arrays if k.startswith("b")}  # "b1.8_s0.85"
        absent = [p for p in wanted if p not in points]
        if absent:
            text_page(ctx, None, [f"{run}: no samples at (b, s) = {absent} (not in the evaluated grid)"])
        keys = [points[p] for p in (wanted or sorted(points)) if p in points]
        if not keys:
            continue
        labels = arrays["labels"] if "labels" in arrays.keys() else None
        fig, axes = pyplot.subplots(1, len(keys), figsize=(2.2 * len(keys), 2.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            ax.imshow(tile(arrays[key][:16]) if labels is None else class_rows(arrays[key], labels), cmap="gray",
                      interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            b, s = key.split("_")
            ax.set_title(f"b={b[1:]}, s={s[1:]}", fontsize=7)
        d, v, n, seed = analysis.parse_run(run)
        rows = "" if labels is None else f"; rows: classes {sorted(set(np.asarray(labels).tolist()))}"
        fig.suptitle(f"{d}, {display(ctx, v)}, N={n}, seed {seed}: samples per (b, s), same noise seeds{rows}")
        save_figure(ctx, fig, f"freeu_samples_{d}_{v}_N{n}_seed{seed}")


def class_rows(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One row of samples per class (paper 000 figs. 5-7), (H', W'[, C])."""
    classes = sorted(set(np.asarray(labels).tolist()))
    per = max(int((np.asarray(labels) == c).sum()) for c in classes)
    c, h, w = images.shape[1:]
    grid = np.zeros((len(classes) * h, per * w, c), dtype=images.dtype)
    for row, cls in enumerate(classes):
        for col, im in enumerate(images[np.asarray(labels) == cls]):
            grid[row * h:(row + 1) * h, col * w:(col + 1) * w] = im.transpose(1, 2, 0)
    return grid.squeeze(-1) if c == 1 else grid


register_measurement(Measurement(
    name="freeu",
    description="FreeU-style (b, s) scaling at inference on one trained U-ViT: FID over the grid and samples",
    compute=compute,
    settings=SETTINGS,
    required=("b", "s"),
    study_key="freeu_grid",
    capability="supports_freeu",
    arrays=True,
    check=check,
    cost=cost,
    rehearse=rehearse,
    renamed={"steps": "sampling_steps"},  # "steps" means optimiser steps
    sections=(section_freeu, section_freeu_samples),
))
