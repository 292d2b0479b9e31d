"""Latent caches: ADM's crop, the ImageNet layout, encode once (== on-the-fly encoding), resume after a kill,
read back memory-mapped, and train on it. A real diffusers AutoencoderKL (tiny, seeded random weights)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from diffbias import data as data_lib  # noqa: E402
from diffbias import latents  # noqa: E402
from diffbias.autoencoder import Autoencoder, save_tiny_autoencoder  # noqa: E402
from diffbias.latents import LatentPool, encode_dataset  # noqa: E402

COUNT, SHARD, BATCH = 40, 16, 8  # shards [0,16) [16,32) [32,40); batches of 8 inside them


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_autoencoder(tmp_path_factory.mktemp("vae") / "tiny-vae", seed=0)


def _spec(vae_dir, **latent):
    return {"source": "fixture", "path": "latents-test", "resolution": 32, "channels": 3, "max_images": COUNT,
            "test_size": 8, "latents": {"autoencoder": str(vae_dir), "shard_size": SHARD, **latent}}


def _encode(spec, out, **kw):
    return encode_dataset(spec, out, device="cpu", batch_size=BATCH, progress=False, **kw)


def _on_the_fly(vae_dir, spec, *, flip=False, **enc):
    """Encode the same images directly, in the same batches, as float16."""
    images, _ = data_lib.load_pool("fixture", "latents-test", resolution=32, channels=3, max_images=COUNT)
    x = data_lib.to_model_range(images)
    x = x.flip(-1) if flip else x
    ae = Autoencoder.load(vae_dir, "cpu")
    out = []
    for lo, hi in latents.shard_ranges(COUNT, SHARD):
        idx = list(range(lo, hi))
        ids = [i + COUNT for i in idx] if flip else idx
        out.append(ae.encode(x[lo:hi], indices=ids, batch_size=BATCH, **enc))
    return torch.cat(out).numpy().astype(np.float16)


# ---------------------------------------------------------------------------------------------- images
def test_center_crop_resize_follows_adm():
    """BOX-halve while the short side >= 2x the size, BICUBIC so the short side equals it, centre crop."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (900, 1100, 3), dtype=np.uint8))  # 1100 wide, 900 high
    out = data_lib.center_crop_resize(img, 256)
    step = img.resize((550, 450), resample=Image.Resampling.BOX)  # 900 >= 512: halve once; 450 < 512: stop
    step = step.resize((313, 256), resample=Image.Resampling.BICUBIC)  # round(550 * 256 / 450) = 313
    expected = step.crop((28, 0, 284, 256))  # (313 - 256) // 2 = 28
    assert out.size == (256, 256) and np.array_equal(np.asarray(out), np.asarray(expected))
    small = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))  # upsampled: short side 200 -> 256
    expected = small.resize((256, 384), resample=Image.Resampling.BICUBIC).crop((0, 64, 256, 320))
    assert np.array_equal(np.asarray(data_lib.center_crop_resize(small, 256)), np.asarray(expected))


def test_imagenet_layout_labels_from_sorted_class_folders(tmp_path):
    for split in ("train", "val"):
        for wnid, n in (("n02000000", 2), ("n01000000", 1)):
            (tmp_path / split / wnid).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), (10 * i, 0, 0)).save(tmp_path / split / wnid / f"{wnid}_{i}.JPEG")
    images, labels, _ = data_lib.load_source({"source": "imagenet", "path": str(tmp_path)})
    assert list(labels) == [0, 1, 1] and [os.path.basename(f) for f in images.files][0] == "n01000000_0.JPEG"
    images, labels, _ = data_lib.load_source({"source": "imagenet", "path": str(tmp_path), "loader_kwargs": {"split": "val"}})
    assert list(labels) == [0, 1, 1]
    assert data_lib.preprocess_image(images[0], 16, 3).shape == (3, 16, 16)
    (tmp_path / "val" / "n03000000").mkdir()
    with pytest.raises(ValueError, match="different class folders"):
        data_lib.load_imagenet(str(tmp_path), split="val")


