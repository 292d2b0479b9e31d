"""analysis: baselines per backbone, per-data-set comparison tables, array packs (synthetic inputs, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from diffbias import analysis

VARIANTS = ["xs", "xs_local", "s", "s_local"]
# Two backbones that share the label "w/ Local" (paper 004 table 4): rows must stay apart.
LABELS = {"xs": "DiT-XS/1", "xs_local": "w/ Local", "s": "DiT-S/1", "s_local": "w/ Local"}
SPECS = {v: {"backbone": "dit", "preset": "DiT-XS/1" if v.startswith("xs") else "DiT-S/1", "options": {}} for v in VARIANTS}

# Synthetic per-run gap: GAP[variant] * SCALE[dataset] * N_FACTOR[N] + 0.1 * seed index (seeds 43, 143).
GAP = {"xs": 2.0, "xs_local": 1.5, "s": 4.0, "s_local": 3.0}
SCALE = {"celeba": 1.0, "imagenet": 2.0}
N_FACTOR = {1000: 1.0, 10000: 0.5}
SEEDS = [43, 143]


def study(baseline=("xs", "s")) -> dict:
    return {"name": "fig6", "variants": VARIANTS, "baseline": list(baseline) if isinstance(baseline, tuple) else baseline,
            "labels": LABELS, "variant_specs": SPECS, "datasets": ["celeba", "imagenet"], "N": [1000, 10000], "seeds": SEEDS}


def psnr_table() -> pd.DataFrame:
    """The columns cmd_psnr writes (plus label from aggregation); the gap is constant over t within a run."""
    rows = []
    for d in SCALE:
        for v in VARIANTS:
            for n in N_FACTOR:
                for i, seed in enumerate(SEEDS):
                    gap = GAP[v] * SCALE[d] * N_FACTOR[n] + 0.1 * i
                    for step, t in enumerate((0, 100, 200)):
                        rows.append({"step": step, "t": t, "psnr_train": 30.0 + gap, "psnr_test": 30.0, "gap": gap, "N": n,
                                     "dataset": d, "seed": seed, "variant": v, "label": LABELS[v]})
    return pd.DataFrame(rows)


def expected_mean(v, d, n):
    return GAP[v] * SCALE[d] * N_FACTOR[n] + 0.05  # mean of the two seeds' offsets 0 and 0.1


def test_each_backbone_is_compared_with_its_own_baseline():
    assert analysis.resolve_baselines(study()) == {"xs": "xs", "xs_local": "xs", "s": "s", "s_local": "s"}
    long = analysis.gap_table(psnr_table(), study()).set_index(["dataset", "variant", "N"])
    for d in SCALE:
        for n in N_FACTOR:
            for v, base in (("xs_local", "xs"), ("s_local", "s")):
                want = 100 * (expected_mean(v, d, n) - expected_mean(base, d, n)) / expected_mean(base, d, n)
                assert long.loc[(d, v, n), "change_pct"] == pytest.approx(want)
            assert np.isnan(long.loc[(d, "xs", n), "change_pct"]) and np.isnan(long.loc[(d, "s", n), "change_pct"])
    # hand-computed: celeba N=1000, DiT-S/1 w/ Local 3.05 against DiT-S/1 4.05 (not against DiT-XS/1's 2.05)
    assert long.loc[("celeba", "s_local", 1000), "change_pct"] == pytest.approx(-24.691358, abs=1e-5)
    assert long.loc[("celeba", "s_local", 1000), "mean"] == pytest.approx(3.05)
    assert long.loc[("celeba", "s_local", 1000), "std"] == pytest.approx(np.std([3.0, 3.1], ddof=1))
    assert (long["seeds"] == 2).all()


def test_best_value_is_per_backbone_block_and_column():
    long = analysis.gap_table(psnr_table(), study())
    best = long[long["best"]].set_index(["dataset", "N", "block"])["variant"]
    # each block's "w/ Local" has the smaller gap in every (data set, N) column of its own block
    assert sorted(best.unique()) == ["s_local", "xs_local"]
    assert len(best) == len(SCALE) * len(N_FACTOR) * 2


def test_one_baseline_string_keeps_cross_backbone_comparison_and_a_list_never_crosses():
    single = analysis.resolve_baselines(study(baseline="xs"))
    assert single == {"xs": "xs", "xs_local": "xs", "s": "xs", "s_local": "xs"}  # explicit single baseline
    only_xs = analysis.resolve_baselines(study(baseline=("xs", "xs_local")))
    assert only_xs["s"] is None and only_xs["s_local"] is None  # several listed, none of its backbone: no change
    with pytest.raises(ValueError, match="not among its variants"):
        analysis.resolve_baselines(study(baseline=("xs", "m")))


def test_layout_has_a_column_block_per_dataset_and_a_row_block_per_backbone():
    s = study()
    layout = analysis.layout_comparison(analysis.gap_table(psnr_table(), s), s, digits=4)
    assert layout.groups == [("celeba", [1000, 10000]), ("imagenet", [1000, 10000])]
    kinds = [(r[0], r[1].strip()) for r in layout.rows]
    assert kinds == [("block", "DiT-XS/1"), ("row", "DiT-XS/1"), ("row", "w/ Local"), ("change", "vs DiT-XS/1"),
                     ("block", "DiT-S/1"), ("row", "DiT-S/1"), ("row", "w/ Local"), ("change", "vs DiT-S/1")]
    s_local_change = layout.rows[7][2]
    # (3.05-4.05)/4.05, (1.55-2.05)/2.05, (6.05-8.05)/8.05, (3.05-4.05)/4.05; two seeds with std 0.0707 give
    # t-intervals of +-0.635: only the imagenet N = 1000 difference (2.0) clears both intervals and is marked
    assert [c.text for c in s_local_change] == ["-24.69%", "-24.39%", "-24.84%*", "-24.69%"]
    s_local = layout.rows[6][2]
    assert s_local[0].text == "3.0500 ± 0.0707" and s_local[0].bold
    md = analysis.format_table(layout, "markdown")
    assert md.splitlines()[0] == ("| Model | celeba N = 1000 | celeba N = 10000 | imagenet N = 1000 | "
                                  "imagenet N = 10000 |")
    assert md.count("| **DiT-XS/1** |") == 1 and md.count("| **DiT-S/1** |") == 1
    tex = analysis.format_table(layout, "latex")
    assert r"\multicolumn{2}{c}{celeba}" in tex and r"\multicolumn{2}{c}{imagenet}" in tex
    assert r"\textbf{3.0500 $\pm$ 0.0707}" in tex and r"\textit{-24.69\%}" in tex


def test_single_seed_has_no_spread_and_single_dataset_keeps_its_column_block():
    s = study() | {"seeds": [43], "datasets": ["celeba"]}
    psnr = psnr_table()
    psnr = psnr[(psnr["seed"] == 43) & (psnr["dataset"] == "celeba")]
    layout = analysis.layout_comparison(analysis.gap_table(psnr, s), s, digits=2)
    assert layout.groups == [("celeba", [1000, 10000])]
    assert layout.rows[1][2][0].text == "2.00"  # DiT-XS/1 at N=1000, no "±" with one seed


def test_array_pack_round_trip(tmp_path):
    runs = ["celeba/xs/N1000/seed43", "celeba/s/N1000/seed43"]
    inputs = []
    for i, run in enumerate(runs):
        path = tmp_path / f"run{i}.npz"
        np.savez(path, samples=np.full((40, 1, 4, 4), i, dtype=np.uint8), t=np.array(250))
        inputs.append(str(path))
    out = tmp_path / "samples.npz"
    keys = analysis.aggregate_arrays(inputs, runs, out, max_items=16)
    assert sorted(keys) == sorted(f"{r}::{n}" for r in runs for n in ("samples", "t"))
    with np.load(out) as pack:  # arrays are read from the open pack when used
        arrays = analysis.unpack_arrays(pack)
        assert set(arrays) == set(runs) and set(arrays[runs[0]]) == {"samples", "t"}
        assert arrays["celeba/s/N1000/seed43"]["samples"].shape == (16, 1, 4, 4)  # preview of the first 16
        assert (arrays["celeba/s/N1000/seed43"]["samples"] == 1).all() and int(arrays[runs[0]]["t"]) == 250
        assert json.loads(str(pack["__runs__"])) == runs
    assert analysis.parse_run(runs[1]) == ("celeba", "s", 1000, 43)
    with pytest.raises(ValueError, match="run keys"):
        analysis.aggregate_arrays(inputs, runs[:1], out)


# ----------------------------------------------------------------------------------------------------
# The comparison rule and claims
# ----------------------------------------------------------------------------------------------------


def per_run(values: dict, seeds=(0,), half_width=None) -> pd.DataFrame:
    """Per-run frame of a quantity: values[(variant, N)] = mean; seed i adds 0.01 * i; with one seed and
    half_width, the run's own interval value +- half_width."""
    rows = []
    for (v, n), value in values.items():
        for i, seed in enumerate(seeds):
            row = {"dataset": "d", "variant": v, "N": n, "seed": seed, "value": value + 0.01 * i}
            if half_width is not None:
                row.update(low=row["value"] - half_width, high=row["value"] + half_width)
            rows.append(row)
    return pd.DataFrame(rows)


