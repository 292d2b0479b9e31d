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
                      max_runtime_minutes=args.max_runtime_minutes)
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


def cmd_aggregate(args) -> None:
    from .analysis import aggregate_parquets

    aggregate_parquets(args.inputs, args.out, study=json.loads(args.study))


def cmd_report(args) -> None:
    from .report import build_report

    build_report(json.loads(args.study), args.study_dir, args.out)


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

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
