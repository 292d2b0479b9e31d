"""Command line used by the Snakemake rules: ``python -m diffbias <command> ...``.

Every command takes explicit paths and JSON specs, so a rule is one line and the library does the work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _threads(n: int | None) -> None:
    from .device import set_threads

    set_threads(n)


def cmd_validate(args) -> None:
    from .config import load_config, all_runs

    config = load_config(args.configfile)
    runs = all_runs(config)
    print(f"{args.configfile}: OK ({len(config['studies'])} studies, {len(runs)} distinct runs)")


def cmd_prepare_data(args) -> None:
    from .data import prepare_dataset

    prepare_dataset(json.loads(args.spec), args.out)


def cmd_train(args) -> None:
    from .train import EXIT_TIME_BUDGET, NonFiniteLossError, TimeBudgetReached, Trainer

    _threads(args.threads)
    trainer = Trainer(json.loads(args.spec), args.data, args.out_dir, args.checkpoint, device=args.device,
                      max_runtime_minutes=args.max_runtime_minutes, pca_basis=args.pca_basis)
    try:
        trainer.run()
    except TimeBudgetReached as exc:
        print(f"diffbias: {exc}", file=sys.stderr)
        sys.exit(EXIT_TIME_BUDGET)
    except NonFiniteLossError as exc:
        print(f"diffbias: {exc}", file=sys.stderr)
        sys.exit(1)


def _settings(args, *section: str) -> dict:
    """The command's resolved config section (``--config`` JSON), validated and completed with the schema's
    defaults: the schema holds the only defaults, as for the training spec."""
    from .config import section_settings

    return section_settings(section, json.loads(args.config))


def _write_npz(path: str, **arrays) -> None:
    import numpy as np

    from .io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def _run_table(df, trained, out: str, **meta) -> None:
    """A per-run table: the run's keys as columns, its spec and provenance in the parquet metadata."""
    from .io import provenance, write_parquet

    for key, value in trained.run.items():
        df[key] = value
    write_parquet(df, out, {"spec": trained.spec, **meta, "provenance": provenance(None, str(trained.device))})


def _load_run(args):
    from .runs import TrainedRun

    _threads(args.threads)
    return TrainedRun.load(args.model, args.data, args.device)


def cmd_psnr(args) -> None:
    from .metrics.psnr import psnr_gap

    cfg = _settings(args, "evaluation", "psnr")
    trained = _load_run(args)
    k = cfg["num_images"]
    train, test = trained.train_images(k), trained.test_images(k)  # all N training images when N < K
    df = psnr_gap(trained.model, train.x, test.x, train_labels=train.y, test_labels=test.y,
                  respacing=cfg["respacing"], noise_seed=cfg["noise_seed"], batch_size=cfg["batch_size"],
                  clip=cfg["clip"])
    df["x0_clipped"] = cfg["clip"]
    _run_table(df, trained, args.out, psnr={"K_train": len(train), "K_test": len(test), **cfg})
    print(f"[psnr {trained.run}] mean gap {df['gap'].mean():.3f} dB over {len(df)} steps (K={len(train)}/{len(test)}, "
          f"x0 clipped: {cfg['clip']})")


def _load_reference_features(args, trained, cfg: dict) -> "torch.Tensor":
    """The reference set's Inception features: from the shared `fid-reference` file when given (computed once
    per dataset, N and seed for every variant), else computed here from the same images."""
    import numpy as np
    import torch

    from .metrics.fid import inception_features

    if getattr(args, "reference_features", None):
        with np.load(args.reference_features) as f:
            expected = {"N": trained.run["N"], "seed": trained.run["seed"], "reference": cfg["reference"],
                        "max_reference": cfg["max_reference"]}
            found = {k: (f[k].item() if f[k].shape == () else f[k].tolist()) for k in expected}
            if found != expected:
                raise SystemExit(f"{args.reference_features} was computed for {found}, this run needs {expected}")
            return torch.from_numpy(f["features"])
    reference = trained.reference_images(cfg["reference"], cfg["max_reference"])
    return inception_features(reference, device=str(trained.device), cpu_threads=args.threads)


