"""Running one registered measurement on one trained run, and building one shared input: the bodies of
``python -m diffbias measure`` and ``python -m diffbias shared-input``, the same for every measurement."""

from __future__ import annotations

import json

from . import measurements
from .io import provenance, write_npz, write_parquet


def measure(name: str, *, model: str, data: str, out: str, arrays_out: str | None = None, config: str | dict = "{}",
            inputs: dict[str, str] | None = None, device: str = "auto", threads: int | None = None) -> None:
    """Load the run once, compute measurement ``name`` with its validated settings, and write its per-run table
    (the run's keys added; spec, settings and provenance in the parquet metadata) and, if it declares them, its
    arrays. Arrays are written first: a table on disk means the job finished."""
    from .config import measurement_settings
    from .device import set_threads
    from .runs import TrainedRun

    m = measurements.get(name)
    cfg = measurement_settings(name, json.loads(config) if isinstance(config, str) else config)
    # a shared input or another table is optional (the measurement computes without it); snapshots and the twin
    # run's model are not
    missing = [need for need in m.needs if need in measurements.REQUIRED_NEEDS and need not in (inputs or {})]
    if missing:
        raise SystemExit(f"measurement {name!r} needs the inputs {missing} (--input {missing[0]}=PATH)")
    set_threads(threads)
    run = TrainedRun.load(model, data, device, threads=threads, inputs=inputs)
    result = m.compute(run, cfg)
    if not isinstance(result, measurements.Result):
        result = measurements.Result(result)
    if m.arrays:
        if arrays_out is None:
            raise SystemExit(f"measurement {name!r} writes arrays: give --arrays-out")
        write_npz(arrays_out, **result.arrays)
    elif result.arrays:
        raise ValueError(f"measurement {name!r} returned arrays but does not declare arrays=True")
    table = result.table
    for key, value in run.run.items():  # appended, or in place where compute put them first
        table[key] = value
    write_parquet(table, out, {"spec": run.spec, "measurement": name, "settings": cfg, **result.meta,
                               "provenance": provenance(None, str(run.device))})


def build_shared_input(name: str, *, data: str, n: int, seed: int, test_size: int, config: str | dict, out: str,
                       split: str = "shuffle", part: str = "A", device: str = "auto",
                       threads: int | None = None) -> None:
    """One shared input (e.g. the FID reference features) of the runs with this (dataset, N, seed), data-set split
    ``split`` (shuffle | official) and training part ``part`` (variants.<v>.split: A | B)."""
    from . import data as data_lib
    from .config import section_settings
    from .device import resolve_device, set_threads

    measurements.load()
    shared = measurements.SHARED_INPUTS[name]
    cfg = section_settings(("evaluation", shared.config_key), json.loads(config) if isinstance(config, str) else config)
    set_threads(threads)
    from .latents import LatentPool, is_latent_cache

    if is_latent_cache(data):  # a latent data set: its real images, read from the source the cache was encoded from
        from .runs import latent_pixels

        pool = LatentPool(data)
        images, labels = latent_pixels(pool), pool.labels
    else:
        images, labels, _ = data_lib.load_prepared(data)
    spec = {"run": {"N": n, "seed": seed}, "dataset": {"test_size": test_size, "split": split}, "split": part}
    split_idx = data_lib.run_split(len(images), spec, data_lib.run_test_mask(spec, data))
    arrays = shared.build(images, labels, split_idx, {"N": n, "seed": seed, "split": part}, cfg,
                          str(resolve_device(device)), threads)
    write_npz(out, **arrays)
