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
    if n:
        import torch

        torch.set_num_threads(n)


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


def cmd_psnr(args) -> None:
    import torch

    from . import data as data_lib
    from .io import provenance, write_parquet
    from .metrics.psnr import psnr_gap
    from .train import load_trained, resolve_device

    _threads(args.threads)
    device = resolve_device(args.device)
    model, ckpt = load_trained(args.model, device)
    spec = ckpt["spec"]
    images, _, _ = data_lib.load_prepared(args.data)
    run = spec["run"]
    train_idx, test_idx = data_lib.split_indices(len(images), run["N"], spec["dataset"]["test_size"], run["seed"])
    k = args.num_images
    train = data_lib.to_model_range(images[train_idx[:k]])  # all of them when N < K
    test = data_lib.to_model_range(images[test_idx[:k]])
    df = psnr_gap(model, train, test, respacing=args.respacing, noise_seed=args.noise_seed, batch_size=args.batch_size)
    for key, value in run.items():
        df[key] = value
    meta = {"spec": spec, "provenance": provenance(None, str(device)),
            "psnr": {"K_train": len(train), "K_test": len(test), "respacing": args.respacing, "noise_seed": args.noise_seed}}
    write_parquet(df, args.out, meta)
    print(f"[psnr {run}] mean gap {df['gap'].mean():.3f} dB over {len(df)} steps (K={len(train)}/{len(test)})")


def _reference_images(spec: dict, images, which: str, max_reference: int):
    """The FID reference set of a run: the first min(N, max_reference) of its training images (seed 004
    A.2, 50k cap) or of the held-out test set, in the run's deterministic split."""
    from . import data as data_lib

    run = spec["run"]
    train_idx, test_idx = data_lib.split_indices(len(images), run["N"], spec["dataset"]["test_size"], run["seed"])
    pool = train_idx if which == "train" else test_idx
    return images[pool[: min(len(pool), max_reference)]]


def _load_reference_features(args, spec: dict, images, device) -> "torch.Tensor":
    """The reference set's Inception features: from the shared `fid-reference` file when given (computed once
    per dataset, N and seed for every variant), else computed here from the same images."""
    import numpy as np
    import torch

    from .metrics.fid import inception_features

    if getattr(args, "reference_features", None):
        with np.load(args.reference_features) as f:
            expected = {"N": spec["run"]["N"], "seed": spec["run"]["seed"], "reference": args.reference,
                        "max_reference": args.max_reference}
            found = {k: (f[k].item() if f[k].shape == () else f[k].tolist()) for k in expected}
            if found != expected:
                raise SystemExit(f"{args.reference_features} was computed for {found}, this run needs {expected}")
            return torch.from_numpy(f["features"])
    reference = _reference_images(spec, images, args.reference, args.max_reference)
    return inception_features(reference, device=str(device), cpu_threads=args.threads)


def cmd_fid_reference(args) -> None:
    """Inception features of one FID reference set (dataset, N, seed), shared by every variant's FID jobs."""
    import numpy as np

    from . import data as data_lib
    from .io import atomic_path
    from .metrics.fid import inception_features
    from .train import resolve_device

    _threads(args.threads)
    images, _, _ = data_lib.load_prepared(args.data)
    spec = {"run": {"N": args.n, "seed": args.seed}, "dataset": {"test_size": args.test_size}}
    reference = _reference_images(spec, images, args.reference, args.max_reference)
    feats = inception_features(reference, device=str(resolve_device(args.device)), cpu_threads=args.threads)
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, features=feats.numpy(), N=args.n, seed=args.seed, reference=args.reference,
                     max_reference=args.max_reference)
    print(f"[fid-reference N={args.n} seed={args.seed}] {len(reference)} {args.reference} images -> {args.out}")