def test_streamed_preprocessing_equals_the_pool(tmp_path):
    spec = {"source": "fixture", "path": "x", "resolution": 16, "channels": 3, "max_images": 6}
    pool, labels = data_lib.load_pool("fixture", "x", resolution=16, channels=3, max_images=6)
    images, lab, _ = data_lib.load_source(spec)
    assert np.array_equal(np.stack([data_lib.preprocess_image(im, 16, 3) for im in images]), pool)
    assert np.array_equal(lab, labels)


# ---------------------------------------------------------------------------------------------- the cache
def test_cache_equals_on_the_fly_encoding_and_loads_memory_mapped(vae_dir, tmp_path):
    spec = _spec(vae_dir, hflip=True)
    meta = _encode(spec, tmp_path / "c")
    assert meta["count"] == COUNT and meta["latent_shape"] == [4, 4, 4] and meta["dtype"] == "float16"
    assert meta["posterior"] == "mean" and meta["seed"] is None and meta["hflip"]
    assert meta["autoencoder"]["scale_factor"] == pytest.approx(0.18215) and len(meta["autoencoder"]["weights_sha256"]) == 64
    assert [(s["start"], s["stop"]) for s in meta["shards"]] == [(0, 16), (16, 32), (32, 40)]
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["spec"] == spec
    pool = LatentPool(tmp_path / "c")
    assert all(isinstance(a, np.memmap) for a in pool._shards["latents"] + pool._shards["hflip"])
    assert len(pool) == COUNT and pool.nbytes == COUNT * 64 * 2
    assert np.array_equal(pool[:], _on_the_fly(vae_dir, spec))  # exact: the same batches, cast to float16
    assert np.array_equal(pool.gather(np.arange(COUNT), hflip=True), _on_the_fly(vae_dir, spec, flip=True))
    # the mirrored image's latent is not the mirrored latent (the VAE is not flip-equivariant)
    assert not np.array_equal(pool.gather([0], hflip=True), pool[[0]][..., ::-1])
    idx = [39, 0, 17, 17, 5]
    assert np.array_equal(pool[idx], pool[:][idx])
    assert np.array_equal(pool.labels, np.arange(COUNT) % 10)


def test_seeded_posterior_sample_equals_on_the_fly(vae_dir, tmp_path):
    spec = _spec(vae_dir, posterior="sample", seed=5)
    meta = _encode(spec, tmp_path / "s")
    assert meta["seed"] == 5
    pool = LatentPool(tmp_path / "s")
    assert np.array_equal(pool[:], _on_the_fly(vae_dir, spec, posterior="sample", seed=5))
    assert not np.array_equal(pool[:], _on_the_fly(vae_dir, spec))


class _Killed(BaseException):
    pass


