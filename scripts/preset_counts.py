#!/usr/bin/env python
"""Parameters and FLOPs of every registered preset, beside every published count under its own convention.

    python scripts/preset_counts.py [--out results/preset_counts.parquet] [--presets DICE-XL DiT-XL/2 ...]

Tiny presets are counted at 16x16x1; the others at their reference input (else 32x32x3, unconditional).
"GFLOPs" is this project's convention (fvcore MACs per image with every handle, the DiT paper's); each
published count is compared with ours under the convention it was made with
(``diffbias.metrics.flops.CONVENTIONS``). Prints one line per preset, then the Markdown table of the
published counts (the README's "Parameter and FLOP counts of the presets").
"""

import argparse

import pandas as pd

from diffbias.io import provenance, write_parquet
from diffbias.metrics.flops import CONVENTIONS, format_params, model_summary
from diffbias.models import PRESETS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/preset_counts.parquet")
    ap.add_argument("--presets", nargs="*", default=None, help="only these presets (default: all)")
    args = ap.parse_args()
    rows, published = [], []
    for name, preset in sorted(PRESETS.items()):
        if args.presets and name not in args.presets:
            continue
        kw = {"input_size": 16, "in_channels": 1, "num_classes": 0} if preset.tiny else {}
        if not preset.tiny and "input" not in preset.reference:
            kw = {"input_size": 32, "in_channels": 3, "num_classes": 0}
        s = model_summary(name, **kw)
        rows.append({"preset": name, "backbone": preset.backbone, "input": s["input"], "classes": s["num_classes"],
                     "params": s["params"], "gflops": s["gflops"],
                     "published_params": preset.reference.get("params"), "published_gflops": preset.reference.get("gflops"),
                     "published_convention": preset.reference.get("convention", "diffbias") if preset.reference else None})
        print(f"{name:18s} {str(s['input']):12s} params {s['params']:>13,}  GFLOPs {s['gflops']:9.3f}", flush=True)
        for r in s["published"]:
            published.append({"preset": name, **r})
    write_parquet(pd.DataFrame(rows), args.out,
                  {"provenance": provenance(), "published": published, "conventions": CONVENTIONS})

    def diff(ours, ref):
        return "-" if ref is None else f"{ours / ref - 1:+.2%}"

    print("\n| preset | source | convention | params: published / ours (diff) | GFLOPs: published / ours (diff) "
          "| mult-adds (G, torchinfo): published / ours |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in published:
        params = "-" if r["params"] is None else \
            f"{format_params(r['params'])} / {r['ours_params']:,} ({diff(r['ours_params'], r['params'])})"
        gflops = "-" if r["gflops"] is None else \
            f"{r['gflops']:g} / {r['ours_gflops']:.2f} ({diff(r['ours_gflops'], r['gflops'])})"
        madds = "-" if r["mult_adds"] is None else f"{r['mult_adds']:g} / {r['ours_mult_adds']:.2f}"
        note = "" if r["reproducible"] else f" (not reproducible: {r['note']})"
        print(f"| {r['preset']} | {r['source']}{note} | {r['convention']} | {params} | {gflops} | {madds} |")


if __name__ == "__main__":
    main()
