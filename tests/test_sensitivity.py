"""The instrument's sensitivity (paper 004 fig. 2): the PSNR gap sees memorisation, and sees its absence.

A tiny DiT trained through the real training loop on 4 Fashion-MNIST images until it memorises them must show
a clearly positive mean PSNR gap; the same model and recipe on 2000 images must show a gap near 0. If either
fails, the harness can no longer measure what it exists to measure, whatever the other tests say.
"""

from pathlib import Path

import pytest

from diffbias import data as data_lib
from diffbias.config import RunKey, run_spec, validate_config
from diffbias.metrics.psnr import psnr_gap
from diffbias.train import Trainer, load_trained

FMNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make setup installs it)")

CONFIG = {
    "datasets": {"fm8": {"source": "fashion_mnist", "path": str(FMNIST), "resolution": 8, "channels": 1,
                         "test_size": 200, "max_images": 2400}},
    "training": {"steps": 1500, "batch_size": 8, "lr": 2.0e-3, "ema_decay": 0.99, "ema_warmup": True,
                 "checkpoint_every": 1000, "log_every": 100},
    "variants": {"tiny": {"preset": "DiT-T/2", "options": {"hidden_size": 32, "depth": 2, "num_heads": 2,
                                                           "attention": "G,G"}}},
    "studies": {"s": {"dataset": "fm8", "variants": ["tiny"], "N": [4, 2000], "seeds": [0]}},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cfg = validate_config(CONFIG)
    out = tmp_path_factory.mktemp("sens") / "fm8.npz"
    data_lib.prepare_dataset(cfg["datasets"]["fm8"], str(out))
    return cfg, out


def mean_gap(cfg, data, n, tmp_path):
    spec = run_spec(cfg, RunKey("fm8", "tiny", n, 0))
    Trainer(spec, data, tmp_path, tmp_path / "ck.pt", device="cpu").run(progress=False)
    model, _ = load_trained(tmp_path / "model.pt")
    images, _, _ = data_lib.load_prepared(data)
    train_idx, test_idx = data_lib.split_indices(len(images), n, 200, 0)
    df = psnr_gap(model, data_lib.to_model_range(images[train_idx[:32]]), data_lib.to_model_range(images[test_idx[:32]]),
                  respacing=20)
    return df


def test_memorised_small_set_gives_a_clear_gap_and_a_large_set_none(prepared, tmp_path):
    cfg, data = prepared
    small = mean_gap(cfg, data, 4, tmp_path / "small")
    large = mean_gap(cfg, data, 2000, tmp_path / "large")
    # memorised: the training images are denoised much better than held-out ones, at most noise levels
    assert small["gap"].mean() > 1.5, small
    low_noise = small[small["t"] <= 300]  # at high noise both curves sit at the noise floor and cross at random
    assert (low_noise["psnr_train"] > low_noise["psnr_test"]).all(), low_noise
    # generalising: no systematic difference between training and held-out images
    assert large["gap"].mean() < 0.25, large
    assert small["gap"].mean() > 5 * large["gap"].mean()
