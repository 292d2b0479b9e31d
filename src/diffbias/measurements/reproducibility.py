"""Two models trained on disjoint data, sampled from the same noise (Kadkhodaie et al. 2024, the experiment paper 004
starts from; Zhang et al.'s reproducibility). Beyond the papers this harness reproduces (docs/memorisation.md).

A run and its split-B twin (a variant that differs only by ``split: B``: N other images of the same shuffled pool,
the same test set; plan.twin_run) are sampled with the same seeds, so the same initial and per-step noise and, for a
class-conditional model, the same labels. In the memorisation regime each model reproduces its own training images
and the paired samples differ; in the generalisation regime both converge to the same sample. Per pair of samples:
Kadkhodaie et al.'s correlation (``im_set_corr``: each image's mean removed, then cosine similarity, pixel space).
Reported per N: the mean correlation (bootstrap 95 % CI over the pairs) and the fraction of pairs above a threshold
(Wilson 95 % interval), and, as the memorisation reading beside it, each sample's highest correlation with a
training image of its own model's set.

Run-scoped, on the split-A run of each pair (once per pair, whichever studies list both): the number depends on the
two runs and the settings only, and `evaluation.reproducibility.N` switches it per N like every measurement. Any study
that lists a variant and its twin gets the curve.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .. import analysis
from ..sections import NotMeasured, datasets, display, first_runs, frame_table, plt, save_figure, section, write_table
from . import Cost, Measurement, Quantity, Result, register_measurement

SETTINGS = {
    "num_samples": {"type": "integer", "minimum": 2, "default": 1000, "description": "sample pairs"},
    "sampling_steps": {"type": "integer", "minimum": 2, "default": 250, "description": "respaced DDPM sampling steps"},
    "sample_seed": {"type": "integer", "default": 0, "description": "the same seeds (noise, labels) for both models"},
    "batch_size": {"type": "integer", "minimum": 1, "default": 256},
    "threshold": {"type": "number", "minimum": -1, "maximum": 1, "default": 0.95,
                  "description": "a pair counts as the same image above this correlation (Kadkhodaie et al. remove "
                                 "near-duplicates above 0.95 the same way)"},
    "pairs": {"type": "integer", "minimum": 0, "default": 8, "description": "example pairs kept for the report"},
    "bootstrap": {"type": "integer", "minimum": 0, "default": 1000},
    "confidence": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.95},
    "bootstrap_seed": {"type": "integer", "default": 0},
    "search_chunk": {"type": "integer", "minimum": 256, "default": 16384,
                     "description": "training images per chunk of the search for each sample's closest training image"},
}


def closest_in_training_set(run, samples: np.ndarray, train_idx: np.ndarray, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's highest correlation with a training image of ``train_idx`` and that image's pool index."""
    from ..metrics.nearest_neighbours import Rows, as_vectors, centred_unit, nearest

    corr, idx = nearest(samples, Rows(run.images, train_idx), 1, metric="cosine",
                        embed=lambda x: centred_unit(as_vectors(x)), device=run.device,
                        reference_chunk=cfg["search_chunk"])
    return corr[:, 0], train_idx[idx[:, 0]]


def compute(run, cfg: dict) -> Result:
    from .. import data as data_lib

    twin, twin_ckpt = run.load_model(run.inputs["twin"])
    spec, twin_spec = run.spec, twin_ckpt["spec"]
    mine = {k: spec["run"][k] for k in ("dataset", "N", "seed")}
    theirs = {k: twin_spec["run"][k] for k in ("dataset", "N", "seed")}
    if mine != theirs or spec.get("split", "A") == twin_spec.get("split", "A"):
        raise SystemExit(f"{run.inputs['twin']} is not the other training part of this run: {theirs}, split "
                         f"{twin_spec.get('split', 'A')} vs {mine}, split {spec.get('split', 'A')}")
    twin_train = data_lib.run_split(len(run.images), twin_spec)[0]
    if np.intersect1d(twin_train, run.split[0]).size:
        raise SystemExit("the two runs' training sets overlap: not disjoint data")
    result = paired_samples(run, twin, twin_train, cfg)
    result.table.insert(0, "twin_variant", twin_spec["run"]["variant"])
    result.table["twin_step"] = int(twin_ckpt["step"])
    return result


