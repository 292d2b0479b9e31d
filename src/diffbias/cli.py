"""Command line of the workflow's jobs: ``python -m diffbias <command> ...``.

Every command takes explicit paths and JSON settings, parses them and calls one library function; nothing here
computes. Every measurement, built-in or plugin, runs through ``measure <name>``. Heavy modules are imported by the
command that needs them, so that ``--help`` and the light commands start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def cmd_validate(args) -> None:
    from .config import all_runs, load_config

    config = load_config(args.configfile)
    print(f"{args.configfile}: OK ({len(config['studies'])} studies, {len(all_runs(config))} distinct runs)")


def cmd_schema(args) -> None:
    from .config import load_schema

    print(json.dumps(load_schema(), indent=1))


def cmd_prepare_data(args) -> None:
    from .data import prepare_dataset

    prepare_dataset(json.loads(args.spec), args.out)


def cmd_train(args) -> None:
    from .device import set_threads
    from .train import EXIT_TIME_BUDGET, NonFiniteLossError, TimeBudgetReached, Trainer

    set_threads(args.threads)
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


def _inputs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--input takes NEED=PATH, got {pair!r}")
        out[key] = value
    return out


def cmd_measure(args) -> None:
    from .measure import measure

    measure(args.name, model=args.model, data=args.data, out=args.out, arrays_out=args.arrays_out, config=args.config,
            inputs=_inputs(args.input), device=args.device, threads=args.threads)


def cmd_shared_input(args) -> None:
    from .measure import build_shared_input

    build_shared_input(args.name, data=args.data, n=args.n, seed=args.seed, test_size=args.test_size,
                       split=args.split, part=args.part, config=args.config, out=args.out, device=args.device,
                       threads=args.threads)


def cmd_pca_basis(args) -> None:
    from .pca_basis import basis_for_run

    basis_for_run(args.model, args.data, args.out, json.loads(args.spec), device=args.device, threads=args.threads)


def cmd_counts(args) -> None:
    from .counts import write_study_counts

    write_study_counts(json.loads(args.study), args.out, args.ops_out, args.length_out)


def cmd_cost(args) -> None:
    from .config import load_config
    from .cost import format_summary, format_wall_clock, gpu_hours

    config = load_config(args.configfile)
    runs, summary, note = gpu_hours(config, tflops=args.throughput_tflops, benchmark=args.benchmark)
    print(format_summary(summary, note, args.configfile))
    print()
    print(format_wall_clock(runs))
    if args.out:
        from .io import write_parquet

        write_parquet(runs, args.out, {"summary": summary.to_dict(orient="records"), "throughput": note})


def cmd_aggregate(args) -> None:
    from .analysis import aggregate_parquets

    aggregate_parquets(args.inputs, args.out, study=json.loads(args.study))


def cmd_aggregate_arrays(args) -> None:
    from .analysis import aggregate_arrays

    aggregate_arrays(args.inputs, json.loads(args.runs), args.out, max_items=args.max_items)


def cmd_report(args) -> None:
    from .report import build_report

    build_report(json.loads(args.study), args.study_dir, args.out)


def cmd_encode_latents(args) -> None:
    from .device import set_threads
    from .latents import encode_dataset

    set_threads(args.threads)
    meta = encode_dataset(json.loads(args.spec), args.out, device=args.device, batch_size=args.batch_size,
                          workers=args.workers)
    print(f"[encode-latents] {args.out}: {meta['count']} images -> {meta['latent_shape']} {meta['dtype']} "
          f"({meta['posterior']}{', with mirrored twins' if meta['hflip'] else ''}), {len(meta['shards'])} shards")


def cmd_tiny_autoencoder(args) -> None:
    from .autoencoder import Autoencoder, save_tiny_autoencoder

    path = save_tiny_autoencoder(args.out, seed=args.seed)
    print(f"[tiny-autoencoder] {path}: {Autoencoder.load(path, 'cpu').fingerprint()}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="diffbias", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate a config file and count its runs")
    p.add_argument("configfile")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the config's JSON schema, with every registered measurement's section")
    p.set_defaults(func=cmd_schema)

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

    p = sub.add_parser("measure", parents=[common], help="a registered measurement of a trained run "
                       "(diffbias.measurements): one table, plus its arrays when it has them")
    p.add_argument("name", help="the measurement's registry name")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="the per-run parquet table")
    p.add_argument("--arrays-out", default=None, help="the per-run .npz (measurements with arrays)")
    p.add_argument("--config", default="{}", help="its settings, as JSON (the schema fills the defaults)")
    p.add_argument("--input", action="append", default=[], metavar="NEED=PATH",
                   help="a file it needs: snapshots=DIR, twin=MODEL (the split-B twin run's model.pt), "
                        "shared:<name>=FILE, table:<name>=FILE")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("shared-input", parents=[common], help="a file several measurements read, built once per "
                       "(dataset, N, seed), e.g. fid_reference")
    p.add_argument("name")
    p.add_argument("--data", required=True)
    p.add_argument("--n", type=int, required=True, help="training-set size N of the runs it serves")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--test-size", type=int, required=True, help="the data set's test_size (defines the split)")
    p.add_argument("--split", choices=("shuffle", "official"), default="shuffle",
                   help="the data set's split: official draws the test set from its official test images only")
    p.add_argument("--part", default="A", choices=("A", "B"), help="the training part of the runs it serves "
                   "(variants.<v>.split)")
    p.add_argument("--config", default="{}", help="its settings section, as JSON")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_shared_input)

    p = sub.add_parser("pca-basis", parents=[common], help="PCs of a trained baseline's attention maps")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--spec", required=True, help="JSON: layers, components, num_images, timesteps, respacing")
    p.set_defaults(func=cmd_pca_basis)

    p = sub.add_parser("counts", help="parameters and FLOPs (fvcore MACs) of a study's variants")
    p.add_argument("--study", required=True, help="study description JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--ops-out", required=True, help="per-operator breakdown parquet")
    p.add_argument("--length-out", help="GFLOPs at other input sizes (counts_by_length) parquet")
    p.set_defaults(func=cmd_counts)

    p = sub.add_parser("cost", help="training and evaluation GPU-hours of a config, before running it")
    p.add_argument("--configfile", required=True)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--throughput-tflops", type=float, default=None,
                      help="sustained TFLOP/s per GPU (default 124.8 = 40%% of an A100's 312 bf16)")
    rate.add_argument("--benchmark", default=None, help="a benchmark training.parquet measured on the node type")
    p.add_argument("--out", default=None, help="optional parquet of the per-run GPU-hours")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("aggregate", help="concatenate per-run parquet files into one tidy study table")
    p.add_argument("--study", required=True, help="study description JSON")
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("aggregate-arrays", help="pack per-run .npz arrays into one study-level .npz keyed by run")
    p.add_argument("--runs", required=True, help="JSON list of run keys (dataset/variant/N<n>/seed<s>), one per input")
    p.add_argument("--max-items", type=int, default=None, help="keep the first items along the first axis (a preview)")
    p.add_argument("--out", required=True)
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_aggregate_arrays)

    p = sub.add_parser("report", help="figures, tables and the PDF report of a study")
    p.add_argument("--study", required=True, help="study description JSON")
    p.add_argument("--study-dir", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("encode-latents", parents=[common], help="encode a data set into autoencoder latents "
                       "(dataset.latents), once, resumable")
    p.add_argument("--spec", required=True, help="dataset entry of the config, as JSON, with a latents section")
    p.add_argument("--out", required=True, help="cache folder (meta.json is written last)")
    p.add_argument("--batch-size", type=int, default=64, help="images per autoencoder call")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes reading and cropping images")
    p.set_defaults(func=cmd_encode_latents)

    p = sub.add_parser("tiny-autoencoder", help="save a seeded, SD-shaped AutoencoderKL of 2,067 parameters (tests "
                       "and rehearsals: nothing is downloaded)")
    p.add_argument("--out", required=True, help="folder to save_pretrained into (replaced atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_autoencoder)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