def cmd_fid_reference(args) -> None:
    """Inception features of one FID reference set (dataset, N, seed), shared by every variant's FID jobs."""
    import numpy as np

    from . import data as data_lib
    from .metrics.fid import inception_features
    from .runs import reference_indices
    from .device import resolve_device

    _threads(args.threads)
    cfg = _settings(args, "evaluation", "fid")
    images, _, _ = data_lib.load_prepared(args.data)
    idx = reference_indices(len(images), args.n, args.test_size, args.seed, cfg["reference"], cfg["max_reference"])
    feats = inception_features(images[idx], device=str(resolve_device(args.device)), cpu_threads=args.threads)
    _write_npz(args.out, features=feats.numpy(), N=args.n, seed=args.seed, reference=cfg["reference"],
               max_reference=cfg["max_reference"])
    print(f"[fid-reference N={args.n} seed={args.seed}] {len(idx)} {cfg['reference']} images -> {args.out}")


def _fid_of(trained, cfg: dict, reference, threads, model=None) -> tuple[dict, "np.ndarray", float, float]:
    """Sample with the FID settings (labels uniform over the classes when class-conditional) and score."""
    import time

    from .metrics.fid import inception_features, metrics_from_features

    t0 = time.perf_counter()
    samples = trained.sample(cfg["num_samples"], steps=cfg["steps"], seed=cfg["sample_seed"],
                             batch_size=cfg["batch_size"], guidance_scale=cfg["guidance_scale"], model=model)
    sampling_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    features = inception_features(samples, device=str(trained.device), cpu_threads=threads)
    metrics = metrics_from_features(features, reference, cpu_threads=threads)
    return metrics, samples, sampling_s, time.perf_counter() - t0


def cmd_fid(args) -> None:
    import pandas as pd

    cfg = _settings(args, "evaluation", "fid")
    trained = _load_run(args)
    reference = _load_reference_features(args, trained, cfg)
    metrics, samples, sampling_s, metric_s = _fid_of(trained, cfg, reference, args.threads)
    _write_npz(args.samples_out, samples=samples)
    row = {**trained.run, **metrics, "sampling_steps": cfg["steps"], "reference": cfg["reference"], "step": trained.step,
           "guidance_scale": cfg["guidance_scale"], "class_conditional": trained.num_classes > 0,
           "sampling_s": sampling_s, "metric_s": metric_s, "sampling_images_per_s": cfg["num_samples"] / sampling_s}
    _run_table(pd.DataFrame([row]), trained, args.out, fid=cfg)
    print(f"[fid {trained.run}] FID {metrics['fid']:.2f}, KID {metrics['kid_mean']:.4f} +- {metrics['kid_std']:.4f} from "
          f"{len(samples)} samples vs {len(reference)} reference images "
          f"(sampling {sampling_s:.0f}s, inception {metric_s:.0f}s)")


def cmd_freeu_grid(args) -> None:
    """Seed 000 sec. 3.2: FreeU-style (b, s) scaling at inference on ONE trained U-ViT, no retraining."""
    import itertools
    import time

    import pandas as pd

    from .metrics.fid import inception_features
    from .models.uvit import freeu_scaling

    grid = _settings(args, "studies", "*", "freeu_grid")
    trained = _load_run(args)
    cfg = {"num_samples": grid["num_samples"], "steps": grid["steps"], "sample_seed": grid["sample_seed"],
           "batch_size": grid["batch_size"], "guidance_scale": grid["guidance_scale"]}
    reference = inception_features(trained.reference_images("train", grid["max_reference"]), device=str(trained.device),
                                   cpu_threads=args.threads)  # once per grid
    rows, samples_kept = [], {}
    for b, s in itertools.product(grid["b"], grid["s"]):
        t0 = time.perf_counter()
        with freeu_scaling(trained.model, b=b, s=s, tau=grid["tau"]):  # the same seeds for every (b, s): paired
            metrics, samples, _, _ = _fid_of(trained, cfg, reference, args.threads)
        rows.append({**trained.run, "b": b, "s": s, "tau": grid["tau"], **metrics, "sampling_steps": grid["steps"],
                     "seconds": time.perf_counter() - t0})
        samples_kept[f"b{b}_s{s}"] = samples[: grid["keep"]]
        print(f"[freeu {trained.run['variant']}] b={b} s={s} FID {metrics['fid']:.2f}", flush=True)
    _run_table(pd.DataFrame(rows), trained, args.out, freeu_grid=grid)
    _write_npz(args.samples_out, **samples_kept)


