"""What the DAG build rejects before any job, and where Fashion-MNIST is found.

- every model a config names is built on the meta device with its resolved options at its data shape;
- every data set whose preparation Snakemake will schedule is checked on disk (layout of its source, pixel
  dtype, pool size against N + test_size); a pool already prepared from the same config entry is not;
- the Fashion-MNIST folder rule for users without root (Debian folder, $DIFFBIAS_FASHION_MNIST,
  .cache/fashion-mnist) and the data step of scripts/setup.sh, run with a fake environment.
"""

import json

import copy
import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffbias import data
from diffbias.config import ConfigError, _meta_build_error, check_datasets, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def default():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def _error(fn, *args) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return info.value


# ---------------------------------------------------------------- models built at DAG time


def test_unknown_model_option_is_rejected_with_the_models_message(default):
    default["variants"]["dit_local_head"]["options"]["depthh"] = 3
    err = _error(validate_config, default)
    assert err.key == "variants.dit_local_head.options"
    assert "unexpected keyword argument 'depthh'" in str(err)


def test_inconsistent_model_is_rejected_with_the_models_message(default):
    default["variants"]["dit"]["options"] = {"hidden_size": 65, "num_heads": 2}
    err = _error(validate_config, default)
    assert err.key == "variants.dit.options" and "65 is not divisible by 2 heads" in str(err)


def test_shape_dependent_model_error_names_the_variant(default):
    # a UNet whose attention resolution is not one of its feature sizes at 16x16
    default["variants"]["unet"] = {"preset": "UNet-T", "options": {"attention_resolutions": [3]}}
    default["studies"]["locality"]["variants"].append("unet")
    err = _error(validate_config, default)
    assert err.key == "variants.unet.options" and "1x16x16" in str(err)


def test_models_are_built_once_per_distinct_model_and_shape():
    raw = yaml.safe_load((ROOT / "workflow/configs/paper-004.yaml").read_text())
    _meta_build_error.cache_clear()
    validate_config(raw)
    info = _meta_build_error.cache_info()
    # every distinct model at 3x32x32: one build each, however many variants (table 1's † rows differ from theirs in
    # training only), data sets, N, seeds and training splits use it (xs_b is xs on split B: the same model)
    models = {(v.get("preset"), json.dumps(v.get("options") or {}, sort_keys=True)) for v in raw["variants"].values()}
    assert info.misses == len(models) == 16 and info.hits > 0
    validate_config(raw)
    assert _meta_build_error.cache_info().misses == info.misses


def test_every_preset_builds_on_meta_without_weights():
    import torch

    from diffbias.config import skip_init_on_meta
    from diffbias.models import PRESETS, build_model

    for name, preset in PRESETS.items():
        c, size = preset.reference.get("input", (3, 32))
        if name == "UNet-T":
            size = 16
        with torch.device("meta"), skip_init_on_meta():
            model = build_model(preset=name, input_size=size, in_channels=c)
        assert all(p.is_meta for p in model.parameters()), name


# ---------------------------------------------------------------- data sets on disk


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def fake_fashion_mnist(d: Path, n_train: int = 5, n_test: int = 3) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28), np.uint8))
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", np.zeros(n, np.uint8))
    return d


def npz_config(path, **dataset) -> dict:
    cfg = {
        "datasets": {"pool": {"source": "npz", "path": str(path), "resolution": 8, "channels": 1, "test_size": 2, **dataset}},
        "variants": {"dit": {"preset": "DiT-T/2", "options": {"depth": 2, "attention": "G,G"}}},
        "studies": {"s": {"dataset": "pool", "variants": ["dit"], "N": [3]}},
    }
    return validate_config(cfg)


def test_missing_dataset_path_names_the_key_and_the_path(tmp_path):
    cfg = npz_config(tmp_path / "nowhere.npz")
    err = _error(check_datasets, cfg)
    assert err.key == "datasets.pool.path" and str(tmp_path / "nowhere.npz") in str(err)