def cmd_fid(args) -> None:
    import time

    import numpy as np
    import pandas as pd

    from . import data as data_lib
    from .io import atomic_path, provenance, write_parquet
    from .metrics.fid import inception_features, metrics_from_features
    from .sampling import sample_images
    from .train import load_trained, resolve_device

    _threads(args.threads)
    device = resolve_device(args.device)
    model, ckpt = load_trained(args.model, device)
    spec, run = ckpt["spec"], ckpt["spec"]["run"]
    images, _, _ = data_lib.load_prepared(args.data)
    reference = _load_reference_features(args, spec, images, device)
    shape = tuple(images.shape[1:])
    t0 = time.perf_counter()
    samples = sample_images(model, args.num_samples, image_shape=shape, steps=args.steps, seed=args.sample_seed,
                            batch_size=args.batch_size)
    sampling_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    features = inception_features(samples, device=str(device), cpu_threads=args.threads)
    metrics = metrics_from_features(features, reference, cpu_threads=args.threads)
    metric_s = time.perf_counter() - t0
    with atomic_path(args.samples_out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, samples=samples)
    row = {**run, **metrics, "sampling_steps": args.steps, "reference": args.reference, "step": ckpt["step"],
           "sampling_s": sampling_s, "metric_s": metric_s, "sampling_images_per_s": args.num_samples / sampling_s}
    meta = {"spec": spec, "provenance": provenance(None, str(device))}
    write_parquet(pd.DataFrame([row]), args.out, meta)
    print(f"[fid {run}] FID {metrics['fid']:.2f}, KID {metrics['kid_mean']:.4f} +- {metrics['kid_std']:.4f} from "
          f"{len(samples)} samples vs {len(reference)} reference images "
          f"(sampling {sampling_s:.0f}s, inception {metric_s:.0f}s)")


def cmd_freeu_grid(args) -> None:
    """Seed 000 sec. 3.2: FreeU-style (b, s) scaling at inference on ONE trained U-ViT, no retraining."""
    import itertools
    import time

    import numpy as np
    import pandas as pd

    from . import data as data_lib
    from .io import atomic_path, provenance, write_parquet
    from .metrics.fid import inception_features, metrics_from_features
    from .models.uvit import freeu_scaling
    from .sampling import sample_images
    from .train import load_trained, resolve_device

    _threads(args.threads)
    device = resolve_device(args.device)
    model, ckpt = load_trained(args.model, device)
    spec, run = ckpt["spec"], ckpt["spec"]["run"]
    images, _, _ = data_lib.load_prepared(args.data)
    reference = inception_features(_reference_images(spec, images, "train", args.max_reference), device=str(device),
                                   cpu_threads=args.threads)  # once per grid
    rows, grids = [], {}
    for b, s in itertools.product(args.b, args.s):
        t0 = time.perf_counter()
        with freeu_scaling(model, b=b, s=s, tau=args.tau):  # the same seeds for every (b, s): paired samples
            samples = sample_images(model, args.num_samples, image_shape=tuple(images.shape[1:]), steps=args.steps,
                                    seed=args.sample_seed, batch_size=args.batch_size)
        features = inception_features(samples, device=str(device), cpu_threads=args.threads)
        metrics = metrics_from_features(features, reference, cpu_threads=args.threads)
        rows.append({**run, "b": b, "s": s, "tau": args.tau, **metrics, "sampling_steps": args.steps,
                     "seconds": time.perf_counter() - t0})
        grids[f"b{b}_s{s}"] = samples[: args.keep]
        print(f"[freeu {run['variant']}] b={b} s={s} FID {metrics['fid']:.2f}", flush=True)
    write_parquet(pd.DataFrame(rows), args.out, {"spec": spec, "provenance": provenance(None, str(device))})
    with atomic_path(args.samples_out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **grids)