def cmd_fid_curve(args) -> None:
    """Seed 002 figs. 11-12: FID of every EMA snapshot and of the final model, against one reference set.

    With ``--final-fid`` (the run's own fid.parquet: same model, sample seeds and reference) the final point is
    read from it instead of being sampled and scored a second time.
    """
    import pandas as pd

    cfg = _settings(args, "evaluation", "fid")
    trained = _load_run(args)
    snapshots = sorted(Path(args.snapshots).glob("ema_*.pt"))
    reference = _load_reference_features(args, trained, cfg)
    rows, final_row = [], None
    if args.final_fid:
        final_row = pd.read_parquet(args.final_fid).iloc[0].to_dict()
        same = (final_row["step"] == trained.step and final_row["num_samples"] == cfg["num_samples"]
                and final_row["sampling_steps"] == cfg["steps"] and final_row["reference"] == cfg["reference"])
        if not same:
            raise SystemExit(f"{args.final_fid} was computed with other settings than this FID curve")
    else:
        snapshots.append(Path(args.model))
    for path in snapshots:
        model, ckpt = (trained.model, trained.checkpoint) if path == Path(args.model) else trained.load_model(path)
        metrics, _, sampling_s, metric_s = _fid_of(trained, cfg, reference, args.threads, model=model)  # same seeds
        rows.append({**trained.run, "step": ckpt["step"], "final": path == Path(args.model), **metrics,
                     "sampling_steps": cfg["steps"], "reference": cfg["reference"], "sampling_s": sampling_s,
                     "metric_s": metric_s})
        print(f"[fid-curve {trained.run['variant']} N={trained.run['N']}] step {ckpt['step']}: FID {metrics['fid']:.2f} "
              f"(sampling {sampling_s:.0f}s, inception {metric_s:.0f}s)", flush=True)
    if final_row is not None:
        keep = set(rows[0]) if rows else set(final_row)
        rows.append({**{k: v for k, v in final_row.items() if k in keep}, "final": True})
    _run_table(pd.DataFrame(rows), trained, args.out, fid=cfg)


def cmd_pca_basis(args) -> None:
    """Seed 004 appendix C: principal components of a trained baseline's attention maps."""
    from .io import provenance, save_torch
    from .pca_basis import collect_pca_basis

    req = json.loads(args.spec)
    trained = _load_run(args)
    test = trained.test_images(req["num_images"])  # the seed uses test images
    components = collect_pca_basis(trained.model, test.x, layers=tuple(req["layers"]), steps=tuple(req["steps"]),
                                   respacing=req["respacing"], num_components=req["components"], labels=test.y)
    save_torch({"components": components, "request": req, "source": trained.run,
                "provenance": provenance(None, str(trained.device))}, args.out)


def cmd_jacobian(args) -> None:
    """Seed 004 sec. 2.2 / A.4: eigen-analysis of the denoiser Jacobian at held-out images."""
    import numpy as np

    from .metrics.jacobian import jacobian_analysis

    cfg = _settings(args, "evaluation", "jacobian")
    trained = _load_run(args)
    images = trained.test_images(cfg["num_images"])  # held-out: none of the models has seen them
    df, vecs = jacobian_analysis(trained.model, images.x, cfg["t"], labels=images.y, chunk_size=cfg["chunk_size"],
                                 top_k=cfg["top_k"], method=cfg["method"], block_size=cfg["block_size"],
                                 max_products=cfg["max_products"], tol=cfg["tol"])
    _run_table(df, trained, args.out, jacobian=cfg)
    _write_npz(args.vectors_out, eigenvectors=vecs.numpy(), t=np.array(cfg["t"]))


