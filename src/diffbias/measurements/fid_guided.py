"""FID with classifier-free guidance: paper 003 table 1's "-G" rows (DiT-XL/2-G, DiffuSSM-XL-G) and its 512x512 block,
beside the unguided FID of the same runs (measurement ``fid``).

Study-scoped: a study switches it on with ``studies.<s>.fid_guided: {guidance_scale: 1.5}`` (``{}`` takes the default),
so the guided and the unguided FID of the same trained run are two measurements, each with its own table. It samples
and scores with ``evaluation.fid``'s settings (sample count, sampling steps, reference set or statistics) and its own
``guidance_scale``: eps = eps_null + s (eps_y - eps_null) on class-conditional runs (``TrainedRun.sample``), labels
uniform over the classes.

The scale: paper 003 does not state DiffuSSM's; its DiT-XL/2-G row is DiT's FID-50K at scale 1.5, so 1.5 is the
default here (DiT's choice, used for both backbones).
"""

from __future__ import annotations

import pandas as pd

from .. import analysis
from ..sections import NotMeasured, comparison, display, layout_table, plt, save_figure, section, tile, write_table
from . import Cost, Measurement, Result, register_measurement
from .fid import reference_features, score, statistics_files

SETTINGS = {
    "guidance_scale": {"type": "number", "minimum": 1, "default": 1.5,
                       "description": "classifier-free guidance scale; paper 003 states none for DiffuSSM, 1.5 is "
                                      "DiT's (its FID-50K of DiT-XL/2-G, the row paper 003 compares with)"},
}


def compute(run, cfg: dict) -> Result:
    if not run.num_classes:
        raise SystemExit(f"fid_guided needs a class-conditional run; {run.run} is unconditional")
    reference = reference_features(run, cfg)
    metrics, samples, sampling_s, metric_s = score(run, cfg, reference)
    row = {**run.run, **metrics, "sampling_steps": cfg["sampling_steps"], "reference": cfg["reference"],
           "step": run.step, "guidance_scale": cfg["guidance_scale"], "sampling_s": sampling_s, "metric_s": metric_s,
           "sampling_images_per_s": cfg["num_samples"] / sampling_s}
    print(f"[fid-guided {run.run}] FID {metrics['fid']:.2f} at guidance {cfg['guidance_scale']} from {len(samples)} "
          f"samples (sampling {sampling_s:.0f}s, inception {metric_s:.0f}s)")
    return Result(pd.DataFrame([row]), arrays={"samples": samples}, meta={"fid_guided": cfg})


def cost(spec: dict, cfg: dict) -> Cost:
    """Every guided forward runs the model on the labelled and the null-label batch: twice the unguided cost."""
    return Cost(forwards=2.0 * cfg["num_samples"] * cfg["sampling_steps"], inception_images=float(cfg["num_samples"]))


@section("FID with classifier-free guidance", {"003": "table 1, the -G rows (FID-50K with guidance) and the 512x512 "
                                                       "block"}, needs=("fid_guided",))
def section_fid_guided(ctx: dict) -> None:
    table = ctx["fid_guided"]
    layout = comparison(ctx, table, "fid", digits=2)
    write_table(ctx, "fid_guided", layout)
    scales = ", ".join(f"{s:g}" for s in sorted(table["guidance_scale"].unique()))
    against = ("ADM's reference statistics" if "fid_statistics" in table and table["fid_statistics"].notna().any()
               else "the reference images")
    ctx["pdf"].table(f"FID with classifier-free guidance (scale {scales}; lower is better)", layout_table(layout),
                     caption=f"Mean ± std over seeds, against {against}; {int(table['num_samples'].iloc[0])} samples, "
                             f"{int(table['sampling_steps'].iloc[0])} sampling steps. The unguided FID of the same runs "
                             "is the table 'FID, KID, precision and recall'.")


@section("Samples with guidance", {"003": "figs. 1 and 11-14 (samples with guidance, 256 and 512)"},
         needs=("fid_guided",))
def section_guided_samples(ctx: dict) -> None:
    pyplot = plt()
    packed = ctx["arrays"].get("fid_guided")
    if not packed:
        raise NotMeasured("no guided sample arrays")
    runs = sorted(packed)[:12]
    fig, axes = pyplot.subplots(1, len(runs), figsize=(2.2 * len(runs), 2.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        ax.imshow(tile(packed[run]["samples"][:16]), interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        d, v, n, seed = analysis.parse_run(run)
        ax.set_title(f"{d}\n{display(ctx, v)}, N={n}", fontsize=6)
    fig.suptitle("First 16 guided samples per run (EMA model)")
    save_figure(ctx, fig, "samples_guided")


register_measurement(Measurement(
    name="fid_guided",
    description="FID, KID, precision and recall of samples with classifier-free guidance (paper 003's -G rows), with "
                "evaluation.fid's sampling settings",
    compute=compute,
    settings=SETTINGS,
    settings_from="fid",
    study_key="fid_guided",
    class_conditional=True,
    arrays=True,
    preview_items=16,
    needs=("shared:fid_reference",),
    files=statistics_files,
    cost=cost,
    sections=(section_fid_guided, section_guided_samples),
))
