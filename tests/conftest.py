import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tests share 2 cores; one torch thread each keeps them fast and deterministic.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_dataset(tmp_path):
    """A prepared .npz of 120 random 16x16 grey images (with labels), as prepare_dataset writes it."""
    import numpy as np

    from diffbias.data import prepare_dataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(120, 16, 16, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=120)
    src = tmp_path / "pool.npz"
    np.savez(src, images=images, labels=labels)
    out = tmp_path / "tiny.npz"
    prepare_dataset({"source": "npz", "path": str(src), "resolution": 16, "channels": 1}, str(out))
    return out
