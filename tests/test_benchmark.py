"""The benchmark runs at its tiny size (as in CI) and its tables mean what they say."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from diffbias import benchmark
from diffbias.models import PRESETS
from diffbias.models.attention import select_path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        results = benchmark.main(["--size", "tiny", "--out", str(out), "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    return out, results


def test_tiny_benchmark_writes_tables_figure_and_provenance(tiny_run):
    out, results = tiny_run
    for name in ("attention", "training", "sampling"):
        table = pq.read_table(out / f"{name}.parquet")
        meta = json.loads(table.schema.metadata[b"diffbias"])
        assert meta["device"]["device"] == "cpu" and meta["benchmark"]["size"] == "tiny"
        assert meta["git_commit"] and "torch" in meta["packages"]
        pd.testing.assert_frame_equal(table.to_pandas(), results[name], check_dtype=False)
    assert (out / "attention_speed.png").stat().st_size > 10_000


def test_attention_table_ratios_and_paths(tiny_run):
    df = tiny_run[1]["attention"]
    glob = df[df["impl"] == "global"]
    assert len(glob) == 2 and (glob["ratio_to_global"] == 1.0).all()  # one per head config
    local = df[df["impl"] != "global"]
    assert set(local["k"]) == {3, 5, 7, 9, 11, 13} and set(local["impl"]) == {"dense", "tiled", "auto"}
    assert (local["flop_ratio"] == local["k"] ** 2 / local["grid"] ** 2).all()
    for row in local.itertuples():  # the recorded kernel is the one the dispatcher picks
        assert row.path == select_path(row.grid, row.grid, row.k, row.impl)[0]
    merged = local.merge(glob[["heads", "head_dim", "median_ms"]], on=["heads", "head_dim"], suffixes=("", "_g"))
    assert ((merged["ratio_to_global"] - merged["median_ms"] / merged["median_ms_g"]).abs() < 1e-9).all()


def test_training_and_sampling_cover_every_tiny_preset(tiny_run):
    results = tiny_run[1]
    tiny = {name for name, p in PRESETS.items() if p.tiny}
    for name in ("training", "sampling"):
        df = results[name]
        assert set(df["preset"]) == tiny
        assert (df["images_per_s"] > 0).all() and (df["peak_memory_mb"] > 0).all()
        assert set(df["memory_kind"]) == {"process_max_rss"} and set(df["device"]) == {"cpu"}
    train = results["training"]
    assert (train["gmacs"] > 0).all()
    assert (train["achieved_tflops"] - train["gmacs"] * 6 * train["images_per_s"] / 1e3).abs().max() < 1e-9


def test_tiled_local_attention_beats_global_on_a_32x32_grid():
    """Paper 004's FLOP saving turned into time: k = 3 on 32x32 tokens (DiT-XS/1 heads) does ~1% of the
    key work; the tiled kernel measures ~4x faster than global here, so 1.5x is a wide margin."""
    torch.manual_seed(0)
    df = benchmark.attention_benchmark(grids=(32,), head_configs=((4, 63),), windows=(3,), impls=("auto",),
                                       batch=2, repeats=5, warmup=1, device="cpu")
    auto = df[df["impl"] == "auto"].iloc[0]
    assert auto["path"] == "tiled"
    assert auto["speedup"] > 1.5, df