def paired_samples(run, twin, twin_train: np.ndarray, cfg: dict) -> Result:
    """Sample ``run``'s model and ``twin`` with the same seeds and compare the pairs (``twin_train``: the pool indices
    of the twin's training set, for each sample's closest training image of its own model's set)."""
    from ..metrics.nearest_neighbours import bootstrap_interval, correlation, wilson_interval

    t0 = time.perf_counter()
    kwargs = dict(sampling_steps=cfg["sampling_steps"], seed=cfg["sample_seed"], batch_size=cfg["batch_size"])
    a = run.sample(cfg["num_samples"], **kwargs)
    b = run.sample(cfg["num_samples"], model=twin, **kwargs)
    sampling_s = time.perf_counter() - t0
    corr = correlation(a, b)
    same = (corr > cfg["threshold"]).astype(np.float64)
    corr_a, nn_a = closest_in_training_set(run, a, run.split[0], cfg)
    corr_b, nn_b = closest_in_training_set(run, b, twin_train, cfg)
    ci = bootstrap_interval(corr, resamples=cfg["bootstrap"], confidence=cfg["confidence"], seed=cfg["bootstrap_seed"])
    frac_ci = bootstrap_interval(same, resamples=cfg["bootstrap"], confidence=cfg["confidence"],
                                 seed=cfg["bootstrap_seed"])
    wilson = wilson_interval(int(same.sum()), len(same), cfg["confidence"])
    row = {"step": run.step, "num_samples": len(corr), "mean_corr": float(corr.mean()), "corr_low": ci[0], "corr_high": ci[1],
           "median_corr": float(np.median(corr)), "threshold": cfg["threshold"], "same": int(same.sum()),
           "same_fraction": float(same.mean()), "same_low": wilson[0], "same_high": wilson[1],
           "same_ci_low": frac_ci[0], "same_ci_high": frac_ci[1],
           "own_train_corr_a": float(corr_a.mean()), "own_train_corr_b": float(corr_b.mean()),
           "sampling_steps": cfg["sampling_steps"], "sampling_s": sampling_s}
    p = min(cfg["pairs"], len(a))
    arrays = {"corr": corr, "own_train_corr_a": corr_a, "own_train_corr_b": corr_b, "pairs_a": a[:p], "pairs_b": b[:p],
              "closest_a": run.images[nn_a[:p]], "closest_b": run.images[nn_b[:p]]}
    print(f"[reproducibility {run.run}] mean correlation of paired samples {row['mean_corr']:.3f} "
          f"[{ci[0]:.3f}, {ci[1]:.3f}], {row['same']}/{len(corr)} pairs above {cfg['threshold']}; own training set "
          f"{row['own_train_corr_a']:.3f} / {row['own_train_corr_b']:.3f} (sampling {sampling_s:.0f}s)", flush=True)
    return Result(pd.DataFrame([row]), arrays=arrays)


def cost(spec: dict, cfg: dict) -> Cost:
    return Cost(forwards=2.0 * cfg["num_samples"] * cfg["sampling_steps"])  # both models


def rehearse(cfg: dict, r: dict) -> None:
    cfg.update(num_samples=min(cfg["num_samples"], max(r["fid_samples"], 4)), batch_size=min(cfg["batch_size"], 64),
               sampling_steps=min(cfg["sampling_steps"], r["respacing"]), pairs=min(cfg["pairs"], 2),
               bootstrap=min(cfg["bootstrap"], 100))


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

REPRODUCES = ("beyond the papers: two models on disjoint data sampled from the same noise (Kadkhodaie et al. 2024, "
              "the experiment paper 004 starts from; Zhang et al.)")


def corr_per_run(table: pd.DataFrame) -> pd.DataFrame:
    """The reproducibility quantity: mean correlation of paired samples, bootstrap 95 % CI over the pairs."""
    return table[analysis.RUN_KEYS].assign(value=table["mean_corr"].to_numpy(), low=table["corr_low"].to_numpy(),
                                           high=table["corr_high"].to_numpy())


def same_per_run(table: pd.DataFrame) -> pd.DataFrame:
    """The reproducible_fraction quantity: pairs above the threshold, Wilson 95 % interval."""
    return table[analysis.RUN_KEYS].assign(value=table["same_fraction"].to_numpy(), low=table["same_low"].to_numpy(),
                                           high=table["same_high"].to_numpy())


