"""Tests for diffbias.data: loaders on tiny fixtures, conversion, resizing, split, cache, value range."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import stat
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from diffbias import data
from diffbias.data import (
    SOURCES,
    center_crop_resize,
    from_model_range,
    load_pool,
    load_prepared,
    prepare_dataset,
    read_idx,
    rgb_to_luma,
    split_indices,
    to_model_range,
)

REAL_FMNIST = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------- fixtures


def write_idx(path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture
def fmnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "fmnist"
    d.mkdir()
    tr_x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    te_x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    tr_y = np.array([0, 1, 2, 3, 4], np.uint8)
    te_y = np.array([9, 8, 7], np.uint8)
    write_idx(d / "train-images-idx3-ubyte.gz", tr_x)
    write_idx(d / "train-labels-idx1-ubyte.gz", tr_y)
    write_idx(d / "t10k-images-idx3-ubyte.gz", te_x)
    write_idx(d / "t10k-labels-idx1-ubyte.gz", te_y)
    return d, np.concatenate([tr_x, te_x]), np.concatenate([tr_y, te_y])


def cifar_row(i: int) -> np.ndarray:
    """Flattened CHW row whose channel c is the constant 10*c + i (so layout errors show)."""
    return np.concatenate([np.full(1024, 10 * c + i, np.uint8) for c in range(3)])


@pytest.fixture
def cifar_dir(tmp_path):
    root = tmp_path / "cifar" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    k = 0
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = np.stack([cifar_row(k), cifar_row(k + 1)])
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": [k % 10, (k + 1) % 10], b"batch_label": b"x"}, f)
        k += 2
    return tmp_path / "cifar"


@pytest.fixture
def imagenet32_dir(tmp_path):
    d = tmp_path / "inet32"
    d.mkdir()
    # batch 10 written first and named so that a lexical sort would put it before batch 2
    for b, first in ((10, 4), (1, 0), (2, 2)):
        rows = np.stack([cifar_row(first), cifar_row(first + 1)])
        np.savez(d / f"train_data_batch_{b}.npz", data=rows, labels=np.array([first + 1, first + 2]), mean=np.zeros(3072))
    np.savez(d / "val_data.npz", data=np.stack([cifar_row(6)]), labels=np.array([1000]))
    return d


def save_png(path, arr) -> None:
    Image.fromarray(arr).save(path)


# ---------------------------------------------------------------- loaders


def test_registry_names():
    assert {"fashion_mnist", "cifar10", "imagenet32", "npz", "image_folder", "celeba", "lsun"} <= set(SOURCES)


def test_read_idx_header_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a.gz")), arr)
    with gzip.open(tmp_path / "a.gz", "rb") as f:
        raw = f.read()
    assert len(raw) == 16 + arr.size  # images offset 16 bytes
    (tmp_path / "b").write_bytes(raw[:-1])  # uncompressed and truncated
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(str(tmp_path / "b"))
    (tmp_path / "c").write_bytes(b"\x01\x02\x08\x01" + raw[4:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(str(tmp_path / "c"))


def test_fashion_mnist_fixture(fmnist_dir):
    d, x, y = fmnist_dir
    images, labels = SOURCES["fashion_mnist"](str(d))
    assert images.shape == (8, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], x)  # train first, then t10k
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, y)
    pool, plabels = load_pool("fashion_mnist", str(d), resolution=28, channels=1)
    assert pool.shape == (8, 1, 28, 28)
    np.testing.assert_array_equal(pool[:, 0], x)
    pool, _ = load_pool("fashion_mnist", str(d), resolution=16, channels=3, max_images=6)
    assert pool.shape == (6, 3, 16, 16) and pool.dtype == np.uint8
    np.testing.assert_array_equal(pool[:, 0], pool[:, 2])


@pytest.mark.skipif(not os.path.isdir(REAL_FMNIST), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files():
    images, labels = load_pool("fashion_mnist", None, resolution=28, channels=1)
    assert images.shape == (70000, 1, 28, 28) and labels.shape == (70000,)
    assert set(np.unique(labels)) == set(range(10))
    assert np.bincount(labels[:60000]).tolist() == [6000] * 10


def test_cifar10_layout(cifar_dir):
    for p in (cifar_dir, cifar_dir / "cifar-10-batches-py"):
        images, labels = SOURCES["cifar10"](str(p))
        assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
        for i in range(12):
            assert images[i, 5, 7].tolist() == [i, 10 + i, 20 + i]  # CHW rows -> HWC pixels
        np.testing.assert_array_equal(labels, np.arange(12) % 10)
    pool, _ = load_pool("cifar10", str(cifar_dir), resolution=32, channels=3, max_images=3)
    assert pool.shape == (3, 3, 32, 32)
    assert pool[2, :, 0, 0].tolist() == [2, 12, 22]


def test_cifar10_missing_batch(cifar_dir):
    os.remove(cifar_dir / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(FileNotFoundError, match="test_batch"):
        SOURCES["cifar10"](str(cifar_dir))


def test_imagenet32_order_and_zero_based_labels(imagenet32_dir):
    images, labels = SOURCES["imagenet32"](str(imagenet32_dir))
    assert images.shape == (7, 32, 32, 3)
    assert [int(images[i, 0, 0, 0]) for i in range(7)] == list(range(7))  # batches 1, 2, 10, then val
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 4, 5, 999])
    assert images[3, 31, 31].tolist() == [3, 13, 23]
    images, labels = SOURCES["imagenet32"](str(imagenet32_dir), include_val=False, max_images=3)
    assert len(images) == 3 and labels.tolist() == [0, 1, 2]


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=nhwc, labels=np.array([3, 2, 1, 0]))
    np.savez(tmp_path / "b.npz", x=nhwc.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "c.npz", nhwc[..., 0])  # arr_0, (N, H, W) grey
    a, la = SOURCES["npz"](str(tmp_path / "a.npz"))
    b, lb = SOURCES["npz"](str(tmp_path / "b.npz"))
    c, _ = SOURCES["npz"](str(tmp_path / "c.npz"))
    np.testing.assert_array_equal(a, nhwc)
    np.testing.assert_array_equal(b, nhwc)
    assert la.tolist() == [3, 2, 1, 0] and lb is None
    assert c.shape == (4, 8, 8, 1)
    pool, labels = load_pool("npz", str(tmp_path / "b.npz"), resolution=8, channels=3)
    np.testing.assert_array_equal(pool, nhwc.transpose(0, 3, 1, 2))
    assert labels is None
    np.savez(tmp_path / "d.npz", images=nhwc.astype(np.float32))
    with pytest.raises(TypeError, match="uint8"):
        SOURCES["npz"](str(tmp_path / "d.npz"))


def test_image_folder_with_classes(tmp_path):
    root = tmp_path / "folder"
    for cls, value in (("zebra", 200), ("ant", 50)):
        (root / cls / "sub").mkdir(parents=True)
        save_png(root / cls / "1.png", np.full((20, 30, 3), value, np.uint8))
        Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(root / cls / "sub" / "2.JPG", quality=100)
        (root / cls / "notes.txt").write_text("ignored")
    images, labels = SOURCES["image_folder"](str(root))
    assert len(images) == 4 and labels.tolist() == [0, 0, 1, 1]  # ant -> 0, zebra -> 1
    assert isinstance(images[0], Image.Image) and images[0].size == (30, 20)
    pool, plabels = load_pool("image_folder", str(root), resolution=8, channels=3)
    assert pool.shape == (4, 3, 8, 8) and pool.dtype == np.uint8
    assert abs(int(pool[0].mean()) - 50) <= 2 and abs(int(pool[3].mean()) - 200) <= 2
    assert plabels.tolist() == [0, 0, 1, 1]


def test_image_folder_flat_and_grey(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    save_png(root / "b.png", np.full((16, 16), 30, np.uint8))  # grey file
    save_png(root / "a.png", np.full((16, 16, 3), (255, 0, 0), np.uint8))  # red file
    images, labels = SOURCES["image_folder"](str(root))
    assert labels is None and len(images) == 2
    rgb, _ = load_pool("image_folder", str(root), resolution=16, channels=3)
    assert rgb[0, :, 0, 0].tolist() == [255, 0, 0] and rgb[1, :, 0, 0].tolist() == [30, 30, 30]
    grey, _ = load_pool("image_folder", str(root), resolution=16, channels=1)
    assert grey.shape == (2, 1, 16, 16) and grey[0, 0, 0, 0] == 76 and grey[1, 0, 0, 0] == 30
    lsun, _ = load_pool("lsun", str(root), resolution=4, channels=3, max_images=1)
    assert lsun.shape == (1, 3, 4, 4)


def test_celeba_centre_crop(tmp_path):
    root = tmp_path / "celeba"
    root.mkdir()
    img = np.zeros((218, 178, 3), np.uint8)
    img[39:179, 19:159] = 255  # exactly the centre 140x140 box
    save_png(root / "000001.png", img)
    cropped, _ = load_pool("celeba", str(root), resolution=16, channels=3)
    assert (cropped == 255).all()
    uncropped, _ = load_pool("image_folder", str(root), resolution=16, channels=3)
    assert (uncropped < 255).any()
    assert data.celeba_crop(Image.fromarray(img)).size == (140, 140)


# ---------------------------------------------------------------- conversion and resizing


def test_luma_matches_pil():
    rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(rgb_to_luma(rgb), np.asarray(Image.fromarray(rgb).convert("L")))
    assert rgb_to_luma(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8)).tolist() == [255, 0, 76]


def test_array_channel_conversion(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb)
    grey, _ = load_pool("npz", str(tmp_path / "rgb.npz"), resolution=8, channels=1)
    assert grey.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(grey[:, 0], rgb_to_luma(rgb))
    np.savez(tmp_path / "grey.npz", images=rgb[..., 0])
    rep, _ = load_pool("npz", str(tmp_path / "grey.npz"), resolution=8, channels=3)
    assert rep.shape == (3, 3, 8, 8)
    for c in range(3):
        np.testing.assert_array_equal(rep[:, c], rgb[..., 0])


def test_center_crop_resize_convention():
    # 64x32 (w x h): short side 32 >= 2*16 -> BOX halve to 32x16 -> bicubic at scale 1 -> centre crop 16x16
    arr = np.zeros((32, 64), np.uint8)
    arr[:, 16:48] = 255  # centre half of the width is white
    out = center_crop_resize(Image.fromarray(arr), 16)
    assert out.size == (16, 16)
    assert (np.asarray(out) == 255).all()
    # upsampling a small image works too, and same-size is the identity
    small = np.random.default_rng(4).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    assert center_crop_resize(Image.fromarray(small), 32).size == (32, 32)
    np.testing.assert_array_equal(np.asarray(center_crop_resize(Image.fromarray(small), 10)), small)


def test_resize_output_shape_dtype(tmp_path):
    x = np.random.default_rng(5).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", images=x)
    for res, ch in ((16, 1), (32, 3), (7, 1)):
        pool, _ = load_pool("npz", str(tmp_path / "g.npz"), resolution=res, channels=ch)
        assert pool.shape == (5, ch, res, res) and pool.dtype == np.uint8
    # same as resizing each image with PIL BICUBIC directly (28 < 32, so no BOX step)
    pool, _ = load_pool("npz", str(tmp_path / "g.npz"), resolution=16, channels=1)
    ref = np.asarray(Image.fromarray(x[1]).resize((16, 16), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(pool[1, 0], ref)


def test_bad_arguments(tmp_path):
    with pytest.raises(KeyError, match="unknown data source"):
        load_pool("mnist_nope", "x", resolution=8, channels=1)
    with pytest.raises(ValueError, match="channels"):
        load_pool("npz", "x", resolution=8, channels=2)
    with pytest.raises(ValueError, match="needs a path"):
        load_pool("cifar10", None, resolution=8, channels=3)


# ---------------------------------------------------------------- split


def test_split_deterministic_and_seed_dependent():
    a = split_indices(1000, 100, 50, 43)
    b = split_indices(1000, 100, 50, 43)
    c = split_indices(1000, 100, 50, 143)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    assert a[0].dtype == np.int64 and a[1].dtype == np.int64


def test_split_is_last_and_first_of_permutation():
    perm = np.random.default_rng(7).permutation(200)
    train, test = split_indices(200, 30, 20, 7)
    np.testing.assert_array_equal(train, perm[-30:])
    np.testing.assert_array_equal(test, perm[:20])
    assert not set(train.tolist()) & set(test.tolist())
    # test set is the same for every n_train; train sets are nested (last n of one order)
    train_small, test2 = split_indices(200, 10, 20, 7)
    np.testing.assert_array_equal(test, test2)
    assert set(train_small.tolist()) <= set(train.tolist())
    full_train, full_test = split_indices(200, 180, 20, 7)
    assert len(set(full_train.tolist()) | set(full_test.tolist())) == 200
    zero_train, _ = split_indices(200, 0, 20, 7)
    assert len(zero_train) == 0


def test_split_too_large_raises():
    with pytest.raises(ValueError, match=r"n_train \+ n_test = 101 exceeds the pool of 100"):
        split_indices(100, 100, 1, 0)
    with pytest.raises(ValueError, match=r"part B: 2 x n_train \+ n_test = 101"):
        split_indices(100, 50, 1, 0, part="B")
    with pytest.raises(ValueError):
        split_indices(100, -1, 1, 0)


def test_part_b_is_disjoint_from_a_with_the_same_test_set():
    perm = np.random.default_rng(3).permutation(300)
    a_train, a_test = split_indices(300, 40, 20, 3)
    b_train, b_test = split_indices(300, 40, 20, 3, part="B")
    np.testing.assert_array_equal(b_train, perm[-80:-40])  # the N images just before A's
    np.testing.assert_array_equal(a_test, b_test)
    assert not set(a_train.tolist()) & set(b_train.tolist()) and not set(b_train.tolist()) & set(a_test.tolist())


def test_official_test_images_are_never_trained_on():
    is_test = np.zeros(500, dtype=bool)
    is_test[400:] = True  # the last 100 images are the official test set (CIFAR-10's test_batch, say)
    for part in ("A", "B"):
        train, test = split_indices(500, 150, 60, 7, part=part, is_test=is_test)
        assert is_test[test].all() and not is_test[train].any() and len(train) == 150 and len(test) == 60
    a, _ = split_indices(500, 150, 60, 7, is_test=is_test)
    b, _ = split_indices(500, 150, 60, 7, part="B", is_test=is_test)
    assert not set(a.tolist()) & set(b.tolist())
    with pytest.raises(ValueError, match="official test images"):
        split_indices(500, 10, 101, 7, is_test=is_test)
    with pytest.raises(ValueError, match="official training images"):
        split_indices(500, 201, 10, 7, part="B", is_test=is_test)


# ---------------------------------------------------------------- prepare / load


def test_prepare_round_trip_and_atomic(tmp_path, fmnist_dir):
    d, x, y = fmnist_dir
    out_dir = tmp_path / "prepared"
    out = out_dir / "fmnist16.npz"
    spec = {"source": "fashion_mnist", "path": str(d), "resolution": 16, "channels": 1, "max_images": 6}
    prepare_dataset(spec, str(out))
    assert sorted(os.listdir(out_dir)) == ["fmnist16.npz"]  # no temporary file left
    images, labels, meta = load_prepared(str(out))
    ref, ref_labels = load_pool("fashion_mnist", str(d), resolution=16, channels=1, max_images=6)
    np.testing.assert_array_equal(images, ref)
    np.testing.assert_array_equal(labels, y[:6])
    assert meta["source"] == "fashion_mnist" and meta["path"] == str(d)
    assert (meta["resolution"], meta["channels"], meta["count"]) == (16, 1, 6)
    json.dumps(meta)


def test_prepared_cache_has_a_normal_file_mode(tmp_path):
    # The cache used to come out 0600 (mkstemp's mode); like every other output it gets 0666 less the umask.
    np.savez(tmp_path / "src.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    out = tmp_path / "out" / "p.npz"
    prepare_dataset({"source": "npz", "path": str(tmp_path / "src.npz"), "resolution": 4, "channels": 3}, str(out))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(out.stat().st_mode) & 0o600 == 0o600
    if umask == 0o022:  # the usual umask: group and others may read it, as every other output
        assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_prepare_unlabelled_and_failed_write(tmp_path, monkeypatch):
    np.savez(tmp_path / "src.npz", images=np.zeros((3, 4, 4, 3), np.uint8))
    out = tmp_path / "out" / "p.npz"
    prepare_dataset({"source": "npz", "path": str(tmp_path / "src.npz"), "resolution": 4, "channels": 3}, str(out))
    with np.load(out) as f:
        assert f["labels"].tolist() == [-1, -1, -1]
    images, labels, meta = load_prepared(str(out))
    assert labels is None and images.shape == (3, 3, 4, 4) and meta["count"] == 3
    before = out.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(data.np, "savez", boom)
    with pytest.raises(RuntimeError):
        prepare_dataset({"source": "npz", "path": str(tmp_path / "src.npz"), "resolution": 2, "channels": 3}, str(out))
    assert sorted(os.listdir(out.parent)) == ["p.npz"] and out.read_bytes() == before


def test_prepare_default_fashion_mnist_path(monkeypatch, fmnist_dir, tmp_path):
    d, _, _ = fmnist_dir
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST_PATH", str(d))
    prepare_dataset({"source": "fashion_mnist", "resolution": 28, "channels": 1}, str(tmp_path / "f.npz"))
    _, _, meta = load_prepared(str(tmp_path / "f.npz"))
    assert meta["path"] == str(d) and meta["count"] == 8


# ---------------------------------------------------------------- value range


def test_model_range_round_trip():
    u = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(u)
    assert x.dtype == torch.float32 and float(x.min()) == -1.0 and float(x.max()) == 1.0
    back = from_model_range(x)
    assert back.dtype == torch.uint8
    np.testing.assert_array_equal(back.numpy(), u)
    np.testing.assert_array_equal(to_model_range(torch.from_numpy(u)).numpy(), x.numpy())
    y = from_model_range(torch.tensor([-3.0, 2.0, 0.0, float("nan")]))
    assert y.tolist() == [0, 255, 128, 0]
    with pytest.raises(TypeError):
        to_model_range(np.zeros(3, np.float32))