def claim_study(**extra) -> dict:
    return {"variants": ["base", "head", "tail"], "baseline": "base", "datasets": ["d"], "N": [10, 1000],
            "seeds": [0], "labels": {}, "variant_specs": {}} | extra


GAPS = {("base", 10): 2.0, ("head", 10): 1.5, ("tail", 10): 2.1, ("base", 1000): 0.20, ("head", 1000): 0.18,
        ("tail", 1000): 0.25}


def test_resolve_needs_disjoint_intervals_and_says_which_basis():
    one = analysis.summarise(per_run(GAPS, half_width=0.05)).set_index(["variant", "N"])
    assert set(one["basis"]) == {"images"}
    assert analysis.resolve(one.loc[("head", 10)], one.loc[("base", 10)]) == -1  # 1.5 +- .05 vs 2.0 +- .05
    assert analysis.resolve(one.loc[("tail", 10)], one.loc[("base", 10)]) == 1  # 2.1 vs 2.0: [2.05, 2.15], [1.95, 2.05]
    assert analysis.resolve(one.loc[("head", 1000)], one.loc[("base", 1000)]) == 0  # overlap
    assert analysis.resolve(one.loc[("head", 10)], one.loc[("base", 10)], yardstick=0.6) == 0  # within the twin's
    none = analysis.summarise(per_run(GAPS)).set_index(["variant", "N"])
    assert set(none["basis"]) == {"none"} and analysis.resolve(none.loc[("head", 10)], none.loc[("base", 10)]) == 0
    three = analysis.summarise(per_run(GAPS, seeds=(0, 1, 2))).set_index(["variant", "N"])
    cell = three.loc[("head", 10)]  # values 1.50, 1.51, 1.52: t(0.975, 2) = 4.303, sd 0.01
    assert cell["basis"] == "seeds" and cell["high"] - cell["mean"] == pytest.approx(4.303 * 0.01 / np.sqrt(3), rel=1e-3)


