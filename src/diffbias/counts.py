"""Parameters and FLOPs of a study's variants at its data set's shape: the ``counts`` table every study's report has
(model cost, FID against GFLOPs), with every published count of a preset beside ours; and the same models counted at
other input sizes, the ``counts_by_length`` table (GFLOPs against sequence length, paper 003 fig. 3)."""

from __future__ import annotations


def study_counts(study: dict):
    """(one row per variant, the per-operator breakdown) for a study description (diffbias.plan.study_description)."""
    import pandas as pd

    from .latents import model_input
    from .metrics.flops import build_for_counting, count_flops, count_parameters, format_published, published_counts
    from .models import PRESETS

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


def length_sweep(study: dict):
    """Each variant's GFLOPs per image (fvcore MACs, every handle) at the input sides the study lists
    (``studies.<s>.count_sides``; none: an empty table), counted without weights: one row per (variant, side), with
    the sequence length before patching (side^2: the latent or pixel positions, paper 003 fig. 3's axis) and the
    tokens the model sees. A side the model cannot take (patch size, attention windows) is left out. A latent data set's
    sides are latent sides (32 = a 256x256 image through SD's VAE)."""
    import pandas as pd

    from .latents import model_input
    from .metrics.flops import build_for_counting, count_flops

    channels = model_input(study["dataset_specs"][study["count_dataset"]])[0]  # latents: 4
    rows = []
    for variant, v in study["variant_specs"].items():
        for side in study.get("count_sides") or []:
            try:
                model = build_for_counting(v["backbone"], None, v["options"], input_size=side, in_channels=channels,
                                           materialize=False)  # on the meta device: seconds for DiffuSSM-XL at 64x64
                macs, _ = count_flops(model, input_size=side, in_channels=channels)
            except (ValueError, RuntimeError, AssertionError):  # e.g. a window or patch that does not fit this side
                continue
            patch = int(v["options"].get("patch_size", 1) or 1)
            rows.append({"variant": variant, "label": study["labels"].get(variant, variant), "backbone": v["backbone"],
                         "side": side, "seq_len": side * side, "tokens": (side // patch) ** 2, "gmacs": macs / 1e9})
    return pd.DataFrame(rows, columns=["variant", "label", "backbone", "side", "seq_len", "tokens", "gmacs"])


def write_study_counts(study: dict, out: str, ops_out: str, length_out: str | None = None) -> None:
    from .io import provenance, write_parquet

    counts, ops = study_counts(study)
    if length_out:  # written before the counts table: a counts table on disk means the job finished
        write_parquet(length_sweep(study), length_out, {"study": study})
    write_parquet(ops, ops_out, {"study": study})
    write_parquet(counts, out, {"study": study, "provenance": provenance()})