def test_killed_encode_resumes_to_the_same_files(vae_dir, tmp_path, monkeypatch):
    spec = _spec(vae_dir, hflip=True)
    _encode(spec, tmp_path / "full")
    real = data_lib.preprocess_image
    calls = []

    def dies_in_the_second_shard(image, resolution, channels):
        calls.append(1)
        if len(calls) > 20:  # image 20 of shard [16, 32)
            raise _Killed
        return real(image, resolution, channels)

    monkeypatch.setattr(data_lib, "preprocess_image", dies_in_the_second_shard)
    with pytest.raises(_Killed):
        _encode(spec, tmp_path / "r")
    monkeypatch.setattr(data_lib, "preprocess_image", real)
    shards = sorted(p.name for p in (tmp_path / "r" / "shards").iterdir())
    assert shards == ["hflip-00000.npy", "latents-00000.npy"]  # only the complete shard; no temporary files
    with pytest.raises(FileNotFoundError, match="not a complete latent cache"):
        LatentPool(tmp_path / "r")
    first = tmp_path / "r" / "shards" / "latents-00000.npy"
    before = first.stat().st_mtime_ns, first.stat().st_ino
    meta = _encode(spec, tmp_path / "r")
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == before  # skipped, not re-encoded
    for name in ["labels.npy"] + [f"shards/{k}-{i:05d}.npy" for k in ("latents", "hflip") for i in range(3)]:
        assert (tmp_path / "r" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    full = json.loads((tmp_path / "full" / "meta.json").read_text())
    assert {k: v for k, v in meta.items() if k != "encoded_images_per_s"} == \
        {k: v for k, v in full.items() if k != "encoded_images_per_s"}


def test_another_plan_starts_afresh(vae_dir, tmp_path):
    _encode(_spec(vae_dir), tmp_path / "c")
    mean = LatentPool(tmp_path / "c")[:].copy()
    _encode(_spec(vae_dir, posterior="sample", seed=1), tmp_path / "c")
    assert not np.array_equal(LatentPool(tmp_path / "c")[:], mean)
    with pytest.raises(ValueError, match="latents.autoencoder"):
        encode_dataset({"source": "fixture", "path": "x", "resolution": 32, "channels": 3}, tmp_path / "x")
    with pytest.raises(ValueError, match="channels must be 3"):
        encode_dataset({**_spec(vae_dir), "channels": 1}, tmp_path / "x")


def test_encode_latents_command(vae_dir, tmp_path, capsys):
    from diffbias.cli import main

    main(["encode-latents", "--spec", json.dumps(_spec(vae_dir)), "--out", str(tmp_path / "cli"), "--device", "cpu",
          "--batch-size", str(BATCH), "--threads", "1"])
    out = capsys.readouterr().out
    assert "40/40 images" in out and "3 shards" in out
    assert LatentPool(tmp_path / "cli" / "meta.json").meta["count"] == COUNT


# ---------------------------------------------------------------------------------------------- training
def _run_spec(vae_dir, hflip=True):
    return {
        "run": {"dataset": "lat", "variant": "dit", "N": 16, "seed": 3},
        "dataset": _spec(vae_dir, hflip=True),
        "model": {"backbone": "dit", "preset": "DiT-T/2",
                  "options": {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 2, "attention": "G,G"}},
        "training": {"steps": 4, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "ema_decay": 0.999,
                     "ema_warmup": True, "hflip": hflip, "class_conditional": True, "label_dropout": 0.1,
                     "checkpoint_every": 2, "log_every": 2, "grad_clip": None},
    }


def test_training_on_latents_device_and_memmap_paths_agree(vae_dir, tmp_path, monkeypatch):
    from diffbias import train

    _encode(_spec(vae_dir, hflip=True), tmp_path / "c")
    a = train.Trainer(_run_spec(vae_dir), tmp_path / "c", tmp_path / "a", tmp_path / "a.ckpt", device="cpu")
    assert a.x_train is not None and a.x_train.shape == (16, 4, 4, 4) and a.in_channels == 4 and a.input_size == 4
    x, t, noise, y = a.sample_batch()
    assert x.shape == noise.shape == (4, 4, 4, 4) and y is not None
    a = train.Trainer(_run_spec(vae_dir), tmp_path / "c", tmp_path / "a", tmp_path / "a.ckpt", device="cpu")
    a.run(progress=False)
    monkeypatch.setattr(train, "LATENTS_ON_DEVICE_BYTES", 0)  # gather every batch from the memory-mapped shards
    b = train.Trainer(_run_spec(vae_dir), tmp_path / "c", tmp_path / "b", tmp_path / "b.ckpt", device="cpu")
    assert b.x_train is None
    b.run(progress=False)
    ea, eb = (torch.load(d / "model.pt", weights_only=False) for d in (tmp_path / "a", tmp_path / "b"))
    assert ea["in_channels"] == 4 and ea["input_size"] == 4
    assert all(torch.equal(ea["ema"][k], eb["ema"][k]) for k in ea["ema"])


def test_training_hflip_needs_the_mirrored_latents(vae_dir, tmp_path):
    from diffbias.train import Trainer

    _encode(_spec(vae_dir, hflip=False), tmp_path / "c")
    with pytest.raises(ValueError, match=r"datasets\.lat\.latents\.hflip"):
        Trainer(_run_spec(vae_dir, hflip=True), tmp_path / "c", tmp_path / "a", tmp_path / "a.ckpt", device="cpu")
    Trainer(_run_spec(vae_dir, hflip=False), tmp_path / "c", tmp_path / "a", tmp_path / "a.ckpt", device="cpu")
