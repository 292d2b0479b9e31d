"""Encode a data set once into autoencoder latents on disk, and read them back as one memory-mapped pool.

Seeds 002/003 and DiT train on Stable Diffusion VAE latents; fast-DiT showed that encoding the data set once
(instead of at every step) is faster and lighter. :func:`encode_dataset` streams the images of a data-set spec
(never the whole pool in memory: ImageNet is 1.28M images), centre-crops them as ADM does
(:func:`diffbias.data.center_crop_resize`), encodes them in batches on the job's device and writes:

``<out>/``
  ``plan.json``                       what is being encoded (spec, autoencoder fingerprint, shard size, batch size);
                                      shards of another plan are deleted, so a changed spec never mixes in
  ``shards/latents-00000.npy`` ...    float16 ``(n, 4, h, w)``: images ``[k*S, min((k+1)*S, count))`` of shard k
  ``shards/hflip-00000.npy`` ...      the latents of the mirrored images (only with ``latents.hflip``)
  ``labels.npy``                      int64 ``(count,)``, -1 when the source has no labels
  ``is_test.npy``                     bool ``(count,)``: the pool's official test images (data.official_test_mask),
                                      when the source has an official split or the spec a ``test_path``
  ``meta.json``                       written last: the cache is complete exactly when it exists

Every file is written to a temporary name and renamed (:func:`diffbias.io.atomic_path`), so a kill leaves only
complete shards; a re-run skips them (resume at shard granularity) and produces the same files. Readers
(:class:`LatentPool`) refuse a folder without ``meta.json``.

float16: scaled SD latents have unit-order magnitude (|z| < 10 in practice; float16 reaches 65504), and
float16's relative step (2^-11, 4.9e-4) is 20x below the smallest noise the diffusion adds (sqrt(1 -
alpha_bar_0) = 0.01 at t = 0), so storage rounding is invisible to training, while it halves the cache:
ImageNet 256 is 1.28M x 4096 values = 10.5 GB (21 GB with the mirrored twin) instead of 21 (42) GB, which
keeps it in a GPU node's page cache. Non-finite values after the cast stop the encode with a message.

Mirrored twin: the VAE is not equivariant to flips (encode(flip(x)) != flip(encode(x))), so flipping a latent
is not the latent of the flipped image. With ``latents.hflip: true`` the cache also holds the encodings of the
mirrored images; ``training.hflip`` then makes the trainer take the twin of an image with probability 1/2 (the
same random draw as the pixel-space flip). ``training.hflip`` on a cache without twins is an error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as data_lib
from .io import atomic_path, write_json

log = logging.getLogger("diffbias.latents")

FORMAT_VERSION = 1
DTYPE = np.float16
DEFAULT_SHARD_SIZE = 8192  # 64 MiB of float16 32x32x4 latents per shard: few files, cheap to redo after a kill
META = "meta.json"
PLAN = "plan.json"
LATENT_DEFAULTS = {"posterior": "mean", "seed": 0, "hflip": False, "shard_size": DEFAULT_SHARD_SIZE}

__all__ = ["encode_dataset", "LatentPool", "is_latent_cache", "latent_settings", "shard_ranges", "model_input",
           "cache_spec"]

# The keys of a data-set entry that decide its latents: the encode job's parameters and the cache's plan hold these
# only, so editing e.g. test_size or pool_size never re-encodes 1.28M images.
CACHE_KEYS = ("source", "path", "test_path", "resolution", "channels", "max_images", "loader_kwargs", "latents")


def cache_spec(dataset: dict) -> dict:
    """What a latent data set's cache is encoded from: its entry's :data:`CACHE_KEYS`."""
    return {k: dataset[k] for k in CACHE_KEYS if k in dataset}


def model_input(dataset: dict) -> tuple[int, int]:
    """(channels, side) of what a model trained on this data-set spec sees: the autoencoder's latent grid for a data
    set with ``latents`` (SD's VAE: 256x256 RGB -> 4 x 32 x 32), its pixels otherwise. Used wherever a model is built
    or counted before training (DAG-time checks, counts, cost)."""
    if not dataset.get("latents"):
        return int(dataset["channels"]), int(dataset["resolution"])
    from .autoencoder import autoencoder_geometry

    channels, down = autoencoder_geometry(dataset["latents"]["autoencoder"])
    if int(dataset["resolution"]) % down:
        raise ValueError(f"resolution {dataset['resolution']} is not a multiple of the autoencoder's downsampling {down}")
    return channels, int(dataset["resolution"]) // down


def latent_settings(spec: dict) -> dict:
    """The data-set spec's ``latents`` section with its defaults; raises naming the key when it is unusable."""
    lat = spec.get("latents")
    if not isinstance(lat, dict) or not lat.get("autoencoder"):
        raise ValueError("dataset spec needs latents.autoencoder (a local diffusers AutoencoderKL folder)")
    out = {**LATENT_DEFAULTS, **lat}
    if out["posterior"] not in ("mean", "sample"):
        raise ValueError(f"latents.posterior must be 'mean' or 'sample', got {out['posterior']!r}")
    if int(out["shard_size"]) < 1:
        raise ValueError(f"latents.shard_size must be >= 1, got {out['shard_size']}")
    if int(spec.get("channels", 3)) != 3:
        raise ValueError(f"channels must be 3 for an RGB autoencoder, got {spec.get('channels')}")
    return out


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]


