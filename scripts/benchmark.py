#!/usr/bin/env python
"""Attention, training and sampling throughput benchmarks (see ``diffbias.benchmark``).

    python scripts/benchmark.py --size tiny --out results/benchmark
    python scripts/benchmark.py --size full --out results/benchmark --peak-tflops 989
    python scripts/benchmark.py --size full --only attention --device cpu --threads 2 \
        --grids 32 --heads 4x63 --ks 3,5,7,13 --batch 2
"""

from diffbias.benchmark import main

if __name__ == "__main__":
    main()