def cmd_fid_curve(args) -> None:
    """Seed 002 figs. 11-12: FID of every EMA snapshot and of the final model, against one reference set.

    With ``--final-fid`` (the run's own fid.parquet: same model, sample seeds and reference) the final point is
    read from it instead of being sampled and scored a second time.
    """
    import time

    import pandas as pd

    from . import data as data_lib
    from .io import provenance, write_parquet
    from .metrics.fid import inception_features, metrics_from_features
    from .sampling import sample_images
    from .train import load_trained, resolve_device

    _threads(args.threads)
    device = resolve_device(args.device)
    snapshots = sorted(Path(args.snapshots).glob("ema_*.pt"))
    _, final = load_trained(args.model, "cpu")
    spec, run = final["spec"], final["spec"]["run"]
    images, _, _ = data_lib.load_prepared(args.data)
    reference = _load_reference_features(args, spec, images, device)
    rows = []
    final_row = None
    if args.final_fid:
        final_row = pd.read_parquet(args.final_fid).iloc[0].to_dict()
        same = (final_row["step"] == final["step"] and final_row["num_samples"] == args.num_samples
                and final_row["sampling_steps"] == args.steps and final_row["reference"] == args.reference)
        if not same:
            raise SystemExit(f"{args.final_fid} was computed with other settings than this FID curve")
    else:
        snapshots.append(Path(args.model))
    for path in snapshots:
        model, ckpt = load_trained(path, device)
        t0 = time.perf_counter()
        samples = sample_images(model, args.num_samples, image_shape=tuple(images.shape[1:]), steps=args.steps,
                                seed=args.sample_seed, batch_size=args.batch_size)  # same seeds at every step
        sampling_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        features = inception_features(samples, device=str(device), cpu_threads=args.threads)
        metrics = metrics_from_features(features, reference, cpu_threads=args.threads)
        rows.append({**run, "step": ckpt["step"], "final": path == Path(args.model), **metrics,
                     "sampling_steps": args.steps, "reference": args.reference, "sampling_s": sampling_s,
                     "metric_s": time.perf_counter() - t0})
        print(f"[fid-curve {run['variant']} N={run['N']}] step {ckpt['step']}: FID {metrics['fid']:.2f} "
              f"(sampling {sampling_s:.0f}s, inception {rows[-1]['metric_s']:.0f}s)", flush=True)
    if final_row is not None:
        keep = set(rows[0]) if rows else set(final_row)
        rows.append({**{k: v for k, v in final_row.items() if k in keep}, "final": True})
    write_parquet(pd.DataFrame(rows), args.out, {"spec": spec, "provenance": provenance(None, str(device))})


def cmd_pca_basis(args) -> None:
    """Seed 004 appendix C: principal components of a trained baseline's attention maps."""
    from . import data as data_lib
    from .io import provenance, save_torch
    from .metrics.attention_maps import collect_pca_basis
    from .train import load_trained, resolve_device

    _threads(args.threads)
    req = json.loads(args.spec)
    device = resolve_device(args.device)
    model, ckpt = load_trained(args.model, device)
    spec, run = ckpt["spec"], ckpt["spec"]["run"]
    images, _, _ = data_lib.load_prepared(args.data)
    _, test_idx = data_lib.split_indices(len(images), run["N"], spec["dataset"]["test_size"], run["seed"])
    test = data_lib.to_model_range(images[test_idx[: req["num_images"]]])  # the seed uses test images
    components = collect_pca_basis(model, test, layers=tuple(req["layers"]), steps=tuple(req["steps"]),
                                   respacing=req["respacing"], num_components=req["components"])
    save_torch({"components": components, "request": req, "source": run, "provenance": provenance(None, str(device))}, args.out)


def _test_images(ckpt, data_path, k):
    from . import data as data_lib

    spec, run = ckpt["spec"], ckpt["spec"]["run"]
    images, _, _ = data_lib.load_prepared(data_path)
    _, test_idx = data_lib.split_indices(len(images), run["N"], spec["dataset"]["test_size"], run["seed"])
    return data_lib.to_model_range(images[test_idx[:k]])  # held-out images: none of the models has seen them


