"""Image pools, preprocessing and the train/test split of paper 004 (appendix A.2).

Pipeline
--------
1. A *source loader* (``SOURCES[name](path, **kw)``) reads a data set from local files and returns
   ``(images, labels)``: ``images`` is either a uint8 ``(N, H, W, C)`` array at the original size or a
   sequence of PIL images (possibly lazy, opened on access); ``labels`` is an int64 array or ``None``.
   Nothing is ever downloaded: every loader reads files that are already on disk.
2. :func:`load_pool` converts channels and resizes every image to ``resolution x resolution`` and returns a
   uint8 ``(N, C, H, W)`` array.
3. :func:`prepare_dataset` caches that pool as an ``.npz`` (written atomically); :func:`load_prepared`
   reads it back. When the source ships an official split (CIFAR-10's ``test_batch``, Fashion-MNIST's ``t10k``,
   Imagenet32's ``val_data``, ImageNet's ``val/``, CelebA's ``list_eval_partition.txt``), the file also holds
   ``is_test``, the pool's official test/validation images (:func:`official_test_mask`).
4. :func:`split_indices` picks the train/test split exactly as appendix A.2 describes: shuffle the whole
   pool once, TRAIN = the *last* ``n_train`` images of the shuffled order, TEST = the *first* ``n_test``.
   The split depends only on the pool size and the seed, so every backbone sees the same split. A data set
   with ``split: official`` draws its test set from the official test images only and trains only on the
   others (:func:`run_test_mask`).
5. :func:`to_model_range` / :func:`from_model_range` map uint8 pixels to the model's ``[-1, 1]`` range
   and back.

Resizing convention
-------------------
The resize follows the centre-crop convention of ADM / improved-diffusion, the code base the paper's UNet
comes from: while the short side is at least ``2 * resolution`` the image is halved with PIL's BOX filter;
then one BICUBIC resize makes the short side equal to ``resolution`` (long side ``round(side * scale)``);
then the centre ``resolution x resolution`` square is cropped (offset ``(side - resolution) // 2``).
It is done with PIL, one image at a time, for every source (arrays included), so that all sources are
treated identically and the result is deterministic. That is fast enough for the pools used here
(measured: 70,000 Fashion-MNIST images 28x28 -> 16x16 in 2.5-6 s on one busy core, including reading); images already at
``resolution x resolution`` are passed through unchanged (PIL's resize to the same size is the identity).

Channels
--------
``channels=3`` with grey input replicates the grey plane; ``channels=1`` with colour input uses the
ITU-R 601-2 luma transform ``L = 0.299 R + 0.587 G + 0.114 B`` with the same 16-bit fixed-point rounding
as PIL's ``convert('L')``, so array sources and image-file sources give identical grey values. Luma
conversion happens *before* resizing, replication *after* (replication commutes with resizing exactly).
An alpha channel is dropped.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import struct
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .io import atomic_path

__all__ = [
    "SOURCES",
    "DEFAULT_FASHION_MNIST_PATH",
    "resolve_fashion_mnist_path",
    "check_source",
    "IMAGE_EXTENSIONS",
    "load_pool",
    "prepare_dataset",
    "load_prepared",
    "split_indices",
    "run_split",
    "DATASET_SPLITS",
    "official_test_mask",
    "official_split_problem",
    "prepared_test_mask",
    "run_test_mask",
    "SPLIT_PARTS",
    "to_model_range",
    "from_model_range",
    "center_crop_resize",
    "load_source",
    "source_pool",
    "SourcePool",
    "PixelImages",
    "preprocess_image",
    "read_idx",
    "rgb_to_luma",
]

DEFAULT_FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
# Where a user without root keeps Fashion-MNIST (scripts/setup.sh fills it): see resolve_fashion_mnist_path.
FASHION_MNIST_ENV = "DIFFBIAS_FASHION_MNIST"
FASHION_MNIST_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                   ".cache", "fashion-mnist")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
PREPARED_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _truncate(images, labels, max_images: int | None):
    if max_images is None:
        return images, labels
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    images = images[:max_images]
    if labels is not None:
        labels = labels[:max_images]
    return images, labels


def _flat_chw_to_nhwc(data: np.ndarray) -> np.ndarray:
    """(N, 3*S*S) rows stored channel-major (CIFAR / Imagenet32 layout) -> (N, S, S, 3) uint8."""
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] % 3:
        raise ValueError(f"expected (N, 3*S*S) flattened CHW rows, got shape {data.shape}")
    side = int(round((data.shape[1] // 3) ** 0.5))
    if 3 * side * side != data.shape[1]:
        raise ValueError(f"row length {data.shape[1]} is not 3*S*S for an integer S")
    return np.ascontiguousarray(data.astype(np.uint8, copy=False).reshape(-1, 3, side, side).transpose(0, 2, 3, 1))


def _as_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{what}: integer pixel values outside 0..255")
        return arr.astype(np.uint8)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    raise TypeError(f"{what}: expected uint8 pixels, got dtype {arr.dtype}")


def rgb_to_luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of a uint8 ``(..., 3)`` array, bit-identical to PIL's ``convert('L')``."""
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected a trailing RGB axis, got shape {rgb.shape}")
    r = rgb[..., 0].astype(np.uint32)
    g = rgb[..., 1].astype(np.uint32)
    b = rgb[..., 2].astype(np.uint32)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def center_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """ADM's centre-crop resize: BOX-halve while short side >= 2*res, BICUBIC to short side = res, crop."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.Resampling.BOX)
    scale = resolution / min(img.size)
    new_size = tuple(max(resolution, round(s * scale)) for s in img.size)
    img = img.resize(new_size, resample=Image.Resampling.BICUBIC)
    w, h = img.size
    left = (w - resolution) // 2
    top = (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


class LazyImages(Sequence):
    """A sequence of image files opened (and optionally transformed) only when indexed.

    Slicing returns another ``LazyImages``; indexing with an int returns a loaded ``PIL.Image``.
    """

    def __init__(self, files: Sequence[str], transform: Callable[[Image.Image], Image.Image] | None = None):
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LazyImages(self.files[i], self.transform)
        with Image.open(self.files[i]) as im:
            im.load()
            img = im.copy() if self.transform is None else self.transform(im)
        return img

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} files)"


# ----------------------------------------------------------------------------------------------------
# source loaders
# ----------------------------------------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (as used by MNIST / Fashion-MNIST), gzip-compressed if its name ends in ``.gz``.

    Header: two zero bytes, a type code (only 0x08 = unsigned byte is accepted), the number of dimensions
    ``d``, then ``d`` big-endian int32 sizes; the data follow (offset 16 for images, 8 for labels).
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX type code 0x{raw[2]:02x} unsupported (only 0x08 unsigned byte)")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}i", raw[4:offset])
    count = int(np.prod(shape)) if ndim else 1
    if len(raw) - offset != count:
        raise ValueError(f"{path}: header says {shape} ({count} bytes) but {len(raw) - offset} data bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _find_idx(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        p = os.path.join(directory, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{stem}[.gz] not found in {directory}")


def _has_idx(directory: str, stem: str = "train-images-idx3-ubyte") -> bool:
    try:
        _find_idx(directory, stem)
        return True
    except FileNotFoundError:
        return False


def resolve_fashion_mnist_path(path: str | None = None) -> str:
    """Where Fashion-MNIST is read from. One rule, for users with and without root:

    ``path`` None or the Debian default (``/usr/share/datasets/fashion-mnist``) means "Fashion-MNIST
    wherever this machine has it": the Debian folder if it holds the IDX files, else
    ``$DIFFBIAS_FASHION_MNIST`` if set, else ``<repo>/.cache/fashion-mnist`` (where ``scripts/setup.sh``
    puts torchvision's download when it cannot install the Debian package). The files are the same
    everywhere, so the result does not depend on which one is found. Any other path is used as given
    (it may hold MNIST or another IDX data set). Raises FileNotFoundError saying what was tried.
    """
    if path is not None and os.path.normpath(path) != os.path.normpath(DEFAULT_FASHION_MNIST_PATH):
        return path
    candidates = [DEFAULT_FASHION_MNIST_PATH]
    if os.environ.get(FASHION_MNIST_ENV):
        candidates.append(os.environ[FASHION_MNIST_ENV])
    candidates.append(FASHION_MNIST_CACHE)
    for candidate in candidates:
        if _has_idx(candidate):
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST not found in {', '.join(candidates)} (looked for train-images-idx3-ubyte[.gz]): run "
        f"scripts/setup.sh, or put the four *-ubyte.gz files in a folder and set {FASHION_MNIST_ENV}=<folder>")


def load_fashion_mnist(path: str | None = None, *, splits: Sequence[str] = ("train", "t10k"), max_images: int | None = None):
    """Fashion-MNIST (or MNIST) from a directory of IDX files, e.g. Debian's ``dataset-fashion-mnist``.

    Reads ``{split}-images-idx3-ubyte[.gz]`` and ``{split}-labels-idx1-ubyte[.gz]`` for each split in
    ``splits`` and concatenates them in that order: the default pool is train (60k) then t10k (10k).
    Returns uint8 ``(N, 28, 28, 1)`` and int64 labels. The folder is found by
    :func:`resolve_fashion_mnist_path` (the Debian default falls back to ``$DIFFBIAS_FASHION_MNIST`` and
    ``.cache/fashion-mnist``).
    """
    path = resolve_fashion_mnist_path(path)
    xs, ys = [], []
    for split in splits:
        x = read_idx(_find_idx(path, f"{split}-images-idx3-ubyte"))
        y = read_idx(_find_idx(path, f"{split}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{path}/{split}: images {x.shape} and labels {y.shape} do not match")
        xs.append(x)
        ys.append(y)
    images = np.concatenate(xs)[..., None]
    labels = np.concatenate(ys).astype(np.int64)
    return _truncate(images, labels, max_images)


_CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def load_cifar10(path: str, *, max_images: int | None = None):
    """CIFAR-10 in the python layout (``cifar-10-batches-py``, as torchvision's ``CIFAR10`` downloads it).

    ``path`` may be the ``cifar-10-batches-py`` directory itself, a directory that contains it, or the
    ``cifar-10-python.tar.gz`` archive. Pool = ``data_batch_1`` .. ``data_batch_5`` then ``test_batch``
    (60,000 images, 32x32x3). The batches are pickles: only load files you trust.
    """
    parts = _cifar10_batches(path)
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _truncate(images, labels, max_images)


def _cifar10_batches(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of each CIFAR-10 batch, in :data:`_CIFAR_BATCHES` order."""
    def parse(blob: bytes, name: str):
        d = pickle.loads(blob, encoding="bytes")
        data = d.get(b"data", d.get("data"))
        labels = d.get(b"labels", d.get("labels"))
        if data is None or labels is None:
            raise ValueError(f"{name}: missing b'data' or b'labels'")
        return _flat_chw_to_nhwc(np.asarray(data)), np.asarray(labels, dtype=np.int64)

    parts = []
    if os.path.isfile(path) and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            for b in _CIFAR_BATCHES:
                if b not in members:
                    raise FileNotFoundError(f"{b} not found in archive {path}")
                parts.append(parse(tar.extractfile(members[b]).read(), b))
    else:
        root = path
        if not os.path.exists(os.path.join(root, "data_batch_1")):
            root = os.path.join(path, "cifar-10-batches-py")
        for b in _CIFAR_BATCHES:
            f = os.path.join(root, b)
            if not os.path.exists(f):
                raise FileNotFoundError(f"{b} not found in {path} (expected a cifar-10-batches-py directory)")
            with open(f, "rb") as fh:
                parts.append(parse(fh.read(), f))
    return parts


def load_imagenet32(path: str, *, include_val: bool = True, max_images: int | None = None):
    """Downsampled ImageNet (Imagenet32x32, also 16/64) in the official npz batches.

    ``path`` is a directory holding ``train_data_batch_1.npz`` .. ``train_data_batch_10.npz`` and
    ``val_data.npz`` (keys ``data``: ``(N, 3*S*S)`` flattened CHW uint8, ``labels``: 1-based class ids).
    Pool = train batches in numerical order, then val (if ``include_val``). Labels are returned 0-based.
    Batches are read one at a time and reading stops once ``max_images`` images are in.
    """
    def batch_no(name: str) -> int:
        m = re.search(r"(\d+)\.npz$", name)
        return int(m.group(1)) if m else 0

    train = sorted((f for f in os.listdir(path) if re.fullmatch(r"train_data_batch_\d+\.npz", f)), key=batch_no)
    files = train + (["val_data.npz"] if include_val and os.path.exists(os.path.join(path, "val_data.npz")) else [])
    if not files:
        raise FileNotFoundError(f"no train_data_batch_*.npz / val_data.npz in {path}")
    xs, ys, n = [], [], 0
    for f in files:
        if max_images is not None and n >= max_images:
            break
        with np.load(os.path.join(path, f), allow_pickle=False) as d:
            x = _flat_chw_to_nhwc(d["data"])
            y = np.asarray(d["labels"], dtype=np.int64).reshape(-1) - 1
        if len(x) != len(y):
            raise ValueError(f"{f}: {len(x)} images but {len(y)} labels")
        if y.size and y.min() < 0:
            raise ValueError(f"{f}: labels must be 1-based (found {y.min() + 1})")
        xs.append(x)
        ys.append(y)
        n += len(x)
    images = np.concatenate(xs) if xs else np.zeros((0, 32, 32, 3), np.uint8)
    labels = np.concatenate(ys) if ys else np.zeros((0,), np.int64)
    return _truncate(images, labels, max_images)


_NPZ_IMAGE_KEYS = ("images", "x", "arr_0")
_NPZ_LABEL_KEYS = ("labels", "y", "arr_1")


def load_npz(path: str, *, layout: str = "auto", max_images: int | None = None):
    """One ``.npz`` file with an image array under ``images``, ``x`` or ``arr_0`` (first found).

    The array is uint8 ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` with C in {1, 3, 4}.
    ``layout='auto'`` takes NCHW when axis 1 has size 1/3/4 and the last axis does not, else NHWC;
    pass ``layout='NHWC'`` or ``'NCHW'`` to force it. Optional labels under ``labels``/``y``/``arr_1``.
    """
    with np.load(path, allow_pickle=False) as d:
        key = next((k for k in _NPZ_IMAGE_KEYS if k in d.files), None)
        if key is None:
            raise KeyError(f"{path}: no image array under any of {_NPZ_IMAGE_KEYS} (keys: {d.files})")
        images = d[key]
        lkey = next((k for k in _NPZ_LABEL_KEYS if k in d.files and k != key), None)
        labels = np.asarray(d[lkey], dtype=np.int64).reshape(-1) if lkey else None
    images = _as_uint8(images, path)
    if images.ndim == 3:
        images = images[..., None]
    elif images.ndim == 4:
        layout = layout.upper()
        if layout == "AUTO":
            layout = "NCHW" if images.shape[1] in (1, 3, 4) and images.shape[-1] not in (1, 3, 4) else "NHWC"
        if layout == "NCHW":
            images = images.transpose(0, 2, 3, 1)
        elif layout != "NHWC":
            raise ValueError(f"layout must be 'auto', 'NHWC' or 'NCHW', got {layout!r}")
    else:
        raise ValueError(f"{path}: image array must be 3-D or 4-D, got shape {images.shape}")
    if images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{path}: cannot find a channel axis of size 1, 3 or 4 in shape {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return _truncate(np.ascontiguousarray(images), labels, max_images)


def _list_images(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return out


def load_image_folder(path: str, *, transform: Callable | None = None, max_images: int | None = None):
    """Images (png/jpg/jpeg/webp, searched recursively) under a directory, e.g. CelebA or LSUN exports.

    If the top level has sub-directories, each is a class: sorted names get labels 0, 1, ..., and
    images directly in the top level are not used. Otherwise all images are one unlabelled pool
    (labels ``None``). Order: classes in sorted order, files in sorted path order within each. Images are
    returned lazily (a :class:`LazyImages` sequence opened on access), so large folders do not fill memory.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path} does not exist")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if classes:
        files, labels = [], []
        for i, c in enumerate(classes):
            fs = _list_images(os.path.join(path, c))
            files += fs
            labels += [i] * len(fs)
        label_arr: np.ndarray | None = np.asarray(labels, dtype=np.int64)
    else:
        files = _list_images(path)
        label_arr = None
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {path}")
    return _truncate(LazyImages(files, transform), label_arr, max_images)


CELEBA_CROP = 140


def celeba_crop(img: Image.Image, size: int = CELEBA_CROP) -> Image.Image:
    """Centre ``size x size`` crop (default 140), the usual CelebA crop of the aligned 178x218 faces.

    For 178x218 images the box is (left 19, top 39, right 159, bottom 179). Images smaller than
    ``size`` on a side are cropped to their short side instead.
    """
    s = min(size, *img.size)
    w, h = img.size
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def load_celeba(path: str, *, crop: int = CELEBA_CROP, max_images: int | None = None):
    """CelebA as an image folder (e.g. ``img_align_celeba/``), each image centre-cropped to 140x140 first.

    The crop (centre 140x140 of the aligned 178x218 images) is applied before the ADM resize to
    ``resolution``. Pass ``crop=0`` to skip it. Unlabelled unless the folder has class sub-folders.
    """
    transform = None if not crop else (lambda im: celeba_crop(im, crop))
    return load_image_folder(path, transform=transform, max_images=max_images)


def load_lsun(path: str, *, max_images: int | None = None):
    """LSUN (a category such as bedroom or church_outdoor) exported to an image folder.

    Layout read: image files (LSUN's webp, or jpg/png) anywhere under ``path``, one unlabelled pool in sorted
    path order. LSUN is distributed as lmdb databases; this harness reads the exported folder, as ADM
    (guided-diffusion ``datasets/lsun_bedroom.py``) and LDM (``ldm/data/lsun.py``) do, so that no ``lmdb``
    dependency is needed and the export is made once: LSUN's own ``python data.py export <db> --out_dir <dir>
    --flat`` or ADM's script (docs/latents-and-multi-gpu.md). An ``.npz`` export works with the ``npz`` source.
    """
    return load_image_folder(path, max_images=max_images)


IMAGENET_SPLITS = ("train", "val", "train+val")


def load_imagenet(path: str, *, split: str = "train", max_images: int | None = None):
    """ImageNet-1k in the image-folder layout DiT and torchvision's ``ImageFolder`` read: ``path/train/<wnid>/*.JPEG``
    and ``path/val/<wnid>/*.JPEG`` (the validation images sorted into class folders, e.g. by the usual
    ``valprep.sh``). ``path`` may also be the split folder itself.

    Labels: the index of the image's class folder among the sorted wnids (n01440764 -> 0, ..., 1000 classes), as
    ``ImageFolder`` gives them; for ``val`` the class list must equal ``train``'s when both are present. Images are
    lazy (opened on access); grey and CMYK JPEGs become RGB in the usual channel conversion. ``split="train+val"``
    is the pool of a data set with ``split: official``: the training images, then the validation images (marked
    as the official test images by :func:`official_test_mask`).
    """
    if split == "train+val":
        parts = [load_imagenet(path, split=s) for s in ("train", "val")]
        images = LazyImages(parts[0][0].files + parts[1][0].files)
        return _truncate(images, np.concatenate([parts[0][1], parts[1][1]]), max_images)
    if split not in IMAGENET_SPLITS:
        raise ValueError(f"ImageNet split must be one of {IMAGENET_SPLITS}, got {split!r}")
    root = os.path.join(path, split) if os.path.isdir(os.path.join(path, split)) else path
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageNet folder {root} does not exist (expected {path}/{split}/<wnid>/*.JPEG)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders (expected {split}/<wnid>/*.JPEG)")
    train_root = os.path.join(path, "train")
    if split == "val" and root != train_root and os.path.isdir(train_root):
        train_classes = sorted(e.name for e in os.scandir(train_root) if e.is_dir() and not e.name.startswith("."))
        if train_classes != classes:
            raise ValueError(f"{root} and {train_root} have different class folders: labels would disagree")
    return load_image_folder(root, max_images=max_images)


FIXTURE_SIZE = 32
FIXTURE_CLASSES = 10
FIXTURE_DEFAULT_IMAGES = 256
# The fixture's "official" test images are the last quarter of its pool, so that `split: official` configs
# rehearse on it (CIFAR-10's test_batch is the last sixth of its pool; a quarter leaves a rehearsal more test images).
FIXTURE_TEST_FRACTION = 0.25


def load_fixture(path: str, *, max_images: int | None = None, num_classes: int = FIXTURE_CLASSES,
                 size: int = FIXTURE_SIZE):
    """A small synthetic, labelled data set for rehearsals and tests: nothing to download or set up.

    ``path`` is only a name (the data set's config key): it seeds the generator, so each name gives its own
    images and the same name always the same ones (bit for bit, on any machine). Every image is uint8
    ``size x size x 3``: a sinusoidal grating whose orientation, frequency and colours are set by the class
    (``num_classes`` classes, labels ``i % num_classes``), with a per-image phase and contrast, plus a soft
    blob at a random place. Structured rather than noise on purpose: a denoiser can learn it and memorise a
    few of the images, attention has local structure to find, and Jacobian eigenvectors and FID see
    images, so every measurement of the workflow runs on inputs of the kind it was written for. Images pass
    through the same resize and channel conversion as real data (native ``size``; grey by luma).
    """
    import zlib

    count = FIXTURE_DEFAULT_IMAGES if max_images is None else int(max_images)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    labels = np.arange(count, dtype=np.int64) % num_classes
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    angle = np.pi * labels / num_classes
    freq = 2.0 + 3.0 * (labels % 3)
    phase = rng.uniform(0, 2 * np.pi, count)
    contrast = rng.uniform(0.5, 1.0, count)
    wave = np.sin(freq[:, None, None] * np.pi * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
                  + phase[:, None, None])
    centre = rng.uniform(-0.6, 0.6, (count, 2))
    radius = rng.uniform(0.15, 0.4, count)
    blob = np.exp(-((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2)
                  / (2 * radius[:, None, None] ** 2))
    palette = np.random.default_rng(num_classes).uniform(0.1, 0.9, (num_classes, 2, 3))  # per-class colours
    base = palette[labels, 0][:, None, None, :] + 0.4 * (contrast[:, None, None] * wave)[..., None] * palette[labels, 1][:, None, None, :]
    image = base * (1 - 0.6 * blob[..., None]) + 0.6 * blob[..., None] * (1 - palette[labels, 0][:, None, None, :])
    image = image + rng.normal(0, 0.02, image.shape)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8), labels


SOURCES: dict[str, Callable[..., tuple[Any, np.ndarray | None]]] = {
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "imagenet32": load_imagenet32,
    "npz": load_npz,
    "image_folder": load_image_folder,
    "celeba": load_celeba,
    "lsun": load_lsun,
    "imagenet": load_imagenet,
    "fixture": load_fixture,
}


# ----------------------------------------------------------------------------------------------------
# official splits: which pool images are the data set's own test / validation images
# ----------------------------------------------------------------------------------------------------

# `datasets.<key>.split`: "shuffle" (paper 004 A.2: the whole pool shuffled, the test set its first test_size images)
# or "official" (the test set from the source's official test/validation images only, training from the others).
DATASET_SPLITS = ("shuffle", "official")
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
_NPZ_TEST_KEY = "is_test"


def official_split_problem(source: str, loader_kwargs: dict | None = None, test_path: str | None = None) -> str | None:
    """Why a source, read with these loader arguments, cannot give an official split (None: it can, or only the
    files can tell). Checked without touching the data, when the DAG is built. A ``test_path`` (the official test
    images in a second folder, e.g. LSUN's ``*_val`` export) gives any source one."""
    kw = dict(loader_kwargs or {})
    if test_path:
        return None
    if source in ("lsun", "image_folder"):
        return (f"source {source!r} has no official test split in the layout read here (one folder of images); "
                "name the folder of its test images as test_path, use split: shuffle, or an npz with an is_test array")
    if source == "fashion_mnist" and "t10k" not in kw.get("splits", ("train", "t10k")):
        return "loader_kwargs.splits leaves out t10k, the official test images"
    if source == "imagenet32" and not kw.get("include_val", True):
        return "loader_kwargs.include_val: false leaves out val_data.npz, the official validation images"
    if source == "imagenet" and kw.get("split", "train") != "train+val":
        return "the imagenet source reads one folder; set loader_kwargs.split: train+val (val/ = the official test images)"
    return None


def _celeba_partition(path: str) -> dict[str, int]:
    """CelebA's official partition (``list_eval_partition.txt``: ``<file> <0 train | 1 val | 2 test>``), found in the
    image folder or its parent (the usual ``celeba/img_align_celeba/`` + ``celeba/list_eval_partition.txt``)."""
    for folder in (path, os.path.dirname(os.path.normpath(path))):
        f = os.path.join(folder, CELEBA_PARTITION_FILE)
        if os.path.isfile(f):
            with open(f) as fh:
                return {name: int(part) for name, part in (line.split() for line in fh if line.strip())}
    raise FileNotFoundError(f"no {CELEBA_PARTITION_FILE} in {path} or its parent (CelebA's official partition)")


def official_test_mask(source: str, path: str | None, *, max_images: int | None = None, test_path: str | None = None,
                       **loader_kwargs) -> np.ndarray | None:
    """A boolean mask over the source's pool (in its loader's order, capped at ``max_images``): True for the data set's
    official test or validation images. None when the source's layout has no official split.

    - ``cifar10``: ``test_batch`` (the last 10,000 of 60,000);
    - ``fashion_mnist``: ``t10k`` (the last 10,000 of 70,000 with the default splits);
    - ``imagenet32``: ``val_data.npz`` (50,000 after the training batches);
    - ``imagenet`` with ``split: train+val``: the ``val/`` images;
    - ``celeba``: partitions 1 (validation) and 2 (test) of ``list_eval_partition.txt``: the official training
      partition is the only one trained on;
    - ``npz``: the file's ``is_test`` array, when it has one;
    - ``fixture``: the last quarter of the pool (so that rehearsals exercise the official split);
    - any source with a ``test_path``: the images there, appended after the others (:func:`source_pool`).

    Reads headers and file lists only (CelebA: the partition file), never the images.
    """
    kw = dict(loader_kwargs)
    if test_path:
        pool = source_pool({"source": source, "path": path, "test_path": test_path, "max_images": max_images,
                            "loader_kwargs": kw})
        return np.arange(len(pool.images)) >= pool.test_start
    if official_split_problem(source, kw) is not None:
        return None
    if source == "fashion_mnist":
        root = resolve_fashion_mnist_path(path)
        splits = kw.get("splits", ("train", "t10k"))
        parts = [np.full(_idx_count(_find_idx(root, f"{s}-images-idx3-ubyte")), s == "t10k") for s in splits]
        mask = np.concatenate(parts) if parts else np.zeros(0, bool)
    elif source == "cifar10":  # the batches are read (pickles hold no header): prepare_data reads them anyway
        counts = [len(images) for images, _ in _cifar10_batches(path)]
        mask = np.repeat(np.array([b == "test_batch" for b in _CIFAR_BATCHES]), counts)
    elif source == "imagenet32":
        files = sorted((f for f in os.listdir(path) if re.fullmatch(r"train_data_batch_\d+\.npz", f)),
                       key=lambda f: int(re.search(r"(\d+)\.npz$", f).group(1)))
        val = os.path.exists(os.path.join(path, "val_data.npz")) and kw.get("include_val", True)
        counts = [_npz_shapes(os.path.join(path, f))["data"][0] for f in files]
        mask = np.concatenate([np.zeros(sum(counts), bool)]
                              + ([np.ones(_npz_shapes(os.path.join(path, "val_data.npz"))["data"][0], bool)] if val else []))
    elif source == "imagenet":
        n_train = len(load_imagenet(path, split="train")[0])
        n_val = len(load_imagenet(path, split="val")[0])
        mask = np.concatenate([np.zeros(n_train, bool), np.ones(n_val, bool)])
    elif source == "celeba":
        try:
            partition = _celeba_partition(path)
        except FileNotFoundError:
            return None
        files = load_image_folder(path)[0].files
        unknown = [f for f in files if os.path.basename(f) not in partition]
        if unknown:
            raise ValueError(f"{len(unknown)} images of {path} are not in {CELEBA_PARTITION_FILE} (e.g. {unknown[0]})")
        mask = np.array([partition[os.path.basename(f)] != 0 for f in files], dtype=bool)
    elif source == "npz":
        with np.load(path, allow_pickle=False) as d:
            if _NPZ_TEST_KEY not in d.files:
                return None
            mask = np.asarray(d[_NPZ_TEST_KEY], dtype=bool).reshape(-1)
    elif source == "fixture":
        count = FIXTURE_DEFAULT_IMAGES if max_images is None else int(max_images)
        mask = np.arange(count) >= count - int(round(count * FIXTURE_TEST_FRACTION))
    else:
        return None
    if source == "imagenet32" and not mask.any():  # no val_data.npz in the folder
        return None
    return mask if max_images is None else mask[: int(max_images)]


def prepared_test_mask(path: str) -> np.ndarray | None:
    """The official test mask stored in a prepared pool (:func:`prepare_dataset`), or None: the source has no
    official split, or the pool was prepared before masks were stored."""
    with np.load(path, allow_pickle=False) as d:
        return np.asarray(d[_NPZ_TEST_KEY], dtype=bool) if _NPZ_TEST_KEY in d.files else None


def run_test_mask(spec: dict, data_path: str) -> np.ndarray | None:
    """The ``is_test`` argument of :func:`run_split` for a run: the prepared pool's official test mask when the run's
    data set says ``split: official``, else None (paper 004's protocol over the whole pool). The one place training,
    :class:`diffbias.runs.TrainedRun` and the shared inputs decide it."""
    if spec["dataset"].get("split", "shuffle") != "official":
        return None
    data_path = str(data_path)
    if os.path.isdir(data_path) or os.path.basename(data_path) == "meta.json":
        # a latent cache (its folder or its meta.json) keeps the mask of the pool it encodes beside its shards
        mask_file = os.path.join(data_path if os.path.isdir(data_path) else os.path.dirname(data_path),
                                 f"{_NPZ_TEST_KEY}.npy")
        if not os.path.isfile(mask_file):
            raise ValueError(f"{data_path}: the data set uses split: official but the latent cache has no {_NPZ_TEST_KEY}.npy")
        return np.load(mask_file).astype(bool)
    mask = prepared_test_mask(data_path)
    if mask is None:
        raise ValueError(f"{data_path}: the data set uses split: official but the prepared pool holds no official test "
                         f"mask (prepared before masks were stored?): delete it and prepare it again")
    return mask


# ----------------------------------------------------------------------------------------------------
# layout check (cheap: headers and directory entries only, run when the workflow's DAG is built)
# ----------------------------------------------------------------------------------------------------


def _idx_count(path: str) -> int:
    """Number of items in an IDX file, from its 8-byte header (gzip: only the first block is inflated)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(8)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if len(head) < 8 or head[0] != 0 or head[1] != 0 or head[2] != 0x08 or head[3] < 1:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {head[:4]!r})")
    return struct.unpack(">i", head[4:8])[0]


def _npz_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array of an .npz, from the .npy headers of its members (no data read)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            headers = {}
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                headers[name[:-4]] = (tuple(shape), np.dtype(dtype))
            return headers
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npz ({exc})") from None


def _npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Array shapes of an .npz from the .npy headers of its members (no data read)."""
    return {name: shape for name, (shape, _) in _npz_headers(path).items()}


def _pixel_dtype_ok(dtype: np.dtype) -> bool:
    """The pixel dtypes :func:`_as_uint8` accepts: any integer (its range is checked when loading) or bool."""
    return dtype == np.bool_ or np.issubdtype(dtype, np.integer)


def _first_image(root: str) -> str | None:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                return os.path.join(dirpath, f)
    return None


def check_source(source: str, path: str | None, **loader_kwargs) -> int | None:
    """Check that ``path`` has the layout the ``source`` loader expects, without reading the images.

    Returns the number of images the source holds when its headers say so cheaply (IDX, npz, CIFAR-10),
    else None (image folders: only the presence of one image is checked, counting 10^5-10^6 files on a
    shared file system would make the DAG build slow). Raises FileNotFoundError or ValueError with a
    message naming the path and what is missing. ``max_images`` is ignored (the count is the source's).
    """
    loader_kwargs.pop("max_images", None)
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; known: {sorted(SOURCES)}")
    if source == "fashion_mnist":
        root = resolve_fashion_mnist_path(path)
        total = 0
        for split in loader_kwargs.get("splits", ("train", "t10k")):
            n_img = _idx_count(_find_idx(root, f"{split}-images-idx3-ubyte"))
            n_lab = _idx_count(_find_idx(root, f"{split}-labels-idx1-ubyte"))
            if n_img != n_lab:
                raise ValueError(f"{root}/{split}: {n_img} images but {n_lab} labels")
            total += n_img
        return total
    if source == "fixture":  # generated in memory: nothing on disk to check; its size is max_images
        return None
    if path is None:
        raise ValueError(f"source {source!r} needs a path (only fashion_mnist has a default)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if source == "cifar10":
        if os.path.isfile(path):
            if not tarfile.is_tarfile(path):
                raise ValueError(f"{path} is neither a cifar-10-batches-py folder nor cifar-10-python.tar.gz")
            return 60_000
        root = path if os.path.exists(os.path.join(path, "data_batch_1")) else os.path.join(path, "cifar-10-batches-py")
        missing = [b for b in _CIFAR_BATCHES if not os.path.isfile(os.path.join(root, b))]
        if missing:
            raise FileNotFoundError(f"{path}: missing {missing} (expected the cifar-10-batches-py layout)")
        return 60_000
    if source == "imagenet32":
        if not os.path.isdir(path):
            raise ValueError(f"{path} is not a folder of train_data_batch_*.npz / val_data.npz")
        files = sorted(f for f in os.listdir(path) if re.fullmatch(r"train_data_batch_\d+\.npz", f))
        if loader_kwargs.get("include_val", True) and os.path.exists(os.path.join(path, "val_data.npz")):
            files.append("val_data.npz")
        if not files:
            raise FileNotFoundError(f"no train_data_batch_*.npz / val_data.npz in {path}")
        total = 0
        for f in files:
            shapes = _npz_shapes(os.path.join(path, f))
            if "data" not in shapes or "labels" not in shapes:
                raise ValueError(f"{os.path.join(path, f)}: needs arrays 'data' and 'labels', has {sorted(shapes)}")
            total += shapes["data"][0]
        return total
    if source == "npz":
        if not os.path.isfile(path):
            raise ValueError(f"{path} is not an .npz file")
        headers = _npz_headers(path)
        key = next((k for k in _NPZ_IMAGE_KEYS if k in headers), None)
        if key is None:
            raise ValueError(f"{path}: no image array under any of {_NPZ_IMAGE_KEYS} (arrays: {sorted(headers)})")
        shape, dtype = headers[key]
        if len(shape) not in (3, 4):
            raise ValueError(f"{path}: image array must be 3-D or 4-D, got shape {shape}")
        if not _pixel_dtype_ok(dtype):  # the loader would reject it only when prepare_data runs
            raise ValueError(f"{path}: image array {key!r} has dtype {dtype}; pixels must be integers in 0..255 "
                             f"(uint8, or another integer type) or bool")
        return shape[0]
    # image folders: celeba, lsun, image_folder
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a folder of images (source {source!r})")
    if _first_image(path) is None:
        hint = " (LSUN's lmdb must be exported to images first)" if source == "lsun" else ""
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {path}{hint}")
    return None


# ----------------------------------------------------------------------------------------------------
# pool building
# ----------------------------------------------------------------------------------------------------


def _pil_for_channels(img: Image.Image, channels: int) -> Image.Image:
    if channels == 1:
        return img if img.mode == "L" else img.convert("RGB").convert("L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _convert_array(images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    images = _as_uint8(np.asarray(images), "images")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected (N, H, W, C) images with C in 1/3/4, got shape {images.shape}")
    if images.shape[-1] == 4:
        images = images[..., :3]
    if channels == 1 and images.shape[-1] == 3:
        images = rgb_to_luma(images)[..., None]
    n, h, w, c = images.shape
    if (h, w) == (resolution, resolution):
        out = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    else:
        out = np.empty((n, c, resolution, resolution), dtype=np.uint8)
        for i in range(n):
            im = images[i, :, :, 0] if c == 1 else images[i]
            r = np.asarray(center_crop_resize(Image.fromarray(im), resolution))
            out[i] = r[None] if c == 1 else r.transpose(2, 0, 1)
    if channels == 3 and c == 1:
        out = np.repeat(out, 3, axis=1)
    return out


def _convert_pils(images: Sequence[Image.Image], resolution: int, channels: int) -> np.ndarray:
    out = np.empty((len(images), channels, resolution, resolution), dtype=np.uint8)
    for i in range(len(images)):
        r = np.asarray(center_crop_resize(_pil_for_channels(images[i], channels), resolution))
        out[i] = r[None] if channels == 1 else r.transpose(2, 0, 1)
    return out


def load_pool(
    source: str,
    path: str | None,
    *,
    resolution: int,
    channels: int,
    max_images: int | None = None,
    **loader_kwargs,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a whole pool as uint8 ``(N, channels, resolution, resolution)`` plus int64 labels (or None).

    ``max_images`` keeps the first images in the source's file order (no shuffling); loaders that can
    stop reading early do so. Extra keyword arguments go to the loader.
    """
    if source not in SOURCES:
        raise KeyError(f"unknown data source {source!r}; known: {sorted(SOURCES)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if int(resolution) != resolution or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution}")
    resolution = int(resolution)
    if path is None and source != "fashion_mnist":
        raise ValueError(f"source {source!r} needs a path (only fashion_mnist has a default)")
    images, labels = SOURCES[source](path, max_images=max_images, **loader_kwargs)
    images, labels = _truncate(images, labels, max_images)
    if isinstance(images, np.ndarray):
        out = _convert_array(images, resolution, channels)
    else:
        out = _convert_pils(images, resolution, channels)
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(out):
            raise ValueError(f"{len(out)} images but {len(labels)} labels")
    return out, labels


@dataclass
class SourcePool:
    """The images of a data-set spec as its loader returns them (not yet resized), with their labels, the path read
    and, when the spec names a ``test_path``, where its images start (they follow the others)."""

    images: Any
    labels: np.ndarray | None
    path: str | None
    test_start: int | None = None  # index of the first image of test_path


def _concat_images(a, b):
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.concatenate([a, b])
    if isinstance(a, LazyImages) and isinstance(b, LazyImages):
        return LazyImages(a.files + b.files, a.transform)
    raise TypeError(f"cannot join {type(a).__name__} and {type(b).__name__} images")


def _class_folders(source: str, path: str, loader_kwargs: dict) -> list[str] | None:
    """The class folders whose sorted order gives a labelled folder source its labels (None for other sources)."""
    if source == "imagenet":
        split = loader_kwargs.get("split", "train")
        path = os.path.join(path, split) if os.path.isdir(os.path.join(path, split)) else path
    elif source not in ("image_folder", "celeba"):
        return None
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def source_pool(spec: dict) -> SourcePool:
    """The images of a data-set spec, capped at ``max_images`` and not yet resized: an in-memory uint8 array for
    array sources, a lazy :class:`LazyImages` for image folders (nothing is read until indexed, so a 1.28M-image
    ImageNet costs only its file list).

    ``test_path``: a second location of the same source holding the data set's official test images (LSUN's
    ``*_val`` export). They are appended after the ``max_images`` first images of ``path``; :func:`official_test_mask`
    marks them, so that with ``split: official`` the run's test set is drawn from them and training never sees them
    (:func:`split_indices`' ``is_test``). Labelled folder sources must have the same class folders in both places, or
    the labels would disagree."""
    source, path = spec["source"], spec.get("path")
    if source not in SOURCES:
        raise KeyError(f"unknown data source {source!r}; known: {sorted(SOURCES)}")
    if source == "fashion_mnist":
        path = resolve_fashion_mnist_path(path)
    elif path is None:
        raise ValueError(f"source {source!r} needs a path (only fashion_mnist has a default)")
    max_images = spec.get("max_images")
    max_images = None if max_images is None else int(max_images)
    loader_kwargs = dict(spec.get("loader_kwargs") or {})
    images, labels = SOURCES[source](path, max_images=max_images, **loader_kwargs)
    images, labels = _truncate(images, labels, max_images)
    test_start = None
    if spec.get("test_path"):
        test_images, test_labels = SOURCES[source](spec["test_path"], **loader_kwargs)
        if (labels is None) != (test_labels is None):
            raise ValueError(f"{path} and test_path {spec['test_path']} disagree on labels (one has none)")
        if labels is not None and source != "fixture":
            ours, theirs = (_class_folders(source, p, loader_kwargs) for p in (path, spec["test_path"]))
            if ours != theirs:
                raise ValueError(f"{path} and test_path {spec['test_path']} have different class folders: "
                                 "labels would disagree")
        test_start = len(images)
        images = _concat_images(images, test_images)
        if labels is not None:
            labels = np.concatenate([np.asarray(labels, dtype=np.int64), np.asarray(test_labels, dtype=np.int64)])
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return SourcePool(images, labels, path, test_start)


def load_source(spec: dict) -> tuple[Any, np.ndarray | None, str | None]:
    """``(images, labels or None, path read)`` of :func:`source_pool`; :func:`preprocess_image` turns one item into
    what :func:`load_pool` would hold."""
    pool = source_pool(spec)
    return pool.images, pool.labels, pool.path


class PixelImages:
    """The images of a data-set spec at its resolution and channels, read and cropped on access as
    :func:`load_pool` does: ``images[idx]`` is uint8 ``(len(idx), C, R, R)``. For pools that never live in memory as
    pixels (a latent data set's real images: the FID reference set of ImageNet 256 is 50k x 196 KB)."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.pool = source_pool(spec)
        self.resolution, self.channels = int(spec["resolution"]), int(spec["channels"])

    def __len__(self) -> int:
        return len(self.pool.images)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.channels, self.resolution, self.resolution)

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.channels, self.resolution, self.resolution), dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = preprocess_image(self.pool.images[int(i)], self.resolution, self.channels)
        return out


def preprocess_image(image, resolution: int, channels: int) -> np.ndarray:
    """One item of :func:`load_source` -> uint8 ``(channels, resolution, resolution)``, through the very code
    :func:`load_pool` runs on the whole pool (channel conversion, ADM centre crop), so both agree bit for bit."""
    if isinstance(image, Image.Image):
        return _convert_pils([image], int(resolution), int(channels))[0]
    return _convert_array(np.asarray(image)[None], int(resolution), int(channels))[0]


_SPEC_KEYS = ("source", "path", "test_path", "resolution", "channels", "max_images", "loader_kwargs")


def prepare_dataset(spec: dict, out_path: str) -> None:
    """Build the pool described by ``spec`` and cache it at ``out_path`` (an ``.npz``), atomically.

    ``spec`` keys: ``source`` (a key of :data:`SOURCES`), ``path`` (optional for ``fashion_mnist``,
    default :data:`DEFAULT_FASHION_MNIST_PATH`), ``resolution``, ``channels`` (1 or 3), ``max_images``
    (optional: keep the first ``max_images`` images in file order, before any shuffling; the split is
    drawn later from this capped pool), ``test_path`` (optional: the official test images in a second folder,
    appended after the others, :func:`source_pool`) and ``loader_kwargs`` (optional dict for the loader). Other keys
    are ignored. The file holds ``images`` (uint8 NCHW), ``labels`` (int64, all -1 when the source has none),
    ``meta`` (a JSON string: source, path, resolution, channels, count, ..., and ``config_entry``, ``spec`` itself:
    the DAG build skips checking the source of a pool prepared from exactly the config entry it would prepare it from
    again, :func:`diffbias.config.check_datasets`) and, when the source ships an official split (or has a
    ``test_path``), ``is_test`` (bool, :func:`official_test_mask`; pools prepared without it still load). It is written to
    a temporary file in the same directory and moved into place (:func:`diffbias.io.atomic_path`), so
    readers never see a partial file; it gets a normal file's mode, like every other output.
    """
    missing = [k for k in ("source", "resolution", "channels") if k not in spec]
    if missing:
        raise ValueError(f"dataset spec lacks {missing}")
    source = spec["source"]
    path = spec.get("path")
    if source == "fashion_mnist":
        path = resolve_fashion_mnist_path(path)  # the folder actually read goes into the meta
    max_images = spec.get("max_images")
    loader_kwargs = dict(spec.get("loader_kwargs") or {})
    if spec.get("test_path"):  # the official test images follow the others (source_pool)
        pool = source_pool({**spec, "path": path})
        convert = _convert_array if isinstance(pool.images, np.ndarray) else _convert_pils
        images = convert(pool.images, int(spec["resolution"]), int(spec["channels"]))
        labels = pool.labels
    else:
        images, labels = load_pool(
            source, path, resolution=int(spec["resolution"]), channels=int(spec["channels"]),
            max_images=None if max_images is None else int(max_images), **loader_kwargs,
        )
    has_labels = labels is not None
    meta = {
        "format_version": PREPARED_FORMAT_VERSION,
        "source": source,
        "path": path,
        "resolution": int(spec["resolution"]),
        "channels": int(spec["channels"]),
        "count": int(len(images)),
        "max_images": None if max_images is None else int(max_images),
        "loader_kwargs": loader_kwargs,
        "has_labels": has_labels,
        "num_classes": int(labels.max()) + 1 if has_labels and len(labels) else None,
        "resize": "ADM centre crop: BOX halving, BICUBIC, centre crop (PIL)",
        "config_entry": json.loads(json.dumps(spec, default=str)),  # as the rule passed it (JSON)
    }
    if not has_labels:
        labels = np.full(len(images), -1, dtype=np.int64)
    extra = {}
    is_test = official_test_mask(source, path, max_images=None if max_images is None else int(max_images),
                                 test_path=spec.get("test_path"), **loader_kwargs)
    if is_test is not None:  # stored whatever the config's split, so that switching to split: official needs no re-read
        if len(is_test) != len(images):
            raise ValueError(f"{source} at {path}: official test mask of {len(is_test)} images, pool of {len(images)}")
        extra[_NPZ_TEST_KEY] = is_test
        meta["official_test_images"] = int(is_test.sum())
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as f:  # a file object: given a name, np.savez would append ".npz" to it
            np.savez(f, images=images, labels=labels, meta=np.array(json.dumps(meta)), **extra)


def load_prepared(path: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read a file written by :func:`prepare_dataset`: ``(images uint8 NCHW, labels or None, meta)``."""
    with np.load(path, allow_pickle=False) as d:
        images = d["images"]
        labels = d["labels"]
        meta = json.loads(str(d["meta"]))
    if not meta.get("has_labels", bool(len(labels) and (labels >= 0).all())):
        labels = None
    return images, labels, meta


# ----------------------------------------------------------------------------------------------------
# split and value range
# ----------------------------------------------------------------------------------------------------


SPLIT_PARTS = ("A", "B")


def split_indices(pool_size: int, n_train: int, n_test: int, shuffle_seed: int, *, part: str = "A",
                  is_test: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices into a pool, as in paper 004, appendix A.2.

    The whole pool is shuffled once with ``np.random.default_rng(shuffle_seed).permutation(pool_size)``; TEST is the
    *first* ``n_test`` entries of that order and TRAIN the *last* ``n_train``, so they are disjoint, and for a fixed
    seed the test set is the same for every ``n_train`` (and every model).

    - ``part="B"``: the ``n_train`` images just before part A's in the same order: disjoint from A and from the test
      set, with the same test set (two models trained on disjoint data, Kadkhodaie et al. 2024).
    - ``is_test``: a boolean mask over the pool marking the data set's official test (or validation) images; the test
      set is then the first ``n_test`` of those in the shuffled order, and the training parts come from the others
      only, so no official test image is ever trained on.

    Returns two int64 arrays (in shuffled order).
    """
    for name, v in (("pool_size", pool_size), ("n_train", n_train), ("n_test", n_test)):
        if int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v}")
    if part not in SPLIT_PARTS:
        raise ValueError(f"split part must be one of {SPLIT_PARTS}, got {part!r}")
    pool_size, n_train, n_test = int(pool_size), int(n_train), int(n_test)
    perm = np.random.default_rng(shuffle_seed).permutation(pool_size).astype(np.int64)
    if is_test is None:
        test, rest = perm[:n_test], perm[n_test:]
        test_pool = pool_size
    else:
        is_test = np.asarray(is_test, dtype=bool)
        if is_test.shape != (pool_size,):
            raise ValueError(f"is_test has shape {is_test.shape}, the pool has {pool_size} images")
        official = is_test[perm]
        test, rest, test_pool = perm[official][:n_test], perm[~official], int(official.sum())
        if n_test > test_pool:
            raise ValueError(f"n_test = {n_test} exceeds the {test_pool} official test images")
    k = SPLIT_PARTS.index(part) + 1  # A: the last n_train, B: the n_train before them
    if k * n_train > len(rest):
        need = f"{k} x n_train + n_test = {k * n_train + n_test}" if is_test is None else f"{k} x n_train = {k * n_train}"
        raise ValueError(f"split part {part}: {need} exceeds the pool of {len(rest) + (n_test if is_test is None else 0)} "
                         f"{'images' if is_test is None else 'official training images'}")
    train = rest[len(rest) - k * n_train: len(rest) - (k - 1) * n_train]
    return train, test


def run_split(pool_size: int, spec: dict, is_test: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (train, test) indices of the run described by ``spec`` (its ``run`` and ``dataset`` entries and its
    ``split`` part, :func:`diffbias.config.run_spec`): the one place every job (training, measurements, shared
    inputs) gets a run's split from. ``is_test`` marks the pool's official test images when the data set uses them."""
    return split_indices(pool_size, spec["run"]["N"], spec["dataset"]["test_size"], spec["run"]["seed"],
                         part=spec.get("split", "A"), is_test=is_test)


def to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape, numpy or torch) -> float32 tensor in [-1, 1]: ``x / 127.5 - 1``."""
    if isinstance(images_uint8, np.ndarray):
        if not (np.issubdtype(images_uint8.dtype, np.integer)):
            raise TypeError(f"to_model_range expects integer (uint8) pixels, got {images_uint8.dtype}")
        x = torch.from_numpy(images_uint8.astype(np.float32))
    elif isinstance(images_uint8, torch.Tensor):
        if images_uint8.is_floating_point() or images_uint8.is_complex():
            raise TypeError(f"to_model_range expects integer (uint8) pixels, got {images_uint8.dtype}")
        x = images_uint8.to(torch.float32)
    else:
        raise TypeError(f"expected a numpy array or torch tensor, got {type(images_uint8).__name__}")
    return x / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 tensor (same device): ``round((x + 1) * 127.5)`` clamped to 0..255, NaN -> 0."""
    x = torch.as_tensor(x).detach().to(torch.float32)
    y = torch.nan_to_num((x + 1.0) * 127.5, nan=0.0).round().clamp(0, 255)
    return y.to(torch.uint8)
