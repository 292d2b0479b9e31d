#!/usr/bin/env python
"""Parameters and FLOPs (fvcore MACs per image) of every registered preset, beside the published counts.

    python scripts/preset_counts.py [--out results/preset_counts.parquet]
Tiny presets are counted at 16x16x1; the others at their reference input (else 32x32x3, unconditional).
"""

import argparse

import pandas as pd

from diffbias.io import provenance, write_parquet
from diffbias.metrics.flops import model_summary
from diffbias.models import PRESETS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/preset_counts.parquet")
    args = ap.parse_args()
    rows = []
    for name, preset in sorted(PRESETS.items()):
        kw = {"input_size": 16, "in_channels": 1, "num_classes": 0} if preset.tiny else {}
        if not preset.tiny and "input" not in preset.reference:
            kw = {"input_size": 32, "in_channels": 3, "num_classes": 0}
        s = model_summary(name, **kw)
        rows.append({"preset": name, "backbone": preset.backbone, "input": s["input"], "classes": s["num_classes"],
                     "params": s["params"], "gflops": s["gflops"],
                     "published_params": preset.reference.get("params"), "published_gflops": preset.reference.get("gflops")})
        print(f"{name:18s} {str(s['input']):12s} params {s['params'] / 1e6:9.3f}M  GFLOPs {s['gflops']:9.3f}"
              f"   published: {preset.reference.get('params')} / {preset.reference.get('gflops')}", flush=True)
    write_parquet(pd.DataFrame(rows), args.out, {"provenance": provenance()})


if __name__ == "__main__":
    main()