def cmd_jacobian(args) -> None:
    """Seed 004 sec. 2.2 / A.4: eigen-analysis of the denoiser Jacobian at held-out images."""
    import numpy as np

    from .io import atomic_path, provenance, write_parquet
    from .metrics.jacobian import jacobian_analysis
    from .train import load_trained, resolve_device

    _threads(args.threads)
    device = resolve_device(args.device)
    model, ckpt = load_trained(args.model, device)
    images = _test_images(ckpt, args.data, args.num_images)
    df, vecs = jacobian_analysis(model, images, args.t, chunk_size=args.chunk_size, top_k=args.top_k, method=args.method,
                                 block_size=args.block_size, max_products=args.max_products, tol=args.tol)
    for key, value in ckpt["spec"]["run"].items():
        df[key] = value
    write_parquet(df, args.out, {"spec": ckpt["spec"], "provenance": provenance(None, str(device))})
    with atomic_path(args.vectors_out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, eigenvectors=vecs.numpy(), t=np.array(args.t))


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
    """Seed 004 sec. 2.3 / app. B: locality of attention maps per layer, and the maps of one image."""
    import numpy as np
    import pandas as pd
    import torch

    from .io import atomic_path, provenance, write_parquet
    from .metrics.attention_maps import attention_analysis, attention_maps
    from .metrics.jacobian import noisy_input
    from .train import load_trained, resolve_device

    _threads(args.threads)
    device = resolve_device(args.device)
    model, ckpt = load_trained(args.model, device)
    from .models.layers import RecordsAttention

    images = _test_images(ckpt, args.data, args.num_images)
    has_attention = any(isinstance(m, RecordsAttention) for m in model.modules())
    # Attention-free backbones (DiffuSSM, DICE) get an empty table: nothing to measure, nothing invented.
    df = attention_analysis(model, images, args.t) if has_attention else pd.DataFrame(
        {c: pd.Series(dtype=t) for c, t in [("layer", "int64"), ("head", "str"), ("t", "int64"), ("metric", "str"),
                                            ("value", "float64"), ("grid_h", "int64"), ("grid_w", "int64")]})
    for key, value in ckpt["spec"]["run"].items():
        df[key] = value
    write_parquet(df, args.out, {"spec": ckpt["spec"], "provenance": provenance(None, str(device))})
    x_t = torch.stack([noisy_input(img, args.t[0], noise_seed=i) for i, img in enumerate(images)])
    with torch.no_grad():
        maps = attention_maps(model, x_t, args.t[0]) if has_attention else []
    per_layer = {f"layer{i + 1}": m.mean(1).half().cpu().numpy() for i, m in enumerate(maps)}  # head-averaged
    with atomic_path(args.maps_out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, t=np.array(args.t[0]), **per_layer)


def cmd_gmm_masks(args) -> None:
    """Seed 000 appendix: the learned Gaussian-mixture masks per head and block of a trained U-ViT."""
    import numpy as np

    from .io import atomic_path, provenance, write_parquet
    from .metrics.attention_maps import gmm_mask_summary
    from .train import load_trained

    _threads(args.threads)
    model, ckpt = load_trained(args.model, "cpu")
    df, centre_maps = gmm_mask_summary(model)
    if df.empty:
        raise SystemExit(f"{args.model}: the model has no Gaussian-mixture masks (set options.gmm: true)")
    for key, value in ckpt["spec"]["run"].items():
        df[key] = value
    write_parquet(df, args.out, {"spec": ckpt["spec"], "provenance": provenance(None, "cpu")})
    with atomic_path(args.maps_out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **centre_maps)