def findings(ctx: dict) -> list[str]:
    table = ctx.get("reproducibility")
    if table is None or table.empty:
        return []
    cells = analysis.summarise(corr_per_run(table))
    lines = ["Two models on disjoint training sets, same noise (mean correlation of paired samples [95 % interval]):"]
    for (d, v), sub in cells.groupby(["dataset", "variant"], sort=False):
        lines.append(f"  {d}, {display(ctx, v)} vs its split-B twin: " + "; ".join(
            f"N={int(c.N)}: {analysis.interval_text(c._asdict(), 3)}" for c in sub.sort_values("N").itertuples()))
    return lines


@section("Two models on disjoint data", REPRODUCES, needs=("reproducibility",))
def section_curve(ctx: dict) -> None:
    pyplot, table = plt(), ctx["reproducibility"]
    shown = datasets(ctx, table)
    fig, axes = pyplot.subplots(1, len(shown), figsize=(4.2 * len(shown) + 1.6, 3.2), squeeze=False)
    for ax, d in zip(axes[0], shown):
        sub = table[table["dataset"] == d]
        for v, runs in sub.groupby("variant", sort=False):
            cells = analysis.summarise(corr_per_run(runs)).sort_values("N")
            line = ax.errorbar(cells["N"], cells["mean"], yerr=[cells["mean"] - cells["low"], cells["high"] - cells["mean"]],
                               marker="o", ms=3, capsize=2, label=f"{display(ctx, v)} vs split-B twin: A-B correlation")
            own = runs.groupby("N")[["own_train_corr_a", "own_train_corr_b"]].mean().mean(axis=1)
            ax.plot(own.index, own.to_numpy(), ls="--", color=line[0].get_color(), lw=0.9,
                    label=f"{display(ctx, v)}: sample vs closest own training image")
            same = analysis.summarise(same_per_run(runs)).sort_values("N")
            ax.plot(same["N"], same["mean"], ls=":", marker="s", ms=2, color=line[0].get_color(), lw=0.9,
                    label=f"{display(ctx, v)}: fraction of pairs above {runs['threshold'].iloc[0]:.2f}")
        ax.set_xscale("log")
        ns = sorted(sub["N"].unique())
        ax.set_xticks(ns, [f"{n:g}" for n in ns])
        ax.minorticks_off()
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("N (training images per model)")
        ax.set_ylabel("correlation / fraction")
        ax.set_title(d)
    axes[0][-1].legend(fontsize=5.5, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Two models trained on disjoint sets of N images, sampled from the same noise (Kadkhodaie et al. "
                 "2024):\nmemorisation = each copies its own set; generalisation = both give the same sample", fontsize=8)
    save_figure(ctx, fig, "reproducibility_curve")
    cells = analysis.summarise(corr_per_run(table))
    same = analysis.summarise(same_per_run(table))
    rows = cells.merge(same, on=["dataset", "variant", "N"], suffixes=("", "_same"))
    own = table.groupby(["dataset", "variant", "N"], as_index=False)[["own_train_corr_a", "own_train_corr_b"]].mean()
    rows = rows.merge(own, on=["dataset", "variant", "N"], how="left")
    shown_rows = pd.DataFrame({
        "dataset": rows["dataset"], "model (split A vs B)": rows["variant"].map(lambda v: display(ctx, v)),
        "N": rows["N"], "seeds": rows["seeds"],
        "A-B correlation": [analysis.interval_text(r, 3) for r in rows.to_dict("records")],
        f"pairs > {table['threshold'].iloc[0]:.2f}": [analysis.interval_text(
            {"mean": r["mean_same"], "std": r["std_same"], "seeds": r["seeds_same"], "low": r["low_same"],
             "high": r["high_same"], "basis": r["basis_same"]}, 3) for r in rows.to_dict("records")],
        "own-set corr. A": rows["own_train_corr_a"], "own-set corr. B": rows["own_train_corr_b"]})
    write_table(ctx, "reproducibility", shown_rows, ".3f")
    samples = int(table["num_samples"].min())
    ctx["pdf"].table("Two models on disjoint data: agreement of paired samples", frame_table(
        shown_rows, formats={"own-set corr. A": ".3f", "own-set corr. B": ".3f"}),
        caption=f"{samples} sample pairs per N, the same seeds (noise and labels) for both models. Correlation: each "
                "image's mean removed, then cosine similarity in pixel space (Kadkhodaie et al.'s im_set_corr; SSCD "
                "copy-detection features, Zhang et al.'s choice, are not available offline). Brackets: bootstrap 95 % "
                "CI over the pairs (correlation), Wilson 95 % interval (fraction), with one seed; mean ± std over "
                "seeds otherwise. own-set corr.: mean over samples of the highest correlation with a training image "
                "of the model's own set.")


@section("Two models on disjoint data: example pairs", REPRODUCES, needs=("reproducibility",))
def section_pairs(ctx: dict) -> None:
    packed = ctx["arrays"].get("reproducibility") or {}
    table = ctx["reproducibility"]
    runs = first_runs(table)
    drawn = 0
    for (d, v), cell in runs.groupby(["dataset", "variant"], sort=False):
        entries = [(int(r.N), packed[analysis.run_key(d, v, r.N, r.seed)]) for r in cell.sort_values("N").itertuples()
                   if analysis.run_key(d, v, r.N, r.seed) in packed]
        entries = [(n, a) for n, a in entries if len(a["pairs_a"])]
        if not entries:
            continue
        draw_pairs(ctx, d, v, entries)
        drawn += 1
    if not drawn:
        raise NotMeasured("no example pairs (evaluation.reproducibility.pairs = 0?)")


def draw_pairs(ctx: dict, dataset: str, variant: str, entries: list) -> None:
    pyplot = plt()
    p = min(len(a["pairs_a"]) for _, a in entries)
    names = ("A", "B", "closest to A in A's set", "closest to B in B's set")
    fig, axes = pyplot.subplots(4 * len(entries), p, figsize=(0.8 * p + 2.2, 0.78 * 4 * len(entries) + 0.6),
                                squeeze=False)
    for e, (n, arrays) in enumerate(entries):
        corr = arrays["corr"]
        rows = (arrays["pairs_a"], arrays["pairs_b"], arrays["closest_a"], arrays["closest_b"])
        titles = ([f"corr {corr[j]:.2f}" for j in range(p)], [""] * p,
                  [f"{arrays['own_train_corr_a'][j]:.2f}" for j in range(p)],
                  [f"{arrays['own_train_corr_b'][j]:.2f}" for j in range(p)])
        for i, (images, title) in enumerate(zip(rows, titles)):
            for j in range(p):
                ax = axes[4 * e + i][j]
                image = images[j]
                ax.imshow(image.transpose(1, 2, 0).squeeze(-1) if image.shape[0] == 1 else image.transpose(1, 2, 0),
                          cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(title[j], fontsize=5)
            axes[4 * e + i][0].set_ylabel(f"N={n}: {names[i]}" if i == 0 else names[i], fontsize=5, rotation=0,
                                          ha="right", va="center")
    fig.suptitle(f"{dataset}, {display(ctx, variant)} (A) and its split-B twin (B), same noise: paired samples, "
                 "their correlation, and each sample's closest training image in its own model's set", fontsize=7)
    save_figure(ctx, fig, f"reproducibility_pairs_{dataset}_{variant}")


register_measurement(Measurement(
    name="reproducibility",
    description="two models on disjoint training sets (a run and its split-B twin) sampled from the same noise: mean "
                "correlation of paired samples and the fraction above a threshold (Kadkhodaie et al. 2024)",
    compute=compute,
    settings=SETTINGS,
    N=None,
    arrays=True,
    needs=("twin",),
    cost=cost,
    rehearse=rehearse,
    sections=(section_curve, section_pairs),
    findings=findings,
    quantities=(
        Quantity("reproducibility", "mean correlation of paired samples of a run and its split-B twin", corr_per_run,
                 lower_is_better=False, interval="bootstrap 95 % CI over the sample pairs"),
        Quantity("reproducible_fraction", "fraction of paired samples above the correlation threshold", same_per_run,
                 lower_is_better=False, interval="Wilson 95 % interval over the sample pairs"),
    ),
))
