"""Throughput benchmarks: one attention layer, a training step per backbone, a sampling chain.

Three tables, each written with :func:`diffbias.io.write_parquet` (provenance, including the device and
torch thread count, in the schema metadata), and one figure:

- ``attention.parquet``: forward + backward of one multi-head attention call, q, k, v of shape
  (B, heads, L, d) requiring grad, ``out.sum().backward()``. Global attention is
  ``F.scaled_dot_product_attention``; local attention is ``neighborhood_attention(impl=...)`` for every
  window ``k`` and implementation. All candidates of one (grid, heads, head_dim) configuration are timed
  in interleaved rounds (the order rotates each round), so load changes on a shared machine hit them
  alike; the table keeps the median. Columns: grid, heads, head_dim, batch, k (<NA> for global), impl
  ("global" or the requested impl), path (the kernel that actually ran: "global", "dense", "tiled" or "flex",
  from ``attention.select_path``),
  tile, median_ms, ratio_to_global (time / global time), flop_ratio (k^2 / L, the limit of the ratio),
  speedup (global time / time), repeats.
- ``training.parquet``: images/s of the real training step (``train.diffusion_loss`` + AdamW) per preset,
  after warm-up steps. Columns: preset, backbone, input_size, in_channels, batch, steps, step_ms,
  images_per_s, params, gmacs (fvcore MACs per image via ``count_flops``; NaN if counting fails),
  achieved_tflops (gmacs * 2 * 3 * images_per_s / 1e3, forward + backward = 3 forwards) and
  peak_fraction (achieved / ``peak_tflops``; NaN without a peak), peak_memory_mb + memory_kind (see
  :mod:`diffbias.metrics.memory`), device.
- ``sampling.parquet``: images/s of an ancestral DDPM chain of ``sampling_steps`` respaced steps
  (``create_diffusion(steps).p_sample_loop``) per preset. Columns: preset, backbone, input_size,
  in_channels, batch, sampling_steps, seconds, ms_per_step, images_per_s, peak_memory_mb, memory_kind, device.
- ``attention_speed.png``: ratio to global against k (log scale), one line per impl and grid, one panel per
  head configuration, with the k^2 / L limit per grid.

Sizes: ``tiny`` (a smoke test, under a minute on two busy CPU cores with one torch thread, which the CLI
sets for it: 16x16 token grid, the tiny presets at 16x16x1, a 10-step chain) and ``full`` (16x16 and 32x32 grids, DiT-XS/1, DiT-S/1 and UNet-004
at 32x32x3, the 250-step chain). Every setting can be overridden (see :func:`settings_for`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from . import io as io_lib
from .device import resolve_device, set_threads
from .metrics.memory import peak_memory_mb, reset_peak_memory
from .models import attention as attention_lib

IMPLS = ("dense", "tiled", "auto")
WINDOWS = (3, 5, 7, 9, 11, 13)
# (heads, head dim) of DiT-XS/1 (252 = 4 x 63) and DiT-S/1 (384 = 6 x 64).
HEAD_CONFIGS = ((4, 63), (6, 64))
FULL_PRESETS = ("DiT-XS/1", "DiT-S/1", "UNet-004")


@dataclass
class BenchmarkSettings:
    size: str = "tiny"
    device: str = "cpu"
    # attention
    grids: tuple[int, ...] = (16,)
    head_configs: tuple[tuple[int, int], ...] = HEAD_CONFIGS
    windows: tuple[int, ...] = WINDOWS
    impls: tuple[str, ...] = IMPLS
    attention_batch: int = 1
    attention_repeats: int = 3
    attention_warmup: int = 1
    # training
    presets: tuple[str, ...] = ()
    input_size: int = 16
    in_channels: int = 1
    train_batch: int = 4
    train_steps: int = 2
    train_warmup: int = 1
    count_macs: bool = True
    peak_tflops: float | None = None
    # sampling
    sampling_steps: int = 10
    sampling_batch: int = 2
    sampling_presets: tuple[str, ...] | None = None  # None: the training presets
    # which parts run
    parts: tuple[str, ...] = ("attention", "training", "sampling")
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tiny_presets() -> tuple[str, ...]:
    from .models import PRESETS

    return tuple(name for name, p in PRESETS.items() if p.tiny)


def full_presets() -> tuple[str, ...]:
    from .models import PRESETS

    return tuple(name for name in FULL_PRESETS if name in PRESETS)


def settings_for(size: str = "tiny", device: str | None = None, **overrides: Any) -> BenchmarkSettings:
    """The settings of a size on a device; ``overrides`` (any field, None = keep) win."""
    device = str(resolve_device(device))  # a string: settings and tables record it
    gpu = device.startswith("cuda")
    if size == "tiny":
        s = BenchmarkSettings(size="tiny", device=device, presets=tiny_presets())
    elif size == "full":
        s = BenchmarkSettings(
            size="full", device=device, grids=(16, 32),
            attention_batch=64 if gpu else 8, attention_repeats=20 if gpu else 5, attention_warmup=5 if gpu else 2,
            presets=full_presets(), input_size=32, in_channels=3,
            train_batch=64 if gpu else 8, train_steps=10 if gpu else 3, train_warmup=3 if gpu else 1,
            sampling_steps=250, sampling_batch=16 if gpu else 2,
            impls=("dense", "tiled", "flex", "auto") if gpu else IMPLS,
        )
    else:
        raise ValueError(f"unknown benchmark size {size!r}; use 'tiny' or 'full'")
    fields = {f.name for f in dataclasses.fields(BenchmarkSettings)}
    for key, value in overrides.items():
        if key not in fields:
            raise TypeError(f"unknown benchmark setting {key!r}")
        if value is not None:
            setattr(s, key, tuple(value) if isinstance(value, list) else value)
    return s


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def _sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float:
    """Wall time of one call in milliseconds, with the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def interleaved_medians(
    candidates: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Median ms per candidate over ``repeats`` rounds after ``warmup`` rounds; each round runs every
    candidate once, in an order rotated by one each round (fair under a drifting machine load)."""
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            ms = time_call(candidates[name], device)
            if round_ >= warmup:
                times[name].append(ms)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------


def kernel_path(grid: int, k: int, impl: str, device: str = "cpu") -> tuple[str, int | None]:
    """The kernel ``neighborhood_attention(impl=impl)`` runs on a grid x grid map with window k, and its tile."""
    path, tile, _ = attention_lib.select_path(grid, grid, k, impl, torch.device(device).type)
    return path, tile


def attention_benchmark(
    *,
    grids: Sequence[int] = (16,),
    head_configs: Sequence[tuple[int, int]] = HEAD_CONFIGS,
    windows: Sequence[int] = WINDOWS,
    impls: Sequence[str] = IMPLS,
    batch: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> pd.DataFrame:
    """Forward + backward time of one attention call, local (per window and impl) against global."""
    device = str(resolve_device(device))  # a string: settings and tables record it
    rows = []
    for grid in grids:
        L = grid * grid
        for heads, head_dim in head_configs:
            gen = torch.Generator().manual_seed(seed)
            q, k, v = (
                torch.randn(batch, heads, L, head_dim, generator=gen, dtype=dtype).to(device).requires_grad_()
                for _ in range(3)
            )

            def step(attend: Callable[[], torch.Tensor]) -> Callable[[], None]:
                def run() -> None:
                    attend().sum().backward()
                    q.grad = k.grad = v.grad = None

                return run

            candidates = {"global": step(lambda: F.scaled_dot_product_attention(q, k, v))}
            meta: dict[str, tuple[int | None, str, str, int | None]] = {"global": (None, "global", "global", None)}
            for window in windows:
                if window > grid:
                    continue
                for impl in impls:
                    name = f"k={window} {impl}"
                    candidates[name] = step(
                        lambda window=window, impl=impl: attention_lib.neighborhood_attention(
                            q, k, v, grid, grid, window, impl=impl
                        )
                    )
                    meta[name] = (window, impl, *kernel_path(grid, window, impl, device))
            medians = interleaved_medians(candidates, repeats=repeats, warmup=warmup, device=device)
            global_ms = medians["global"]
            for name, ms in medians.items():
                window, impl, path, tile = meta[name]
                rows.append({
                    "grid": grid, "heads": heads, "head_dim": head_dim, "batch": batch,
                    "k": window, "impl": impl, "path": path, "tile": tile,
                    "median_ms": ms, "ratio_to_global": ms / global_ms,
                    "flop_ratio": 1.0 if window is None else window * window / L,
                    "speedup": global_ms / ms, "repeats": repeats,
                })
            del q, k, v
    df = pd.DataFrame(rows)
    df["k"] = df["k"].astype("Int64")
    df["tile"] = df["tile"].astype("Int64")
    return df


# ----------------------------------------------------------------------------------------------------
# Training and sampling
# ----------------------------------------------------------------------------------------------------


def _build(preset: str, input_size: int, in_channels: int, device: str, seed: int) -> torch.nn.Module:
    from .models import build_model

    torch.manual_seed(seed)
    model = build_model(preset=preset, input_size=input_size, in_channels=in_channels, num_classes=0, learn_sigma=True)
    return model.to(device)


def _gmacs(model: torch.nn.Module, input_size: int, in_channels: int) -> float:
    """fvcore GMACs per image, NaN if counting fails (the counter is optional here)."""
    import warnings

    try:
        from .metrics.flops import count_flops

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            macs, _ = count_flops(model, input_size=input_size, in_channels=in_channels, num_classes=0)
        return macs / 1e9
    except Exception:  # noqa: BLE001 - a missing or failing counter only blanks the column
        return math.nan


def training_benchmark(
    presets: Sequence[str],
    *,
    input_size: int = 16,
    in_channels: int = 1,
    batch: int = 4,
    steps: int = 2,
    warmup: int = 1,
    device: str | None = None,
    peak_tflops: float | None = None,
    count_macs: bool = True,
    lr: float = 1e-4,
    seed: int = 0,
) -> pd.DataFrame:
    """Median wall time of the real training step (hybrid loss + AdamW) per preset."""
    from .diffusion import create_diffusion
    from .metrics.flops import count_parameters
    from .train import diffusion_loss, ema_update, make_optimizer

    device = str(resolve_device(device))  # a string: settings and tables record it
    diffusion = create_diffusion(None)
    rows = []
    for preset in presets:
        model = _build(preset, input_size, in_channels, device, seed).train()
        opt = make_optimizer(model, lr, 0.0)  # the training loop's optimiser and EMA: a real step
        ema = copy.deepcopy(model).requires_grad_(False)
        gen = torch.Generator().manual_seed(seed)
        batches = [
            (
                torch.rand(batch, in_channels, input_size, input_size, generator=gen).mul(2).sub(1).to(device),
                torch.randint(0, diffusion.num_timesteps, (batch,), generator=gen).to(device),
                torch.randn(batch, in_channels, input_size, input_size, generator=gen).to(device),
            )
            for _ in range(min(steps + warmup, 4))
        ]

        def train_step(i: int) -> None:
            x0, t, noise = batches[i % len(batches)]
            loss = diffusion_loss(model, diffusion, x0, t, noise)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(ema, model, 0.999)

        reset_peak_memory(device)
        times = [time_call(lambda i=i: train_step(i), device) for i in range(warmup + steps)][warmup:]
        peak_mb, memory_kind = peak_memory_mb(device)
        step_ms = statistics.median(times)
        images_per_s = batch / (step_ms / 1e3)
        gmacs = _gmacs(model, input_size, in_channels) if count_macs else math.nan
        achieved = gmacs * 2 * 3 * images_per_s / 1e3  # TFLOP/s; NaN propagates
        rows.append({
            "preset": preset, "backbone": getattr(model, "backbone_name", type(model).__name__),
            "input_size": input_size, "in_channels": in_channels, "batch": batch, "steps": steps,
            "step_ms": step_ms, "images_per_s": images_per_s, "params": count_parameters(model),
            "gmacs": gmacs, "achieved_tflops": achieved,
            "peak_fraction": achieved / peak_tflops if peak_tflops else math.nan,
            "peak_memory_mb": peak_mb, "memory_kind": memory_kind, "device": device,
        })
        del model, opt, ema, batches
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def sampling_benchmark(
    presets: Sequence[str],
    *,
    input_size: int = 16,
    in_channels: int = 1,
    batch: int = 2,
    steps: int = 250,
    device: str | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Wall time of one ancestral DDPM chain of ``steps`` respaced steps per preset (after one warm-up
    forward pass)."""
    from .diffusion import create_diffusion

    device = str(resolve_device(device))  # a string: settings and tables record it
    diffusion = create_diffusion(steps)
    rows = []
    for preset in presets:
        model = _build(preset, input_size, in_channels, device, seed).eval()
        shape = (batch, in_channels, input_size, input_size)
        with torch.no_grad():
            model(torch.zeros(shape, device=device), torch.zeros(batch, dtype=torch.long, device=device), None)
        reset_peak_memory(device)
        ms = time_call(
            lambda: diffusion.p_sample_loop(
                model, shape, seeds=list(range(seed, seed + batch)), device=device, model_kwargs={"y": None}
            ),
            device,
        )
        rows.append({
            "preset": preset, "backbone": getattr(model, "backbone_name", type(model).__name__),
            "input_size": input_size, "in_channels": in_channels, "batch": batch, "sampling_steps": steps,
            "seconds": ms / 1e3, "ms_per_step": ms / steps, "images_per_s": batch / (ms / 1e3),
            **dict(zip(("peak_memory_mb", "memory_kind"), peak_memory_mb(device))), "device": device,
        })
        del model
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# Figure and driver
# ----------------------------------------------------------------------------------------------------


def plot_attention(df: pd.DataFrame, path: str | Path) -> None:
    """Ratio to global attention against k: one panel per (heads, head_dim), one line per impl and grid,
    the k^2 / L limit per grid (black) and global (= 1, grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    local = df[df["impl"] != "global"]
    configs = list(dict.fromkeys(zip(df["heads"], df["head_dim"])))
    grids = sorted(df["grid"].unique())
    styles = ["-", "--", ":", "-."]
    colors = {impl: f"C{i}" for i, impl in enumerate(dict.fromkeys(local["impl"]))}
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 4.2), squeeze=False, sharey=True)
    for ax, (heads, head_dim) in zip(axes[0], configs):
        sub = local[(local["heads"] == heads) & (local["head_dim"] == head_dim)]
        for gi, grid in enumerate(grids):
            style = styles[gi % len(styles)]
            g = sub[sub["grid"] == grid].sort_values("k")
            for impl, color in colors.items():
                line = g[g["impl"] == impl]
                if len(line):
                    ax.plot(line["k"], line["ratio_to_global"], style, color=color, marker="o", ms=3,
                            label=f"{impl}, {grid}x{grid}")
            limit = g.drop_duplicates("k")
            if len(limit):
                ax.plot(limit["k"], limit["flop_ratio"], style, color="black", lw=1, label=f"k²/L, {grid}x{grid}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("window k")
        ax.set_title(f"{heads} heads x {head_dim}, batch {int(df['batch'].iloc[0])}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("time / global attention time (fwd+bwd)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    with io_lib.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


def run_benchmark(settings: BenchmarkSettings, out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Run the selected parts and write ``attention.parquet`` (+ ``attention_speed.png``),
    ``training.parquet`` and ``sampling.parquet`` under ``out_dir``."""
    out_dir = Path(out_dir)
    s = settings
    metadata = {**io_lib.provenance(device=s.device), "benchmark": s.as_dict()}
    results: dict[str, pd.DataFrame] = {}
    if "attention" in s.parts:
        df = attention_benchmark(
            grids=s.grids, head_configs=s.head_configs, windows=s.windows, impls=s.impls, batch=s.attention_batch,
            repeats=s.attention_repeats, warmup=s.attention_warmup, device=s.device, seed=s.seed,
        )
        io_lib.write_parquet(df, out_dir / "attention.parquet", metadata)
        plot_attention(df, out_dir / "attention_speed.png")
        results["attention"] = df
    if "training" in s.parts:
        df = training_benchmark(
            s.presets, input_size=s.input_size, in_channels=s.in_channels, batch=s.train_batch, steps=s.train_steps,
            warmup=s.train_warmup, device=s.device, peak_tflops=s.peak_tflops, count_macs=s.count_macs, seed=s.seed,
        )
        io_lib.write_parquet(df, out_dir / "training.parquet", metadata)
        results["training"] = df
    if "sampling" in s.parts:
        presets = s.presets if s.sampling_presets is None else s.sampling_presets
        df = sampling_benchmark(
            presets, input_size=s.input_size, in_channels=s.in_channels, batch=s.sampling_batch,
            steps=s.sampling_steps, device=s.device, seed=s.seed,
        )
        io_lib.write_parquet(df, out_dir / "sampling.parquet", metadata)
        results["sampling"] = df
    return results


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _strs(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _head_configs(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in _strs(text):
        heads, _, dim = item.lower().partition("x")
        out.append((int(heads), int(dim)))
    return tuple(out)


def main(argv: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    p = argparse.ArgumentParser(description="Attention, training and sampling throughput benchmarks.")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--out", default="results/benchmark", help="output folder")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--threads", type=int,
        help="torch.set_num_threads; default: torch's own, except 1 for --size tiny on the CPU (on shared, busy cores "
        "a second thread mostly adds synchronisation stalls and noise to a smoke test)",
    )
    p.add_argument("--only", type=_strs, dest="parts", help="comma list of attention,training,sampling")
    p.add_argument("--grids", type=_ints, help="attention token grids, e.g. 16,32")
    p.add_argument("--heads", type=_head_configs, dest="head_configs", help="heads x head dim, e.g. 4x63,6x64")
    p.add_argument("--ks", type=_ints, dest="windows", help="local windows, e.g. 3,5,7")
    p.add_argument("--impls", type=_strs, help="neighborhood_attention impls, e.g. dense,tiled,auto")
    p.add_argument("--batch", type=int, dest="attention_batch", help="attention batch size")
    p.add_argument("--repeats", type=int, dest="attention_repeats", help="attention timing rounds")
    p.add_argument("--warmup", type=int, dest="attention_warmup", help="attention warm-up rounds")
    p.add_argument("--presets", type=_strs, help="backbone presets for training and sampling")
    p.add_argument("--input-size", type=int)
    p.add_argument("--in-channels", type=int)
    p.add_argument("--train-batch", type=int)
    p.add_argument("--train-steps", type=int)
    p.add_argument("--sampling-steps", type=int)
    p.add_argument("--sampling-batch", type=int)
    p.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s, for the achieved fraction")
    p.add_argument("--no-flops", dest="count_macs", action="store_false", default=None)
    args = vars(p.parse_args(argv))
    size, out, device, threads = args.pop("size"), args.pop("out"), args.pop("device"), args.pop("threads")
    settings = settings_for(size, device, **args)
    if threads is None and size == "tiny" and settings.device == "cpu":
        threads = 1
    set_threads(threads)
    results = run_benchmark(settings, out)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_rows", 200):
        for name, df in results.items():
            print(f"== {name} ({Path(out) / (name + '.parquet')})")
            print(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return results
