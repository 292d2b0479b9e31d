"""Parameters and FLOPs of a study's variants at its data set's shape: the ``counts`` table every study's report has
(model cost, FID against GFLOPs), with every published count of a preset beside ours."""

from __future__ import annotations


def study_counts(study: dict):
    """(one row per variant, the per-operator breakdown) for a study description (diffbias.plan.study_description)."""
    import pandas as pd

    from .metrics.flops import build_for_counting, count_flops, count_parameters, format_published, published_counts
    from .models import PRESETS

    from .latents import model_input

    rows, ops = [], []
    ds = study["dataset_specs"][study["count_dataset"]]
    channels, side = model_input(ds)  # a latent data set: the latent grid the models train on (4 x 32 x 32)
    for variant, v in study["variant_specs"].items():
        classes = v.get("num_classes", 0)  # the label table of a class-conditional variant (no MACs, parameters)
        model = build_for_counting(v["backbone"], None, v["options"], input_size=side, in_channels=channels,
                                   num_classes=classes, materialize=False).eval()  # counted on the meta device
        macs, table = count_flops(model, input_size=side, in_channels=channels, num_classes=classes)
        ref = PRESETS[v["preset"]].reference if v.get("preset") in PRESETS else {}
        rows.append({"variant": variant, "label": study["labels"].get(variant, variant), "backbone": v["backbone"],
                     "preset": v.get("preset"), "params": count_parameters(model), "gmacs": macs / 1e9,
                     "input": f"{channels}x{side}x{side}" + (" latents" if ds.get("latents") else ""),
                     "reference_params": ref.get("params"), "reference_gflops": ref.get("gflops"),
                     # every published count of the preset vs ours at its input, under its own convention
                     "published": format_published(published_counts(v["preset"], v["options"])) if v.get("preset") else ""})
        ops.append(table.assign(variant=variant))
    return pd.DataFrame(rows), pd.concat(ops, ignore_index=True)


def write_study_counts(study: dict, out: str, ops_out: str) -> None:
    from .io import provenance, write_parquet

    counts, ops = study_counts(study)
    write_parquet(counts, out, {"study": study, "provenance": provenance()})
    write_parquet(ops, ops_out, {"study": study})
