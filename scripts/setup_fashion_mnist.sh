#!/usr/bin/env bash
# Make the offline default data set (Fashion-MNIST, four IDX .gz files) available, with or without root.
# Called by scripts/setup.sh; safe to run on its own. The loader finds the files by one rule
# (diffbias.data.resolve_fashion_mnist_path): /usr/share/datasets/fashion-mnist (Debian's package), else
# $DIFFBIAS_FASHION_MNIST, else .cache/fashion-mnist. This script tries, in order:
#   1. the files are already in one of those places: nothing to do;
#   2. root, or sudo without a password: apt-get install dataset-fashion-mnist (Debian);
#   3. torchvision's FashionMNIST download into .cache/fashion-mnist (needs the network);
# and otherwise prints one line saying what to do. It never fails the set-up (exit 0): without the data the
# default study stops at the DAG build with a message naming the data set, and the tests needing it skip.
# Overridable for tests: FMNIST_SYSTEM_DIR, FMNIST_CACHE_DIR, FMNIST_PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."

SYSTEM_DIR=${FMNIST_SYSTEM_DIR:-/usr/share/datasets/fashion-mnist}
CACHE_DIR=${FMNIST_CACHE_DIR:-.cache/fashion-mnist}
PY=${FMNIST_PYTHON:-.venv/bin/python}

have() { [ -n "$1" ] && { [ -f "$1/train-images-idx3-ubyte.gz" ] || [ -f "$1/train-images-idx3-ubyte" ]; }; }

if have "$SYSTEM_DIR"; then
  exit 0
fi
if [ -n "${DIFFBIAS_FASHION_MNIST:-}" ]; then
  if have "$DIFFBIAS_FASHION_MNIST"; then
    echo "[setup] Fashion-MNIST: using DIFFBIAS_FASHION_MNIST=$DIFFBIAS_FASHION_MNIST"
    exit 0
  fi
  echo "[setup] DIFFBIAS_FASHION_MNIST=$DIFFBIAS_FASHION_MNIST has no train-images-idx3-ubyte[.gz]; trying the other routes"
fi
if have "$CACHE_DIR"; then
  echo "[setup] Fashion-MNIST: using $CACHE_DIR"
  exit 0
fi

if [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; then
  as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }
  echo "[setup] installing Debian's dataset-fashion-mnist (offline default data set)"
  if as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      && have "$SYSTEM_DIR"; then
    exit 0
  fi
  echo "[setup] apt-get could not install dataset-fashion-mnist; trying torchvision's download"
else
  echo "[setup] no root and no password-less sudo: not installing Debian's dataset-fashion-mnist; trying torchvision's download"
fi

# torchvision keeps the four .gz files it downloads (FashionMNIST/raw/), in the IDX layout the loader reads.
if timeout 600 "$PY" - "$CACHE_DIR" <<'EOF' 2>/dev/null; then
import os, shutil, sys, tempfile
from torchvision.datasets import FashionMNIST

dest = sys.argv[1]
os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(dest))) as tmp:
    FashionMNIST(tmp, train=True, download=True)  # fetches all four files (train and t10k)
    raw = os.path.join(tmp, "FashionMNIST", "raw")
    stage = os.path.join(tmp, "stage")
    os.makedirs(stage)
    for name in sorted(os.listdir(raw)):
        if name.endswith("-ubyte.gz"):
            shutil.copy(os.path.join(raw, name), os.path.join(stage, name))
    if len(os.listdir(stage)) != 4:
        sys.exit("expected four *-ubyte.gz files")
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.replace(stage, dest)  # all four files appear at once
EOF
  if have "$CACHE_DIR"; then
    echo "[setup] Fashion-MNIST downloaded by torchvision into $CACHE_DIR"
    exit 0
  fi
fi

echo "[setup] Fashion-MNIST unavailable (no root for apt-get, no network for torchvision): copy the four *-ubyte.gz files to $CACHE_DIR or set DIFFBIAS_FASHION_MNIST=<their folder>, then rerun make setup"
exit 0