def cmd_measure(args) -> None:
    """A registered plugin measurement (diffbias.measurements): its compute on the run's EMA model and held-out
    images, with its resolved config section; one parquet table with the run's keys added."""
    from .io import provenance, write_parquet
    from .measurements import plugins
    from .train import load_trained, resolve_device

    _threads(args.threads)
    registered = plugins()
    if args.name not in registered:
        raise SystemExit(f"unknown plugin measurement {args.name!r}; registered: {sorted(registered)}")
    m, cfg = registered[args.name], json.loads(args.config)
    device = resolve_device(args.device)
    model, ckpt = load_trained(args.model, device)
    images = _test_images(ckpt, args.data, int(cfg.get("num_images", 8))).to(device)
    df = m.compute(model, ckpt, images, cfg)
    for key, value in ckpt["spec"]["run"].items():
        df[key] = value
    write_parquet(df, args.out, {"spec": ckpt["spec"], "measurement": m.name, "config": cfg,
                                 "provenance": provenance(None, str(device))})


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

    p = sub.add_parser("psnr", parents=[common], help="PSNR gap curve of a trained run")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num-images", type=int, default=300)
    p.add_argument("--respacing", type=int, default=50)
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=cmd_psnr)

    fid_common = argparse.ArgumentParser(add_help=False, parents=[common])  # fid and fid-curve
    for flag in ("--model", "--data", "--out"):
        fid_common.add_argument(flag, required=True)
    fid_common.add_argument("--num-samples", type=int, default=1000)
    fid_common.add_argument("--steps", type=int, default=250, help="respaced DDPM steps")
    fid_common.add_argument("--reference", choices=["train", "test"], default="train")
    fid_common.add_argument("--max-reference", type=int, default=50_000)
    fid_common.add_argument("--sample-seed", type=int, default=0)
    fid_common.add_argument("--batch-size", type=int, default=64)
    fid_common.add_argument("--reference-features", default=None,
                            help="the shared fid-reference file of this run's (dataset, N, seed); else computed here")

    p = sub.add_parser("fid", parents=[fid_common], help="sample from the EMA model and compute FID/KID/precision/recall")
    p.add_argument("--samples-out", required=True)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("fid-curve", parents=[fid_common], help="FID of a run's EMA snapshots and final model (FID over training)")
    p.add_argument("--snapshots", required=True, help="the run's ema_snapshots/ folder")
    p.add_argument("--final-fid", default=None, help="the run's fid.parquet: its row is the curve's final point")
    p.set_defaults(func=cmd_fid_curve)

    p = sub.add_parser("fid-reference", parents=[common], help="Inception features of one FID reference set")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True, help="training-set size N of the runs it serves")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--test-size", type=int, required=True, help="the data set's test_size (defines the split)")
    p.add_argument("--reference", choices=["train", "test"], required=True)
    p.add_argument("--max-reference", type=int, required=True)
    p.set_defaults(func=cmd_fid_reference)

    p = sub.add_parser("freeu-grid", parents=[common], help="FID over a FreeU-style (b, s) grid on one trained U-ViT")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--samples-out", required=True)
    p.add_argument("--b", type=float, nargs="+", required=True)
    p.add_argument("--s", type=float, nargs="+", required=True)
    p.add_argument("--tau", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--max-reference", type=int, default=50_000)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--keep", type=int, default=16, help="samples kept per (b, s) for the sample grid figure")
    p.set_defaults(func=cmd_freeu_grid)

    p = sub.add_parser("pca-basis", parents=[common], help="PCs of a trained baseline's attention maps")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--spec", required=True, help="JSON: layers, components, num_images, steps, respacing")
    p.set_defaults(func=cmd_pca_basis)

    p = sub.add_parser("jacobian", parents=[common], help="denoiser Jacobian eigen-analysis of a trained run")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vectors-out", required=True)
    p.add_argument("--t", type=int, nargs="+", default=[250])
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=256, help="full method: rows per batch")
    p.add_argument("--method", choices=["auto", "full", "lanczos"], default="auto",
                   help="full Jacobian + eigh, matrix-free block Lanczos, or auto (full up to D = 1024)")
    p.add_argument("--block-size", type=int, default=8, help="lanczos: vectors per batched product")
    p.add_argument("--max-products", type=int, default=512, help="lanczos: product budget per image and t")
    p.add_argument("--tol", type=float, default=1e-3, help="lanczos: relative residual of the top-k pairs")
    p.set_defaults(func=cmd_jacobian)

    p = sub.add_parser("cost", help="training and evaluation GPU-hours of a config, before running it")
    p.add_argument("--configfile", required=True)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--throughput-tflops", type=float, default=None,
                      help="sustained TFLOP/s per GPU (default 124.8 = 40%% of an A100's 312 bf16)")
    rate.add_argument("--benchmark", default=None, help="a benchmark training.parquet measured on the node type")
    p.add_argument("--out", default=None, help="optional parquet of the per-run GPU-hours")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("attention", parents=[common], help="attention-map locality of a trained run")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--maps-out", required=True)
    p.add_argument("--t", type=int, nargs="+", default=[250])
    p.add_argument("--num-images", type=int, default=6)
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("gmm-masks", parents=[common], help="learned Gaussian-mixture masks of a U-ViT run")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--maps-out", required=True, help="npz: per block, the centre token's mask (heads, g, g)")
    p.set_defaults(func=cmd_gmm_masks)

    p = sub.add_parser("measure", parents=[common], help="a registered plugin measurement of a trained run")
    p.add_argument("name", help="the measurement's registry name (diffbias.measurements)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default="{}", help="its resolved config section, as JSON")
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

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