def cmd_cost(args) -> None:
    """GPU-hours of a config's training and evaluation jobs, from FLOP counts and a throughput (no job runs)."""
    from .config import load_config
    from .cost import format_summary, gpu_hours

    config = load_config(args.configfile)
    runs, summary, note = gpu_hours(config, tflops=args.throughput_tflops, benchmark=args.benchmark)
    print(format_summary(summary, note, args.configfile))
    if args.out:
        from .io import write_parquet

        write_parquet(runs, args.out, {"summary": summary.to_dict(orient="records"), "throughput": note})


def cmd_attention(args) -> None:
    """Seed 004 sec. 2.3 / app. B, figs. 4 and 9-11: locality of attention maps per layer, and the maps of the
    analysed images at the first t (head-averaged), with the images themselves."""
    import numpy as np
    import pandas as pd
    import torch

    from . import data as data_lib
    from .metrics.attention_maps import attention_analysis, attention_maps
    from .metrics.jacobian import noisy_input

    cfg = _settings(args, "evaluation", "attention")
    trained = _load_run(args)
    images = trained.test_images(cfg["num_images"])
    has_attention = bool(getattr(trained.model, "records_attention", False))
    # Attention-free backbones (DiffuSSM, DICE) get an empty table: nothing to measure, nothing invented.
    df = attention_analysis(trained.model, images.x, cfg["t"], labels=images.y) if has_attention else pd.DataFrame(
        {c: pd.Series(dtype=t) for c, t in [("layer", "int64"), ("head", "str"), ("t", "int64"), ("metric", "str"),
                                            ("value", "float64"), ("grid_h", "int64"), ("grid_w", "int64")]})
    _run_table(df, trained, args.out, attention=cfg)
    t0 = cfg["t"][0]
    x_t = torch.stack([noisy_input(img, t0, noise_seed=i) for i, img in enumerate(images.x)])
    with torch.no_grad():
        maps = attention_maps(trained.model, x_t, t0, images.y) if has_attention else []
    per_layer = {f"layer{i + 1}": m.mean(1).half().cpu().numpy() for i, m in enumerate(maps)}  # head-averaged
    _write_npz(args.maps_out, t=np.array(t0), images=data_lib.from_model_range(images.x).cpu().numpy(), **per_layer)


def cmd_gmm_masks(args) -> None:
    """Seed 000 appendix: the learned Gaussian-mixture masks per head and block of a trained U-ViT."""
    from .io import provenance, write_parquet
    from .metrics.gmm_masks import gmm_mask_summary
    from .train import load_trained

    _threads(args.threads)
    model, ckpt = load_trained(args.model, "cpu")
    df, centre_maps = gmm_mask_summary(model)
    if df.empty:
        raise SystemExit(f"{args.model}: the model has no Gaussian-mixture masks (set options.gmm: true)")
    for key, value in ckpt["spec"]["run"].items():
        df[key] = value
    write_parquet(df, args.out, {"spec": ckpt["spec"], "provenance": provenance(None, "cpu")})
    _write_npz(args.maps_out, **centre_maps)


def cmd_measure(args) -> None:
    """A registered plugin measurement (diffbias.measurements): its compute on the trained run with its resolved
    config section (schema defaults filled); one parquet table with the run's keys added."""
    from .measurements import plugins

    registered = plugins()
    if args.name not in registered:
        raise SystemExit(f"unknown plugin measurement {args.name!r}; registered: {sorted(registered)}")
    m = registered[args.name]
    cfg = _settings(args, "evaluation", m.config_key) if m.config_key else json.loads(args.config)
    trained = _load_run(args)
    df = m.compute(trained, cfg)
    _run_table(df, trained, args.out, measurement=m.name, config=cfg)


