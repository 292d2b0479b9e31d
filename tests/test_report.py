"""report.build_report from synthetic study-level files (the real column schema of the measurement commands),
and the CLI's aggregate-arrays packing the per-run arrays it reads. Seconds, no training."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from diffbias import cli, report
from diffbias.io import write_parquet

from test_analysis import LABELS, N_FACTOR, SCALE, SEEDS, SPECS, VARIANTS, psnr_table

FID = {"xs": 20.0, "xs_local": 16.0, "s": 30.0, "s_local": 27.0}  # per-run FID = FID[v] * SCALE[d] + seed index
GMACS = {"xs": 1.0, "xs_local": 0.9, "s": 4.0, "s_local": 3.6}
T = 250


def study() -> dict:
    return {"name": "fig6", "title": "local vs global", "scale_note": "synthetic", "summary": "", "variants": VARIANTS,
            "baseline": ["xs", "s"], "N": list(N_FACTOR), "seeds": SEEDS, "labels": LABELS, "variant_specs": SPECS,
            "datasets": list(SCALE), "count_dataset": "celeba", "papers": ["004"], "settings": {}, "switched_off": {}}


def runs():
    return [(d, v, n, seed) for d in SCALE for v in VARIANTS for n in N_FACTOR for seed in SEEDS]


def keys(d, v, n, seed):
    return {"dataset": d, "variant": v, "N": n, "seed": seed, "label": LABELS.get(v, v)}


def write_study(root) -> tuple:
    """Study tables under root/studies/fig6 and per-run arrays under root/runs (packed by the CLI below)."""
    study_dir = root / "studies/fig6"
    meta = {"study": study(), "runs": {}}
    write_parquet(psnr_table(), study_dir / "psnr.parquet", meta)
    fid, curve, log, jac, att = [], [], [], [], []
    per_run_arrays = {"jacobian": [], "attention": [], "fid": []}
    rng = np.random.default_rng(0)
    for d, v, n, seed in runs():
        i = SEEDS.index(seed)
        value = FID[v] * SCALE[d] + i
        common = {"kid_mean": value / 1e4, "kid_std": 1e-4, "kid_subset_size": 8, "kid_subsets": 100, "precision": 0.5,
                  "recall": 0.4, "inception_score": None, "inception_score_std": None, "num_samples": 16,
                  "num_reference": 16, "sampling_steps": 10, "reference": "train", "sampling_s": 1.0, "metric_s": 1.0}
        fid.append(keys(d, v, n, seed) | common | {"fid": value, "sfid": value / 2, "inception_score": float("nan"),
                                                   "step": 100, "sampling_images_per_s": 16.0 / GMACS[v]})
        for step in (50, 100):
            curve.append(keys(d, v, n, seed) | common | {"fid": value * 100 / step, "step": step, "final": step == 100})
        for step in (50, 100):
            log.append(keys(d, v, n, seed) | {"step": step, "loss": 1.0 / step, "mse": 1.0 / step, "vb": 0.0,
                                              "images_per_s": 100.0 / GMACS[v], "peak_memory_mb": 500.0,
                                              "memory_kind": "process_max_rss", "device": "cpu"})
        if n != 1000:  # Jacobian and attention maps measured at N = 1000 only (their `N` lists)
            continue
        for image in range(2):
            for rank in range(4):
                jac.append(keys(d, v, n, seed) | {"image": image, "t": T, "rank": rank, "eigenvalue": 1.0 - 0.1 * rank,
                                                  "asymmetry": 0.5, "method": "full", "products": 48, "residual": 0.0})
        for layer in (1, 2):
            for metric in ("mass_r1", "mean_distance", "entropy"):
                for head in ("0", "mean"):
                    att.append(keys(d, v, n, seed) | {"layer": layer, "head": head, "t": T, "metric": metric,
                                                      "value": 0.1 * layer, "grid_h": 4, "grid_w": 4})
        run_dir = root / "runs" / d / v / f"N{n}" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        np.savez(run_dir / "jacobian.npz", eigenvectors=rng.normal(size=(2, 1, 4, 3, 4, 4)).astype("float32"),
                 t=np.array([T]))
        maps = rng.random((6, 16, 16)).astype("float16")
        np.savez(run_dir / "attention.npz", t=np.array(T), layer1=maps, layer2=maps)
        np.savez(run_dir / "fid.npz", samples=rng.integers(0, 255, (40, 3, 4, 4), dtype=np.uint8))
        key = f"{d}/{v}/N{n}/seed{seed}"
        for name in per_run_arrays:
            per_run_arrays[name].append((key, str(run_dir / f"{name}.npz")))
    for name, rows in (("fid", fid), ("fid_curve", curve), ("train_log", log), ("jacobian", jac), ("attention", att)):
        write_parquet(pd.DataFrame(rows), study_dir / f"{name}.parquet", meta)
    counts = pd.DataFrame([{"variant": v, "label": LABELS[v], "backbone": "dit", "preset": SPECS[v]["preset"],
                            "params": 1e6 * GMACS[v], "gmacs": GMACS[v], "input": "3x4x4", "reference_params": None,
                            "reference_gflops": None, "published": ""} for v in VARIANTS])
    write_parquet(counts, study_dir / "counts.parquet", meta)
    return study_dir, per_run_arrays


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    study_dir, per_run_arrays = write_study(root)
    for name, pairs in per_run_arrays.items():  # what rule aggregate_arrays runs
        args = ["aggregate-arrays", "--runs", json.dumps([k for k, _ in pairs]), "--out", str(study_dir / f"arrays/{name}.npz")]
        cli.main(args + (["--max-items", "16"] if name == "fid" else []) + [p for _, p in pairs])
    out = root / "fig6.pdf"
    sections = report.build_report(study(), study_dir, out)
    return study_dir, out, sections


def test_contents_page_lists_what_the_study_measured_with_its_papers_items(rendered):
    study_dir, out, sections = rendered
    pages = len(re.findall(rb"/Type\s*/Page\b", out.read_bytes()))
    assert sections[0].title == "Overview" and sections[0].first_page == 2  # page 1 is the contents
    assert pages == 1 + sum(s.pages for s in sections)
    for before, after in zip(sections, sections[1:]):
        assert after.first_page == before.first_page + before.pages
    titles = {s.title: s for s in sections}
    for title, item in (("Mean PSNR gap per data set", "reproduces paper 004 figs. 6-8"),
                        ("PSNR gap per training-set size", "reproduces paper 004 fig. 6"),
                        ("PSNR of one-step denoising, train vs test", "reproduces paper 004 fig. 2"),
                        ("FID, KID, precision and recall", "reproduces paper 004 tables 1-3"),
                        ("FID over training", "beyond paper 004 (cf. paper 002 fig. 11"),
                        ("FID against GFLOPs and sampling speed", "beyond paper 004 (cf. paper 003 fig. 3"),
                        ("Model cost: parameters, GFLOPs, throughput", "beyond paper 004 (cf. paper 002 table 2"),
                        ("Jacobian eigenvectors and spectra", "reproduces paper 004 fig. 3"),
                        ("Attention maps", "figs. 9-11")):
        assert titles[title].status == "rendered" and titles[title].pages >= 1, title
        assert titles[title].reproduces.startswith(item) or item in titles[title].reproduces, (title, titles[title].reproduces)
    # sections of measurements this study did not run, or of designs it does not have, are not in the contents
    for title in ("FreeU-style (b, s) scaling: FID grid", "Gaussian-mixture masks",
                  "Appendix C: weight sharing and PCA attention", "Not in this report"):
        assert title not in titles
    listed = json.loads((study_dir / "tables/report_sections.json").read_text())
    assert [entry["title"] for entry in listed["sections"]] == [s.title for s in sections]
    assert listed["switched_off"] == {} and listed["nothing_drawn"] == []


def test_closing_page_says_what_the_config_switched_off(tmp_path):
    study_dir, _ = write_study(tmp_path)
    off = {"jacobian": "evaluation.jacobian.N = [] (study N: [1000, 10000])"}
    sections = report.build_report(study() | {"switched_off": off}, study_dir, tmp_path / "r.pdf")
    assert sections[-1].title == "Not in this report" and sections[-1].pages == 1
    listed = json.loads((study_dir / "tables/report_sections.json").read_text())
    assert listed["switched_off"] == off


def test_tables_have_a_column_block_per_dataset_and_own_baselines(rendered):
    study_dir, _, _ = rendered
    gap = (study_dir / "tables/psnr_gap.md").read_text().splitlines()
    assert gap[0] == "| Model | celeba N = 1000 | celeba N = 10000 | imagenet N = 1000 | imagenet N = 10000 |"
    assert "| **DiT-XS/1** |" in gap[2] and any(line.startswith("| vs DiT-S/1 |") for line in gap)
    fid = (study_dir / "tables/fid.md").read_text().splitlines()
    change = [line for line in fid if line.startswith("| vs DiT-S/1 |")][0].split("|")[2:-1]
    # DiT-S/1 w/ Local on celeba: mean over seeds 27.5 vs DiT-S/1's 30.5 -> -9.84%; on imagenet 54.5 vs 60.5 -> -9.92%
    assert [c.strip() for c in change] == ["*-9.84%*", "*-9.84%*", "*-9.92%*", "*-9.92%*"]
    s_local = [line for line in fid if line.startswith("| w/ Local |")][1]
    assert "**27.50 ± 0.71**" in s_local  # best of the DiT-S/1 block, mean ± std over the two seeds
    tex = (study_dir / "tables/fid.tex").read_text()
    assert r"\multicolumn{2}{c}{celeba}" in tex and r"\multicolumn{2}{c}{imagenet}" in tex
    details = pd.read_csv(study_dir / "tables/fid_details.md", sep="|", skipinitialspace=True).iloc[1:]
    details.columns = [c.strip() for c in details.columns]
    # sFID is measured (the mean over seeds), IS is missing with the absent tensor named in the note
    assert set(details["IS"].str.strip()) == {"missing†"} and details["sFID"].astype(float).notna().all()
    cost = (study_dir / "tables/cost.md").read_text()
    for column in ("params (M)", "GFLOPs", "train_img_s", "sample_img_s"):
        assert column in cost


def test_figures_are_panel_grids_per_dataset(rendered):
    study_dir, _, _ = rendered
    names = {p.name for p in (study_dir / "figures").iterdir()}
    for d in SCALE:
        assert {f"psnr_curves_{d}.png", f"jacobian_eigvecs_{d}.png", f"attention_layer1_{d}.png"} <= names
        assert {f"attention_maps_{d}_{v}.png" for v in VARIANTS} <= names
    assert {"psnr_gap_bars.png", "fid_curve.png", "fid_vs_gflops.png", "samples.png"} <= names
    assert "attention_layer6_celeba.png" not in names  # a 2-layer model has no block 6


def test_missing_arrays_are_said_not_silently_skipped(tmp_path):
    study_dir, _ = write_study(tmp_path)
    sections = {s.title: s for s in report.build_report(study(), study_dir, tmp_path / "r.pdf")}
    assert "Attention maps" not in sections and "Samples" not in sections
    drawn_nothing = json.loads((study_dir / "tables/report_sections.json").read_text())["nothing_drawn"]
    assert drawn_nothing == ["Samples: no FID sample arrays", "Attention maps: no attention-map arrays"]
    assert sections["Not in this report"].pages == 1
    assert sections["Jacobian eigenvectors and spectra"].status == "rendered"  # spectra from the table, a line for the rest
    assert not (study_dir / "figures/jacobian_eigvecs_celeba.png").exists()


def test_freeu_grid_samples_and_gmm_masks(tmp_path):
    """Paper 000: the FID grid over (b, s), samples at the (b, s) points the config lists, learned masks."""
    study_dir = tmp_path / "studies/gmm_s"
    labels = {"uvit": "U-ViT", "uvit_gmm": "U-ViT + GMM"}
    s = {"name": "gmm_s", "title": "gmm", "variants": ["uvit", "uvit_gmm"], "baseline": "uvit", "N": [50], "seeds": [0],
         "labels": labels, "datasets": ["cifar"],
         "variant_specs": {"uvit": {"backbone": "uvit", "preset": "U"}, "uvit_gmm": {"backbone": "uvit", "preset": "U",
                                                                                   "options": {"gmm": True}}},
         "papers": ["000", "001"],
         "settings": {"freeu": {"b": [1.0, 1.8], "s": [1.0, 0.8], "sample_points": [[1.8, 0.8], [1.8, 0.85]]}}}
    psnr = pd.DataFrame([keys("cifar", v, 50, 0) | {"label": labels[v], "step": 0, "t": 10, "psnr_train": 30.0,
                                                    "psnr_test": 29.0, "gap": 1.0} for v in labels])
    write_parquet(psnr, study_dir / "psnr.parquet", {})
    grid = [keys("cifar", v, 50, 0) | {"label": labels[v], "b": b, "s": s_, "tau": 1, "fid": 10 * b + s_, "num_samples": 8,
                                       "sampling_steps": 5, "seconds": 1.0}
            for v in labels for b in (1.0, 1.8) for s_ in (1.0, 0.8)]
    write_parquet(pd.DataFrame(grid), study_dir / "freeu.parquet", {})
    gmm = [keys("cifar", "uvit_gmm", 50, 0) | {"label": labels["uvit_gmm"], "block": f"in_blocks.{i}", "block_index": i,
                                               "head": h, "kernel": 0, "alpha": 1.0, "sigma": 2.0, "mask_at_0": 1.0,
                                               "mask_mean": 0.5} for i in range(2) for h in range(2)]
    write_parquet(pd.DataFrame(gmm), study_dir / "gmm_masks.parquet", {})
    runs = []
    for v in labels:
        path = tmp_path / f"{v}.npz"
        per_point = {f"b{b}_s{s_}": np.full((4, 3, 4, 4), int(b * 100), np.uint8) for b in (1.0, 1.8) for s_ in (1.0, 0.8)}
        np.savez(path, **per_point)
        runs.append((f"cifar/{v}/N50/seed0", str(path)))
    cli.main(["aggregate-arrays", "--runs", json.dumps([k for k, _ in runs]), "--out",
              str(study_dir / "arrays/freeu.npz"), *[p for _, p in runs]])
    masks = tmp_path / "gmm.npz"
    np.savez(masks, **{f"in_blocks.{i}": np.ones((2, 4, 4), np.float32) for i in range(2)})
    cli.main(["aggregate-arrays", "--runs", json.dumps(["cifar/uvit_gmm/N50/seed0"]), "--out",
              str(study_dir / "arrays/gmm_masks.npz"), str(masks)])
    sections = {x.title: x for x in report.build_report(s, study_dir, tmp_path / "gmm_s.pdf")}
    assert sections["FreeU-style (b, s) scaling: FID grid"].status == "rendered"
    samples = sections["FreeU-style (b, s) scaling: samples"]
    # per run: a line saying (1.8, 0.85) was not evaluated, and the figure of the listed point that was
    assert samples.status == "rendered" and samples.pages == 4
    names = {p.name for p in (study_dir / "figures").iterdir()}
    assert {"freeu_fid.png", "freeu_samples_cifar_uvit_N50_seed0.png", "gmm_masks_cifar_uvit_gmm_N50.png"} <= names
    assert sections["Gaussian-mixture masks"].status == "rendered"


def test_the_psnr_caption_says_whether_x0_was_clipped():
    from diffbias.measurements.psnr import clip_note

    psnr = pd.DataFrame({"gap": [1.0, 2.0], "x0_clipped": [False, False]})
    assert "not clipped, as paper 004 eq. 3" in clip_note(psnr)
    assert "clip: true" in clip_note(psnr.assign(x0_clipped=True))
    assert clip_note(psnr.assign(x0_clipped=[True, False])).startswith("Mixed")
    assert "not recorded" in clip_note(psnr.drop(columns="x0_clipped"))


def _aligned_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference of two renderings at the best offset of at most one pixel each way."""
    best = np.inf
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            x, y = a[max(0, dy):, max(0, dx):], b[max(0, -dy):, max(0, -dx):]
            h, w = min(x.shape[0], y.shape[0]) - 1, min(x.shape[1], y.shape[1]) - 1
            best = min(best, float(np.abs(x[:h, :w].astype(int) - y[:h, :w].astype(int)).mean()))
    return best