def test_claim_verdicts_come_from_the_intervals():
    claims = [
        {"text": "head lower than base at every N", "paper": "004", "item": "fig. 6", "quantity": "gap",
         "lower": "head", "than": "base"},
        {"text": "head lower than tail and base", "quantity": "gap", "lower": "head", "than": ["tail", "base"]},
        {"text": "tail lower than base", "quantity": "gap", "lower": "tail", "than": "base", "N": [10]},
        {"text": "N = 10 memorises more", "quantity": "gap", "higher": {"N": 10}, "than": {"N": 1000}},
        {"text": "never measured", "quantity": "fid", "lower": "head", "than": "base"},
    ]
    summary, details = analysis.evaluate_claims(claims, {"gap": per_run(GAPS, half_width=0.05)}, claim_study())
    verdicts = dict(zip(summary["text"], summary["verdict"]))
    assert verdicts == {"head lower than base at every N": "unresolved at this precision",  # N=1000 overlaps
                        "head lower than tail and base": "unresolved at this precision",
                        "tail lower than base": "contradicted",
                        "N = 10 memorises more": "reproduced",  # every variant: 1.5-2.1 vs 0.18-0.25
                        "never measured": "not measured"}
    first = summary.iloc[0]
    assert first["source"] == "paper 004 fig. 6" and (first["for"], first["unresolved"]) == (1, 1)
    assert first["basis"] == "one seed: evaluation noise only"
    assert summary.iloc[3]["comparisons"] == 3 and len(details[details["claim"] == 4]) == 3
    # three seeds with a clear difference everywhere: reproduced, over seeds
    wide = {k: v * (1 if k[0] != "head" else 0.5) for k, v in GAPS.items()}
    summary, _ = analysis.evaluate_claims(claims[:1], {"gap": per_run(wide, seeds=(0, 1, 2))},
                                          claim_study(seeds=[0, 1, 2]))
    assert summary.iloc[0]["verdict"] == "reproduced" and summary.iloc[0]["basis"] == "seeds"


def test_one_seed_differences_within_the_twin_yardstick_stay_unresolved():
    """With one seed, the baseline's split-B twin (the same recipe on other images) shows what the training data
    alone change; a difference no larger than that is not resolved, whatever the image intervals say."""
    gaps = dict(GAPS) | {("base_b", 10): 1.3, ("base_b", 1000): 0.2}  # the twin differs from base by 0.7 at N=10
    study = claim_study(variants=["base", "head", "tail", "base_b"], twins={"base": "base_b"})
    claims = [{"text": "head lower than base at N=10", "quantity": "gap", "lower": "head", "than": "base", "N": [10]}]
    summary, details = analysis.evaluate_claims(claims, {"gap": per_run(gaps, half_width=0.05)}, study)
    assert summary.iloc[0]["verdict"] == "unresolved at this precision"
    assert details.iloc[0]["yardstick"] == pytest.approx(0.7)
    long = analysis.compare(per_run(gaps, half_width=0.05).rename(columns={"value": "gap"}), study, "gap")
    assert long.set_index(["variant", "N"]).loc[("head", 10), "resolved"] == ""  # the tables use the same rule