def cmd_counts(args) -> None:
    """Parameters and FLOPs of every variant of a study at its data set's shape (one row per variant)."""
    import pandas as pd

    from .io import provenance, write_parquet
    from .metrics.flops import count_flops, count_parameters, format_published, published_counts
    from .models import PRESETS, build_model

    study = json.loads(args.study)
    rows, ops = [], []
    for variant, v in study["variant_specs"].items():
        ds = study["dataset_specs"][study["count_dataset"]]
        model = build_model(v["backbone"], None, v["options"], input_size=ds["resolution"], in_channels=ds["channels"]).eval()
        macs, table = count_flops(model, input_size=ds["resolution"], in_channels=ds["channels"])
        ref = PRESETS[v["preset"]].reference if v.get("preset") in PRESETS else {}
        rows.append({"variant": variant, "label": study["labels"].get(variant, variant), "backbone": v["backbone"],
                     "preset": v.get("preset"), "params": count_parameters(model), "gmacs": macs / 1e9,
                     "input": f"{ds['channels']}x{ds['resolution']}x{ds['resolution']}",
                     "reference_params": ref.get("params"), "reference_gflops": ref.get("gflops"),
                     # every published count of the preset vs ours at its input, under its own convention
                     "published": format_published(published_counts(v["preset"], v["options"])) if v.get("preset") else ""})
        table = table.assign(variant=variant)
        ops.append(table)
    write_parquet(pd.DataFrame(rows), args.out, {"study": study, "provenance": provenance()})
    write_parquet(pd.concat(ops, ignore_index=True), args.ops_out, {"study": study})


def cmd_aggregate(args) -> None:
    from .analysis import aggregate_parquets

    aggregate_parquets(args.inputs, args.out, study=json.loads(args.study))


def cmd_report(args) -> None:
    from .report import build_report

    build_report(json.loads(args.study), args.study_dir, args.out)


def cmd_aggregate_arrays(args) -> None:
    """Pack a study's per-run arrays (.npz) into one study-level .npz keyed by run, for the report."""
    from .analysis import aggregate_arrays

    aggregate_arrays(args.inputs, json.loads(args.runs), args.out, max_items=args.max_items)