def test_npz_layout_count_and_pool_size(tmp_path):
    np.savez(tmp_path / "ok.npz", images=np.zeros((6, 8, 8), np.uint8))
    check_datasets(npz_config(tmp_path / "ok.npz"))  # 3 + 2 <= 6
    check_datasets(npz_config(tmp_path / "ok.npz", pool_size=6))
    err = _error(check_datasets, npz_config(tmp_path / "ok.npz", pool_size=7))
    assert err.key == "datasets.pool.pool_size" and "holds 6 images" in str(err)
    np.savez(tmp_path / "small.npz", images=np.zeros((4, 8, 8), np.uint8))
    err = _error(check_datasets, npz_config(tmp_path / "small.npz"))
    assert err.key == "datasets.pool.path" and "fewer than N=3 plus test_size=2" in str(err)
    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((6, 8, 8), np.uint8))
    err = _error(check_datasets, npz_config(tmp_path / "wrong.npz"))
    assert err.key == "datasets.pool.path" and "no image array" in str(err)


def test_npz_pixel_dtype_is_checked_from_the_header(tmp_path):
    """Float pixels fail at the DAG build, not when prepare_data runs; integer and bool pixels pass (an
    integer range outside 0..255 is found when the pool is loaded)."""
    for dtype in ("float32", "float64", "float16"):
        path = tmp_path / f"{dtype}.npz"
        np.savez(path, images=np.zeros((6, 8, 8), dtype))
        err = _error(check_datasets, npz_config(path))
        assert err.key == "datasets.pool.path" and f"dtype {dtype}" in str(err) and str(path) in str(err)
    for dtype in ("uint8", "int16", "int64", "bool"):
        np.savez(tmp_path / f"{dtype}.npz", images=np.zeros((6, 8, 8), dtype))
        check_datasets(npz_config(tmp_path / f"{dtype}.npz"))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int8", "int32", "int64", "bool", "float16", "float32",
                                   "float64", "complex64"])
def test_npz_dtype_check_accepts_what_the_loader_accepts(tmp_path, dtype):
    path = tmp_path / "pool.npz"
    np.savez(path, images=np.zeros((6, 8, 8), dtype))
    try:
        data._as_uint8(np.zeros(3, dtype), "pixels")
        loads = True
    except TypeError:
        loads = False
    try:
        data.check_source("npz", str(path))
        checks = True
    except ValueError:
        checks = False
    assert checks == loads, dtype


def _prepare_like_the_rule(cfg: dict, key: str, prepared: Path) -> None:
    """What rule prepare_data does: the config entry, as sorted-key JSON, to ``prepare-data --spec``."""
    prepared.mkdir(exist_ok=True)
    data.prepare_dataset(json.loads(json.dumps(cfg["datasets"][key], sort_keys=True)), str(prepared / f"{key}.npz"))


def test_prepared_pool_is_not_checked_only_while_its_config_entry_is_unchanged(tmp_path):
    """A prepared pool stands in for its source only while the config entry it was prepared from is the current
    one; after an edit Snakemake prepares it again (its params changed), so the source is checked first."""
    source, prepared = tmp_path / "pool.npz", tmp_path / "prepared"
    np.savez(source, images=np.zeros((6, 8, 8), np.uint8))
    cfg = npz_config(source)
    _prepare_like_the_rule(cfg, "pool", prepared)
    assert data.load_prepared(str(prepared / "pool.npz"))[2]["config_entry"] == cfg["datasets"]["pool"]
    source.unlink()
    check_datasets(cfg, prepared_dir=prepared)  # prepared from this very entry: no job reads the source

    moved = npz_config(tmp_path / "moved" / "pool.npz")  # the path edited to a folder that does not exist
    err = _error(check_datasets, moved, prepared)
    assert err.key == "datasets.pool.path" and "does not exist" in str(err)
    capped = npz_config(source, max_images=5)  # any other edit of the entry too
    assert _error(check_datasets, capped, prepared).key == "datasets.pool.path"

    # a pool without the record (prepared before it was kept) or unreadable: its source is checked
    np.savez(prepared / "pool.npz", images=np.zeros((6, 1, 8, 8), np.uint8), labels=np.zeros(6, np.int64),
             meta=np.array(json.dumps({"source": "npz", "path": str(source)})))
    assert _error(check_datasets, cfg, prepared).key == "datasets.pool.path"
    (prepared / "pool.npz").write_bytes(b"")
    assert _error(check_datasets, cfg, prepared).key == "datasets.pool.path"


def test_unused_datasets_are_not_checked(tmp_path):
    cfg = npz_config(tmp_path / "nowhere.npz")
    cfg["datasets"]["unused"] = dict(cfg["datasets"]["pool"], path=str(tmp_path / "also-nowhere"))
    np.savez(tmp_path / "nowhere.npz", images=np.zeros((6, 8, 8), np.uint8))
    check_datasets(cfg)


