"""Wall time of one nearest-neighbour search (diffbias.metrics.nearest_neighbours.nearest) of Q queries in a
reference set of N uint8 images, as the memorisation measurement runs it (top-2 L2, chunked).

    python scripts/nn_search_time.py --n 100000 --queries 1000 --shape 3,32,32 --threads 1 [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from diffbias.metrics.nearest_neighbours import nearest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="training images searched")
    p.add_argument("--queries", type=int, default=1000, help="generated samples")
    p.add_argument("--shape", default="3,32,32", help="C,H,W")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (args.n, *shape), dtype=np.uint8)
    queries = rng.integers(0, 256, (args.queries, *shape), dtype=np.uint8)
    nearest(queries[:8], reference[:1000], 2, device=args.device)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        nearest(queries, reference, 2, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    load = os.getloadavg()[0]
    print(f"N={args.n} queries={args.queries} shape={shape} device={args.device} threads={args.threads}: "
          f"median {np.median(times):.2f} s over {args.repeats} (min {min(times):.2f} s); load average {load:.2f}")


if __name__ == "__main__":
    main()