def cmd_encode_latents(args) -> None:
    """Encode a data set once into sharded float16 autoencoder latents (resumable; diffbias.latents)."""
    from .latents import encode_dataset

    _threads(args.threads)
    meta = encode_dataset(json.loads(args.spec), args.out, device=args.device, batch_size=args.batch_size,
                          workers=args.workers)
    print(f"[encode-latents] {args.out}: {meta['count']} images -> {meta['latent_shape']} {meta['dtype']} "
          f"({meta['posterior']}{', with mirrored twins' if meta['hflip'] else ''}), {len(meta['shards'])} shards")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="diffbias", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate a config file and count its runs")
    p.add_argument("configfile")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("prepare-data", help="load, resize and cache a data set as .npz")
    p.add_argument("--spec", required=True, help="dataset entry of the config, as JSON")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prepare_data)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    p = sub.add_parser("train", parents=[common], help="train one run (resumes from --checkpoint)")
    p.add_argument("--spec", required=True, help="run spec JSON (diffbias.config.run_spec)")
    p.add_argument("--data", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--checkpoint", required=True, help="side path for resumable checkpoints")
    p.add_argument("--max-runtime-minutes", type=float, default=None,
                   help="job time limit: checkpoint and exit with code 75 shortly before it")
    p.add_argument("--pca-basis", default=None, help="principal components for PCA-attention variants")
    p.set_defaults(func=cmd_train)

    # Measurements: --config is the resolved config section as JSON (the schema holds the only defaults).
    measure_common = argparse.ArgumentParser(add_help=False, parents=[common])
    for flag in ("--model", "--data", "--out"):
        measure_common.add_argument(flag, required=True)
    measure_common.add_argument("--config", default="{}", help="the measurement's config section, as JSON")

    p = sub.add_parser("psnr", parents=[measure_common], help="PSNR gap curve of a trained run (evaluation.psnr)")
    p.set_defaults(func=cmd_psnr)

    fid_common = argparse.ArgumentParser(add_help=False, parents=[measure_common])  # fid and fid-curve
    fid_common.add_argument("--reference-features", default=None,
                            help="the shared fid-reference file of this run's (dataset, N, seed); else computed here")

    p = sub.add_parser("fid", parents=[fid_common], help="sample from the EMA model and compute FID/KID/precision/recall "
                       "(evaluation.fid)")
    p.add_argument("--samples-out", required=True)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("fid-curve", parents=[fid_common], help="FID of a run's EMA snapshots and final model "
                       "(evaluation.fid's settings)")
    p.add_argument("--snapshots", required=True, help="the run's ema_snapshots/ folder")
    p.add_argument("--final-fid", default=None, help="the run's fid.parquet: its row is the curve's final point")
    p.set_defaults(func=cmd_fid_curve)

    p = sub.add_parser("fid-reference", parents=[common], help="Inception features of one FID reference set")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True, help="training-set size N of the runs it serves")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--test-size", type=int, required=True, help="the data set's test_size (defines the split)")
    p.add_argument("--config", default="{}", help="evaluation.fid, as JSON (reference, max_reference)")
    p.set_defaults(func=cmd_fid_reference)

    p = sub.add_parser("freeu-grid", parents=[measure_common], help="FID over a FreeU-style (b, s) grid on one "
                       "trained U-ViT (studies.<study>.freeu_grid)")
    p.add_argument("--samples-out", required=True)
    p.set_defaults(func=cmd_freeu_grid)

    p = sub.add_parser("pca-basis", parents=[common], help="PCs of a trained baseline's attention maps")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--spec", required=True, help="JSON: layers, components, num_images, steps, respacing")
    p.set_defaults(func=cmd_pca_basis)

    p = sub.add_parser("jacobian", parents=[measure_common], help="denoiser Jacobian eigen-analysis of a trained run "
                       "(evaluation.jacobian)")
    p.add_argument("--vectors-out", required=True)
    p.set_defaults(func=cmd_jacobian)

    p = sub.add_parser("cost", help="training and evaluation GPU-hours of a config, before running it")
    p.add_argument("--configfile", required=True)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--throughput-tflops", type=float, default=None,
                      help="sustained TFLOP/s per GPU (default 124.8 = 40%% of an A100's 312 bf16)")
    rate.add_argument("--benchmark", default=None, help="a benchmark training.parquet measured on the node type")
    p.add_argument("--out", default=None, help="optional parquet of the per-run GPU-hours")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("attention", parents=[measure_common], help="attention-map locality of a trained run "
                       "(evaluation.attention)")
    p.add_argument("--maps-out", required=True)
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("gmm-masks", parents=[common], help="learned Gaussian-mixture masks of a U-ViT run")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--maps-out", required=True, help="npz: per block, the centre token's mask (heads, g, g)")
    p.set_defaults(func=cmd_gmm_masks)

    p = sub.add_parser("measure", parents=[measure_common], help="a registered plugin measurement of a trained run")
    p.add_argument("name", help="the measurement's registry name (diffbias.measurements)")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("counts", help="parameters and FLOPs (fvcore MACs) of a study's variants")
    p.add_argument("--study", required=True, help="study description JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--ops-out", required=True, help="per-operator breakdown parquet")
    p.set_defaults(func=cmd_counts)

    p = sub.add_parser("aggregate", help="concatenate per-run parquet files into one tidy study table")
    p.add_argument("--study", required=True, help="study description JSON")
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("report", help="figures, tables and the PDF report of a study")
    p.add_argument("--study", required=True, help="study description JSON")
    p.add_argument("--study-dir", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("aggregate-arrays", help="pack per-run .npz arrays into one study-level .npz keyed by run")
    p.add_argument("--runs", required=True, help="JSON list of run keys (dataset/variant/N<n>/seed<s>), one per input")
    p.add_argument("--max-items", type=int, default=None, help="keep the first items along the first axis (a preview)")
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_aggregate_arrays)

    p = sub.add_parser("encode-latents", parents=[common], help="encode a data set into autoencoder latents "
                       "(dataset.latents), once, resumable")
    p.add_argument("--spec", required=True, help="dataset entry of the config, as JSON, with a latents section")
    p.add_argument("--out", required=True, help="cache folder (meta.json is written last)")
    p.add_argument("--batch-size", type=int, default=64, help="images per autoencoder call")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes reading and cropping images")
    p.set_defaults(func=cmd_encode_latents)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