@pytest.mark.parametrize("source", ["celeba", "lsun", "image_folder"])
def test_image_folder_layouts(tmp_path, source):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    cfg = npz_config(folder)
    cfg["datasets"]["pool"]["source"] = source
    err = _error(check_datasets, cfg)
    assert err.key == "datasets.pool.path" and "no .png" in str(err) and str(folder) in str(err)
    (folder / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(folder / "sub" / "a.png")
    check_datasets(cfg)


def test_cifar10_and_imagenet32_layouts(tmp_path):
    cfg = npz_config(tmp_path / "cifar")
    cfg["datasets"]["pool"]["source"] = "cifar10"
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    err = _error(check_datasets, cfg)
    assert err.key == "datasets.pool.path" and "data_batch_1" in str(err)
    cfg["datasets"]["pool"]["source"] = "imagenet32"
    cfg["datasets"]["pool"]["path"] = str(tmp_path / "inet")
    (tmp_path / "inet").mkdir()
    err = _error(check_datasets, cfg)
    assert "train_data_batch" in str(err)
    np.savez(tmp_path / "inet" / "train_data_batch_1.npz", data=np.zeros((9, 12), np.uint8), labels=np.ones(9))
    check_datasets(cfg)
    assert data.check_source("imagenet32", str(tmp_path / "inet")) == 9


def test_fashion_mnist_folder_rule(tmp_path, monkeypatch):
    debian, env_dir, cache = tmp_path / "debian", tmp_path / "env", tmp_path / "cache"
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_PATH", str(debian))
    monkeypatch.setattr(data, "FASHION_MNIST_CACHE", str(cache))
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=data.FASHION_MNIST_ENV):
        data.resolve_fashion_mnist_path(None)
    fake_fashion_mnist(cache)
    assert data.resolve_fashion_mnist_path(None) == str(cache)
    assert data.resolve_fashion_mnist_path(str(debian)) == str(cache)  # the Debian default falls back
    fake_fashion_mnist(env_dir)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(env_dir))
    assert data.resolve_fashion_mnist_path(None) == str(env_dir)
    fake_fashion_mnist(debian)
    assert data.resolve_fashion_mnist_path(None) == str(debian)
    other = tmp_path / "mnist"
    assert data.resolve_fashion_mnist_path(str(other)) == str(other)  # any other path is used as given
    assert data.check_source("fashion_mnist", None) == 8
    images, _ = data.load_fashion_mnist(None)
    assert images.shape == (8, 28, 28, 1)


def test_fashion_mnist_check_through_the_config(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_PATH", str(tmp_path / "debian"))
    monkeypatch.setattr(data, "FASHION_MNIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    cfg = validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()))
    cfg["datasets"]["fmnist16"]["path"] = str(tmp_path / "debian")
    err = _error(check_datasets, cfg)
    assert err.key == "datasets.fmnist16.path" and "DIFFBIAS_FASHION_MNIST" in str(err)
    fake_fashion_mnist(tmp_path / "cache", n_train=600, n_test=500)
    err = _error(check_datasets, cfg)  # 1100 images < N=10000 + 1000
    assert err.key == "datasets.fmnist16.path" and "1100 usable images" in str(err)


# ---------------------------------------------------------------- through Snakemake (the DAG build itself)


def snakemake_dry_run(config_path: Path, cwd: Path, **env):
    environ = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env)
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1", "-n",
         "--configfile", str(config_path)],
        cwd=cwd, env=environ, capture_output=True, text=True, timeout=300,
    )