@pytest.mark.parametrize("beyond_canvas", ["nothing", "padding", "label"])
def test_a_figure_png_is_matplotlibs_tight_crop_from_one_drawing(tmp_path, beyond_canvas):
    """The report draws each figure once for its PNG and crops it to the tight box: the PNG has the size and the
    pixels of savefig(bbox_inches="tight") (up to a pixel of placement), also when the box's padding or a label
    lies beyond the canvas."""
    from PIL import Image

    from diffbias.sections import plt, tight_png

    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(5, 2.5))
    axes[0].plot([0, 1, 2], [2, 0, 1], lw=2)
    axes[1].imshow(np.arange(64).reshape(8, 8), interpolation="nearest")
    axes[0].set_ylabel("PSNR gap (dB)")
    fig.suptitle("a title", y=1.0 if beyond_canvas == "padding" else 0.98, va="top")
    if beyond_canvas == "label":
        fig.text(1.05, 0.5, "beyond the right edge")
    fig.savefig(tmp_path / "reference.png", dpi=150, bbox_inches="tight")
    box = tight_png(fig, tmp_path / "one_draw.png", dpi=150)
    reference = np.asarray(Image.open(tmp_path / "reference.png"))
    ours = np.asarray(Image.open(tmp_path / "one_draw.png"))
    pyplot.close(fig)
    assert abs(ours.shape[0] - reference.shape[0]) <= 2 and abs(ours.shape[1] - reference.shape[1]) <= 2
    assert abs(box.width * 150 - reference.shape[1]) <= 2  # the box handed to the PDF page is the same crop
    assert _aligned_difference(ours, reference) < 1.0
    if beyond_canvas == "label":
        assert ours.shape[1] > 5 * 150  # wider than the canvas: the label is inside, not cut off
    if beyond_canvas == "padding":
        assert (ours[0, :, :3] == 255).all()  # the padding above the title: background beyond the canvas
