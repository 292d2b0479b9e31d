"""The autoencoder wrapper on a real diffusers AutoencoderKL (tiny, seeded random weights, saved and reloaded)."""

import time

import pytest
import torch

pytest.importorskip("diffusers")

from diffbias.autoencoder import (  # noqa: E402
    SD_SCALE_FACTOR,
    Autoencoder,
    posterior_noise,
    save_tiny_autoencoder,
    tiny_autoencoder_config,
)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return save_tiny_autoencoder(tmp_path_factory.mktemp("vae") / "tiny-vae", seed=0)


def test_tiny_autoencoder_is_sd_shaped_and_small(tiny_vae_dir):
    ae = Autoencoder.load(tiny_vae_dir, "cpu")
    assert (tiny_vae_dir / "config.json").is_file()
    assert ae.fingerprint()["parameters"] == 2067  # a few thousand (SD's VAE: 83.7M)
    assert ae.downsample == 8 and ae.latent_channels == 4 and ae.scale_factor == SD_SCALE_FACTOR
    assert len(ae.vae.config.block_out_channels) == 4 and not ae.vae.training
    assert not any(p.requires_grad for p in ae.vae.parameters())
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    t0 = time.perf_counter()
    z = ae.encode(x)
    y = ae.decode(z)
    assert time.perf_counter() - t0 < 1.0  # four 64x64 images, encode + decode, on one CPU thread
    assert z.shape == (4, 4, 8, 8) and y.shape == (4, 3, 64, 64)
    assert ae.latent_shape(256) == (4, 32, 32)
    with pytest.raises(ValueError, match="multiple of"):
        ae.latent_shape(36)


def test_encode_scales_the_posterior_mean_and_decode_inverts_the_scale(tiny_vae_dir):
    ae = Autoencoder.load(tiny_vae_dir, "cpu")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = ae.vae.encode(x).latent_dist
        direct = ae.vae.decode(dist.mean).sample
    z = ae.encode(x)
    torch.testing.assert_close(z, dist.mean * SD_SCALE_FACTOR)
    torch.testing.assert_close(ae.decode(z), direct, rtol=1e-4, atol=1e-5)  # (z * s) / s rounds


def test_seeded_sample_is_mean_plus_std_times_per_image_noise(tiny_vae_dir):
    ae = Autoencoder.load(tiny_vae_dir, "cpu")
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    a = ae.encode(x, posterior="sample", seed=7, indices=[10, 11, 12, 13, 14])
    with torch.no_grad():
        dist = ae.vae.encode(x).latent_dist
    eps = posterior_noise([10, 11, 12, 13, 14], (4, 4, 4), 7)
    torch.testing.assert_close(a, (dist.mean + dist.std * eps) * SD_SCALE_FACTOR)
    # image 12's noise does not depend on its batch: encoded alone it gets the same sample
    alone = ae.encode(x[2:3], posterior="sample", seed=7, indices=[12])
    torch.testing.assert_close(alone[0], a[2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a, ae.encode(x, posterior="sample", seed=8, indices=[10, 11, 12, 13, 14]))
    with pytest.raises(ValueError, match="needs a seed"):
        ae.encode(x, posterior="sample")


def test_same_seed_same_weights_and_fingerprint(tmp_path):
    a = Autoencoder.load(save_tiny_autoencoder(tmp_path / "a", seed=1), "cpu").fingerprint()
    b = Autoencoder.load(save_tiny_autoencoder(tmp_path / "b", seed=1), "cpu").fingerprint()
    c = Autoencoder.load(save_tiny_autoencoder(tmp_path / "c", seed=2), "cpu").fingerprint()
    assert a == b and a["weights_sha256"] != c["weights_sha256"] and a["config_sha256"] == c["config_sha256"]
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind
    assert tiny_autoencoder_config()["block_out_channels"] == [2, 2, 2, 2]


def test_missing_autoencoder_says_how_to_fetch_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download stabilityai/sd-vae-ft-ema"):
        Autoencoder.load(tmp_path / "nothing", "cpu")