BAD_CONFIGS = {
    "unknown_option": (lambda c: c["variants"]["dit"].setdefault("options", {}).update(depthh=3),
                       "variants.dit.options", "unexpected keyword argument 'depthh'"),
    "inconsistent_model": (lambda c: c["variants"]["dit"].setdefault("options", {}).update(hidden_size=65, num_heads=2),
                           "variants.dit.options", "hidden size 65 is not divisible by 2 heads"),
    "missing_data": (lambda c: c["datasets"]["fmnist8"].update(path="/nonexistent/fashion-mnist"),
                     "datasets.fmnist8.path", "/nonexistent/fashion-mnist"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_snakemake_dry_run_rejects_bad_config_before_any_job(tmp_path, case):
    edit, key, message = BAD_CONFIGS[case]
    cfg = yaml.safe_load((ROOT / "workflow/configs/micro.yaml").read_text())
    edit(cfg)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake_dry_run(tmp_path / "bad.yaml", tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and f"config error at '{key}'" in out and message in out, out[-3000:]
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------- latent data sets


def latent_config(tmp_path, **dataset) -> dict:
    return {
        "datasets": {"lat": {"source": "fixture", "path": "lat", "resolution": 256, "channels": 3, "test_size": 4,
                             "latents": {"autoencoder": str(tmp_path / "vae")}, **dataset}},
        "variants": {"dit": {"preset": "DiT-T/2", "options": {"depth": 2, "attention": "G,G"}}},
        "studies": {"s": {"dataset": "lat", "variants": ["dit"], "N": [8]}},
    }


def test_models_are_checked_at_the_latent_shape(tmp_path):
    cfg = latent_config(tmp_path)
    cfg["variants"]["dit"]["options"]["patch_size"] = 64  # divides the 256 pixels, not the 32 latents a side
    err = _error(validate_config, cfg)
    assert err.key == "variants.dit.options.patch_size" and "input side 32" in str(err)
    cfg = latent_config(tmp_path)
    cfg["variants"]["dit"]["options"].update(hidden_size=65, num_heads=2)
    err = _error(validate_config, cfg)
    assert err.key == "variants.dit.options" and "4x32x32 input of latents" in str(err)
    err = _error(validate_config, latent_config(tmp_path, resolution=252))
    assert err.key == "datasets.lat.resolution" and "downsampling 8" in str(err)


def test_latent_autoencoder_statistics_and_test_images_are_checked_on_disk(tmp_path):
    from diffbias.autoencoder import save_tiny_autoencoder

    cfg = validate_config(latent_config(tmp_path))
    err = _error(check_datasets, cfg)
    assert err.key == "datasets.lat.latents.autoencoder" and "hf download" in str(err)
    save_tiny_autoencoder(tmp_path / "vae")
    check_datasets(cfg)
    raw = latent_config(tmp_path)
    raw["evaluation"] = {"fid": {"N": [8], "reference_statistics": {"lat": str(tmp_path / "VIRTUAL.npz")}}}
    err = _error(check_datasets, validate_config(raw))
    assert err.key == "evaluation.fid.reference_statistics.lat" and "VIRTUAL.npz" in str(err)
    np.savez(tmp_path / "VIRTUAL.npz", mu=np.zeros(2), sigma=np.eye(2))
    check_datasets(validate_config(raw))
    folder = latent_config(tmp_path, source="image_folder", path=str(tmp_path), test_path=str(tmp_path / "val"))
    (tmp_path / "a.png").write_bytes(b"")
    err = _error(check_datasets, validate_config(folder))
    assert err.key == "datasets.lat.test_path" and str(tmp_path / "val") in str(err)


def test_a_test_path_gives_any_source_an_official_split(tmp_path):
    lsun = dict(source="lsun", path=str(tmp_path / "train"), split="official")
    err = _error(validate_config, latent_config(tmp_path, **lsun))
    assert err.key == "datasets.lat.split" and "test_path" in str(err)  # one folder: no official test images
    validate_config(latent_config(tmp_path, **lsun, test_path=str(tmp_path / "val")))


def test_a_latent_cache_of_the_current_entry_needs_no_source(tmp_path):
    import json

    from diffbias.autoencoder import save_tiny_autoencoder
    from diffbias.latents import cache_spec

    save_tiny_autoencoder(tmp_path / "vae")
    cfg = validate_config(latent_config(tmp_path, source="image_folder", path=str(tmp_path / "nowhere")))
    prepared = tmp_path / "results" / "data"
    assert _error(check_datasets, cfg, prepared).key == "datasets.lat.path"
    meta = tmp_path / "results" / "latents" / "lat" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"spec": cache_spec(cfg["datasets"]["lat"])}))
    check_datasets(cfg, prepared)  # encoded from this entry: no job reads the source
    cfg["datasets"]["lat"]["test_size"] = 5
    check_datasets(cfg, prepared)  # the test set's size does not change the latents (nor the encode job)
    cfg["datasets"]["lat"]["resolution"] = 128
    assert _error(check_datasets, cfg, prepared).key == "datasets.lat.path"
