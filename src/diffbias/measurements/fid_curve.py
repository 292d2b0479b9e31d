"""FID over training (paper 002 figs. 11-12, paper 003 fig. 6): FID of every EMA snapshot
(``training.snapshot_steps``) and of the final model, with the FID measurement's sampling settings, the same sample
seeds at every point and one shared reference set.

When the run also has an FID table (same model, sample seeds and reference: the same number), the final point is
read from it instead of being sampled and scored a second time.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..sections import display, plt, save_figure, section, variants
from . import Cost, Measurement, Result, register_measurement
from .fid import reference_features, sampling_forwards, score, statistics_files


def compute(run, cfg: dict) -> Result:
    reference = reference_features(run, cfg)
    final_row = None
    if run.inputs.get("table:fid"):
        final_row = pd.read_parquet(run.inputs["table:fid"]).iloc[0].to_dict()
        same = (final_row["step"] == run.step and final_row["num_samples"] == cfg["num_samples"]
                and final_row["sampling_steps"] == cfg["sampling_steps"] and final_row["reference"] == cfg["reference"])
        if not same:
            raise SystemExit(f"{run.inputs['table:fid']} was computed with other settings than this FID curve")
    points = [(path, False) for path in sorted(Path(run.inputs["snapshots"]).glob("ema_*.pt"))]
    if final_row is None:
        points.append((None, True))
    rows = []
    for path, final in points:
        model, checkpoint = (run.model, run.checkpoint) if final else run.load_model(path)
        metrics, _, sampling_s, metric_s = score(run, cfg, reference, model=model)  # the same seeds at every point
        rows.append({**run.run, "step": checkpoint["step"], "final": final, **metrics,
                     "sampling_steps": cfg["sampling_steps"], "reference": cfg["reference"], "sampling_s": sampling_s,
                     "metric_s": metric_s})
        print(f"[fid-curve {run.run['variant']} N={run.run['N']}] step {checkpoint['step']}: FID {metrics['fid']:.2f} "
              f"(sampling {sampling_s:.0f}s, inception {metric_s:.0f}s)", flush=True)
    if final_row is not None:
        keep = set(rows[0]) if rows else set(final_row)
        rows.append({**{k: v for k, v in final_row.items() if k in keep}, "final": True})
    return Result(pd.DataFrame(rows), meta={"fid": cfg})


def points(spec: dict) -> int:
    """Scored models: every snapshot and the final one (an upper bound: the final point is reused from the FID
    table when the run has one)."""
    return len(spec["training"].get("snapshot_steps", [])) + 1


def cost(spec: dict, cfg: dict) -> Cost:
    return Cost(forwards=points(spec) * sampling_forwards(spec, cfg), inception_images=points(spec) * cfg["num_samples"])


@section("FID over training", {"002": "fig. 11", "003": "fig. 6 (right)", "000": "sec. 3 (does GMM need fewer "
         "training steps?)"}, needs=("fid_curve",))
def section_fid_curve(ctx: dict) -> None:
    pyplot, curve = plt(), ctx["fid_curve"]
    panels = list(curve[["dataset", "N"]].drop_duplicates().sort_values(["dataset", "N"]).itertuples(index=False))
    fig, axes = pyplot.subplots(1, len(panels), figsize=(3.4 * len(panels) + 1.5, 3.0), squeeze=False)
    for ax, (d, n) in zip(axes[0], panels):
        sub = curve[(curve["dataset"] == d) & (curve["N"] == n)]
        for v in variants(ctx, sub):
            line = sub[sub["variant"] == v].groupby("step")["fid"].mean()
            ax.plot(line.index, line.to_numpy(), marker="o", ms=3, label=display(ctx, v))
        ax.set_title(f"{d}, N={n}")
        ax.set_xlabel("training step")
        ax.set_ylabel("FID")
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"FID of the EMA snapshots over training ({int(curve['num_samples'].iloc[0])} samples, "
                 f"{int(curve['sampling_steps'].iloc[0])} steps, same sample seeds at every step)")
    save_figure(ctx, fig, "fid_curve")


register_measurement(Measurement(
    name="fid_curve",
    description="FID of the EMA snapshots (training.snapshot_steps) and the final model, with evaluation.fid's "
                "sampling settings",
    compute=compute,
    settings_from="fid",
    N=[],
    needs=("snapshots", "shared:fid_reference", "table:fid"),
    files=statistics_files,
    cost=cost,
    runtime_units=lambda spec, cfg: points(spec),
    sections=(section_fid_curve,),
))