def _shard_file(out: Path, kind: str, k: int) -> Path:
    return out / "shards" / f"{kind}-{k:05d}.npy"


def _shard_complete(path: Path, rows: int, shape: tuple[int, ...]) -> bool:
    """A shard counts only with the expected header (rows, shape, dtype); files appear only complete (atomic)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, *shape) and arr.dtype == DTYPE


class _Images(torch.utils.data.Dataset):
    """The source's images by global index, preprocessed as load_pool does, as uint8 CHW tensors."""

    def __init__(self, images, resolution: int):
        self.images, self.resolution = images, resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(data_lib.preprocess_image(self.images[i], self.resolution, 3))


def _progress(done: int, total: int, started: float, skipped: int) -> None:
    rate = (done - skipped) / max(time.monotonic() - started, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("nan")
    print(f"[encode-latents] {done}/{total} images ({100 * done / max(total, 1):.1f}%), {rate:.1f} images/s, "
          f"ETA {eta / 60:.1f} min", flush=True)


def encode_dataset(spec: dict, out_dir: str | os.PathLike, *, device: str = "auto", batch_size: int = 64,
                   workers: int = 0, progress: bool = True, autoencoder=None) -> dict:
    """Encode the data set of ``spec`` (a config ``datasets`` entry with a ``latents`` section) into ``out_dir``.

    ``latents``: ``autoencoder`` (local folder of a diffusers AutoencoderKL), ``posterior`` (``mean``, default,
    or ``sample`` with ``seed``), ``hflip`` (also encode the mirrored images), ``shard_size`` (images per
    shard). ``workers``: DataLoader processes that read and crop images (JPEG decoding is the CPU-bound part).
    ``autoencoder``: an :class:`diffbias.autoencoder.Autoencoder` already loaded (tests), else loaded from the
    spec. Returns the meta written to ``meta.json``. Resumes from complete shards of the same plan."""
    from .autoencoder import Autoencoder

    lat = latent_settings(spec)
    out = Path(out_dir)
    resolution = int(spec["resolution"])
    ae = autoencoder if autoencoder is not None else Autoencoder.load(lat["autoencoder"], device)
    latent_shape = ae.latent_shape(resolution)
    source = data_lib.source_pool(spec)
    images, labels, path_read = source.images, source.labels, source.path
    count = len(images)
    if count == 0:
        raise ValueError(f"data set at {path_read} holds no images")
    shard_size = int(lat["shard_size"])
    fingerprint = ae.fingerprint()
    plan = {
        "format_version": FORMAT_VERSION, "spec": spec, "path_read": path_read, "count": count,
        "resolution": resolution, "latent_shape": list(latent_shape), "dtype": np.dtype(DTYPE).name,
        "shard_size": shard_size, "batch_size": int(batch_size), "posterior": lat["posterior"],
        "seed": int(lat["seed"]) if lat["posterior"] == "sample" else None, "hflip": bool(lat["hflip"]),
        "autoencoder": {"path": str(lat["autoencoder"]), **fingerprint, "scale_factor": ae.scale_factor,
                        "shift_factor": ae.shift_factor, "downsample": ae.downsample},
    }
    _start_or_resume(out, plan)
    kinds = ["latents", "hflip"] if plan["hflip"] else ["latents"]
    ranges = shard_ranges(count, shard_size)
    todo = [k for k, (lo, hi) in enumerate(ranges)
            if not all(_shard_complete(_shard_file(out, kind, k), hi - lo, latent_shape) for kind in kinds)]
    skipped = count - sum(ranges[k][1] - ranges[k][0] for k in todo)
    if skipped:
        log.info("%d of %d shards already complete: skipped", len(ranges) - len(todo), len(ranges))
    # Batches start at each shard's first image, so a re-run encodes a shard in exactly the same batches. One
    # DataLoader for the whole encode: its workers (JPEG decoding and cropping) start once.
    batches = [list(range(b, min(b + batch_size, ranges[k][1]))) for k in todo
               for b in range(ranges[k][0], ranges[k][1], batch_size)]
    loader = torch.utils.data.DataLoader(_Images(images, resolution), batch_sampler=batches, num_workers=workers)
    started, done, last_print = time.monotonic(), skipped, 0.0
    parts: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}
    todo_iter = iter(todo)
    k = next(todo_iter, None)
    pos = ranges[k][0] if k is not None else 0
    for batch in loader:
        x = data_lib.to_model_range(batch)
        idx = list(range(pos, pos + len(x)))
        for kind in kinds:
            xin = x if kind == "latents" else x.flip(-1)
            # the twin is another image: its sample noise uses index + count, never an original's
            ids = idx if kind == "latents" else [i + count for i in idx]
            z = ae.encode(xin, posterior=lat["posterior"], seed=plan["seed"], indices=ids, batch_size=len(x))
            z16 = z.to("cpu", torch.float32).numpy().astype(DTYPE)
            if not np.isfinite(z16).all():
                raise FloatingPointError(f"non-finite latents for images {pos}..{pos + len(x) - 1} ({kind}) of "
                                         f"{path_read}: check the autoencoder")
            parts[kind].append(z16)
        pos += len(x)
        done += len(x)
        if pos == ranges[k][1]:  # shard complete: write it (atomically) and move on
            for kind in kinds:
                with atomic_path(_shard_file(out, kind, k)) as tmp:
                    with open(tmp, "wb") as f:  # a file object: np.save given a name would append ".npy"
                        np.save(f, np.concatenate(parts[kind]))
            parts = {kind: [] for kind in kinds}
            k = next(todo_iter, None)
            pos = ranges[k][0] if k is not None else pos
        if progress and time.monotonic() - last_print > 30:
            _progress(done, count, started, skipped)
            last_print = time.monotonic()
    if progress:
        _progress(done, count, started, skipped)
    has_labels = labels is not None
    label_arr = labels if has_labels else np.full(count, -1, dtype=np.int64)
    # the official test mask, stored whatever the config's split (as prepare_dataset does); data.run_test_mask reads it
    is_test = data_lib.official_test_mask(spec["source"], path_read, max_images=spec.get("max_images"),
                                          test_path=spec.get("test_path"), **dict(spec.get("loader_kwargs") or {}))
    if is_test is not None:
        if len(is_test) != count:
            raise ValueError(f"{path_read}: official test mask of {len(is_test)} images, pool of {count}")
        with atomic_path(out / "is_test.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, is_test.astype(bool))
    with atomic_path(out / "labels.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, label_arr.astype(np.int64))
    meta = {
        **plan, "kind": "latents", "has_labels": has_labels,
        "num_classes": int(label_arr.max()) + 1 if has_labels and count else None,
        "crop": "ADM centre crop (diffbias.data.center_crop_resize): BOX halving, BICUBIC, centre crop (PIL)",
        "shards": [{"start": lo, "stop": hi, **{kind: str(_shard_file(out, kind, k).relative_to(out)) for kind in kinds}}
                   for k, (lo, hi) in enumerate(ranges)],
        "encoded_images_per_s": None if done == skipped else round((done - skipped) / (time.monotonic() - started), 2),
        "official_test_images": None if is_test is None else int(is_test.sum()),
    }
    write_json(meta, out / META)  # last: its presence is what makes the cache complete
    return meta


def _start_or_resume(out: Path, plan: dict) -> None:
    """Keep the shards of an unfinished encode of the same plan; otherwise start afresh."""
    (out / META).unlink(missing_ok=True)  # whatever was here is incomplete until this run's meta is written
    plan_file = out / PLAN
    if plan_file.exists():
        try:
            old = json.loads(plan_file.read_text())
        except (OSError, ValueError):
            old = None
        if old == json.loads(json.dumps(plan, default=str)):
            log.info("resuming the encode in %s", out)
            return
        log.warning("%s holds shards of another plan (spec, autoencoder, shard or batch size): starting afresh", out)
    shutil.rmtree(out / "shards", ignore_errors=True)
    (out / "labels.npy").unlink(missing_ok=True)
    (out / "is_test.npy").unlink(missing_ok=True)
    write_json(plan, plan_file)


# ----------------------------------------------------------------------------------------------------
# reading back
# ----------------------------------------------------------------------------------------------------


def is_latent_cache(path: str | os.PathLike) -> bool:
    """A latent cache folder (or its meta.json) rather than a prepared pixel pool (.npz)."""
    p = Path(path)
    return p.name == META or p.is_dir()


class LatentPool:
    """A complete latent cache as one pool: ``len(pool)``, ``pool[idx]`` (float16 rows gathered from the
    memory-mapped shards, in ``idx`` order), ``pool.gather(idx, hflip=True)`` for the mirrored twins,
    ``pool.labels`` (int64 or None) and ``pool.meta``. Nothing is read until indexed."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        self.root = p.parent if p.name == META else p
        meta_file = self.root / META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.root} is not a complete latent cache: {META} is missing "
                                    "(encode-latents has not finished; re-run it to resume)")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION or self.meta.get("kind") != "latents":
            raise ValueError(f"{meta_file}: not a format-{FORMAT_VERSION} latent cache")
        self.shape = tuple(self.meta["latent_shape"])
        self.has_hflip = bool(self.meta["hflip"])
        self._shards: dict[str, list[np.ndarray]] = {}
        kinds = ["latents", "hflip"] if self.has_hflip else ["latents"]
        for kind in kinds:
            arrays = []
            for s in self.meta["shards"]:
                arr = np.load(self.root / s[kind], mmap_mode="r")
                if arr.shape != (s["stop"] - s["start"], *self.shape) or arr.dtype != DTYPE:
                    raise ValueError(f"{self.root / s[kind]}: shape {arr.shape} {arr.dtype}, meta says "
                                     f"{(s['stop'] - s['start'], *self.shape)} {np.dtype(DTYPE).name}")
                arrays.append(arr)
            self._shards[kind] = arrays
        self._starts = np.asarray([s["start"] for s in self.meta["shards"]], dtype=np.int64)
        self.count = int(self.meta["count"])
        labels = np.load(self.root / "labels.npy", mmap_mode="r")
        if len(labels) != self.count:
            raise ValueError(f"{self.root}/labels.npy has {len(labels)} rows, meta says {self.count}")
        self.labels = np.asarray(labels, dtype=np.int64) if self.meta["has_labels"] else None

    def __len__(self) -> int:
        return self.count

    @property
    def is_test(self) -> np.ndarray | None:
        """The pool's official test images as a mask (``is_test.npy``), or None when the source has no official split.
        Whether a run uses it is the data set's ``split`` (data.run_test_mask)."""
        f = self.root / "is_test.npy"
        return np.load(f).astype(bool) if f.is_file() else None

    @property
    def spec(self) -> dict:
        """The data-set spec the cache was encoded from."""
        return self.meta["spec"]

    @property
    def nbytes(self) -> int:
        return self.count * int(np.prod(self.shape)) * np.dtype(DTYPE).itemsize

    def gather(self, idx, hflip: bool = False) -> np.ndarray:
        """float16 (len(idx), *shape) rows ``idx`` (any order, repeats allowed) of the pool or of its twins."""
        kind = "hflip" if hflip else "latents"
        if hflip and not self.has_hflip:
            raise ValueError(f"{self.root}: no mirrored latents (encoded without latents.hflip)")
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.count):
            raise IndexError(f"index out of range for a pool of {self.count}")
        out = np.empty((idx.size, *self.shape), dtype=DTYPE)
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            out[sel] = self._shards[kind][k][idx[sel] - self._starts[k]]
        return out

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(self.count)[idx]
        elif np.isscalar(idx):
            return self.gather([idx])[0]
        return self.gather(idx)

