"""A trained run as every measurement sees it: its EMA model, its spec, its training / test / reference
images with their labels, and how it samples.

A run of a latent data set (``datasets.<d>.latents``: a cache written by ``encode-latents``, docs/latents-and-multi-gpu.md)
is measured where it was trained: its training and test "images" are the cached latents (PSNR, Jacobian, attention
maps run in latent space, ``run.space == "latent"``), its samples are latents decoded by the cache's autoencoder into
uint8 images (FID, KID, precision/recall and sample figures see images), and its FID reference images are the data
set's real images, read and cropped from the source as the cache's were (never decoded latents).

The train/test split (paper 004 A.2), loading, device placement and class labels live here once; the
measurement commands in ``cli.py`` only say what to compute. A class-conditional model (``num_classes > 0``,
``training.class_conditional``) is always evaluated with labels, as papers 002/003 do:

- PSNR, Jacobian, attention maps, PCA basis, plugin measurements: each image with its own label;
- sampling (FID, FID curve, FreeU grid): labels drawn uniformly over the classes from the sample seed, and no
  classifier-free guidance unless ``guidance_scale`` > 1 (then eps = eps_null + s (eps_y - eps_null), on the eps
  channels only, as DiT's ``forward_with_cfg`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from . import data as data_lib
from .device import resolve_device
from .train import load_trained


def reference_indices(split: tuple[np.ndarray, np.ndarray], which: str, max_reference: int) -> np.ndarray:
    """The FID reference set of a run: the first min(N, max_reference) of its training images (paper 004 A.2,
    50k cap) or of its held-out test images, in the run's deterministic split (data.run_split)."""
    pool = split[0] if which == "train" else split[1]
    return pool[: min(len(pool), max_reference)]


def sampling_labels(num_classes: int, num_samples: int, seed: int) -> torch.Tensor | None:
    """Class labels for sampling a class-conditional model: uniform over the classes, fixed by the sample seed
    (the same labels for every model and snapshot, whatever the batch size); None when unconditional."""
    if num_classes <= 0:
        return None
    return torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))


class GuidedModel(torch.nn.Module):
    """Classifier-free guidance around a class-conditional model: eps = eps_null + s (eps_y - eps_null) on the
    first C output channels; the remaining (variance) channels come from the conditional pass."""

    def __init__(self, model: torch.nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, float(scale)
        self.num_classes = int(model.num_classes)

    def forward(self, x, t, y):
        null = torch.full_like(y, self.num_classes)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        C = x.shape[1]
        eps = uncond[:, :C] + self.scale * (cond[:, :C] - uncond[:, :C])
        return torch.cat([eps, cond[:, C:]], dim=1)


@dataclass
class Images:
    """Images in the model's range [-1, 1] on the run's device, with their labels when the model uses them."""

    x: torch.Tensor
    y: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.x)


class TrainedRun:
    """One finished run: ``TrainedRun.load(model.pt, data, device)``, ``data`` a prepared pixel pool (``.npz``) or a
    latent cache (its folder or ``meta.json``)."""

    def __init__(self, model: torch.nn.Module, checkpoint: dict, images, labels: np.ndarray | None,
                 device: torch.device, threads: int | None = None, inputs: dict[str, str] | None = None,
                 is_test: np.ndarray | None = None):
        self.model, self.checkpoint, self.device = model, checkpoint, device
        # the whole pool: uint8 (P, C, H, W) pixels, or a latents.LatentPool (float16 rows); int64 labels (P,)
        self.images, self.labels = images, labels
        self.is_test = is_test  # official test images of the pool when the data set uses split: official
        self.threads = threads  # CPU threads of the job (torch and BLAS), for steps that set their own
        self.inputs = dict(inputs or {})  # a measurement's needs: "snapshots", "shared:<name>", "table:<name>" -> path

    @classmethod
    def load(cls, model_path: str | Path, data_path: str | Path, device: str = "auto", threads: int | None = None,
             inputs: dict[str, str] | None = None) -> "TrainedRun":
        from .latents import LatentPool, is_latent_cache

        dev = resolve_device(device)
        model, ckpt = load_trained(model_path, dev)
        if is_latent_cache(data_path):
            images = LatentPool(data_path)
            labels = images.labels
        else:
            images, labels, _ = data_lib.load_prepared(str(data_path))
        if ckpt.get("num_classes", 0) and labels is None:
            raise ValueError(f"{model_path} is class-conditional but {data_path} has no labels")
        return cls(model, ckpt, images, labels, dev, threads, inputs,
                   is_test=data_lib.run_test_mask(ckpt["spec"], str(data_path)))

    # -- what the run is ------------------------------------------------------------------------------------
    @property
    def spec(self) -> dict:
        return self.checkpoint["spec"]

    @property
    def run(self) -> dict:
        return self.spec["run"]

    @property
    def step(self) -> int:
        return int(self.checkpoint["step"])

    @property
    def num_classes(self) -> int:
        return int(self.checkpoint.get("num_classes", 0) or 0)

    @property
    def latent(self) -> bool:
        """Whether the model works on autoencoder latents (a latent cache) rather than pixels."""
        return not isinstance(self.images, np.ndarray)

    @property
    def space(self) -> str:
        """Where the per-run measurements (PSNR, Jacobian, attention maps) run: "latent" or "pixel"."""
        return "latent" if self.latent else "pixel"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """What the model sees: (C, H, W) of a pixel image or of a latent."""
        return tuple(self.images.shape) if self.latent else tuple(self.images.shape[1:])

    # -- its images -----------------------------------------------------------------------------------------
    @cached_property
    def split(self) -> tuple[np.ndarray, np.ndarray]:
        return data_lib.run_split(len(self.images), self.spec, self.is_test)

    def _images(self, idx: np.ndarray) -> Images:
        if self.latent:
            x = torch.from_numpy(self.images.gather(idx).astype(np.float32)).to(self.device)
        else:
            x = data_lib.to_model_range(self.images[idx]).to(self.device)
        y = None
        if self.num_classes:
            y = torch.as_tensor(self.labels[idx], dtype=torch.long, device=self.device)
        return Images(x, y)

    def train_images(self, k: int | None = None) -> Images:
        """The first k of the run's N training images (all of them when N < k); latents for a latent run."""
        return self._images(self.split[0][:k])

    def test_images(self, k: int | None = None) -> Images:
        """The first k held-out images (the same for every N and model of this seed); latents for a latent run."""
        return self._images(self.split[1][:k])

    @cached_property
    def pixel_images(self):
        """The real images of the pool as uint8 (P, C, H, W): the prepared pixel pool, or for a latent run the data
        set's images read and cropped on access from the source the cache was encoded from (data.PixelImages)."""
        return latent_pixels(self.images) if self.latent else self.images

    def reference_images(self, which: str, max_reference: int):
        """uint8 reference set for FID (see :func:`reference_indices`): real images, also for a latent run. A latent
        run gets a lazy data.PixelImages subset (``len``, slices): read it in chunks."""
        idx = reference_indices(self.split, which, max_reference)
        return self.pixel_images[idx] if not self.latent else ImageRows(self.pixel_images, idx)

    def to_pixels(self, x: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, H, W) images of model inputs ``x``: pixels in [-1, 1], or latents decoded by the run's
        autoencoder."""
        if not self.latent:
            return data_lib.from_model_range(x).cpu().numpy()
        from .autoencoder import to_uint8_images

        return to_uint8_images(self.autoencoder.decode(x))

    @cached_property
    def autoencoder(self):
        """The autoencoder that encoded this run's latent cache, on the run's device; refused when its weights or
        architecture differ from the cache's (decoding with another VAE would score other images)."""
        from .autoencoder import Autoencoder

        meta = self.images.meta["autoencoder"]
        ae = Autoencoder.load(meta["path"], self.device)
        found = ae.fingerprint()
        if (found["config_sha256"], found["weights_sha256"]) != (meta["config_sha256"], meta["weights_sha256"]):
            raise ValueError(f"the autoencoder at {meta['path']} is not the one that encoded {self.images.root} "
                             "(fingerprints differ): restore it, or encode the data set again")
        return ae

    # -- sampling -------------------------------------------------------------------------------------------
    def load_model(self, path: str | Path) -> tuple[torch.nn.Module, dict]:
        """Another model file of this run (an EMA snapshot), on the run's device."""
        return load_trained(path, self.device)

    def sample(self, num_samples: int, *, sampling_steps: int, seed: int, batch_size: int, guidance_scale: float = 1.0,
               model: torch.nn.Module | None = None) -> np.ndarray:
        """uint8 (num_samples, C, H, W) samples of this run's model (or of ``model``, e.g. a snapshot). A latent run
        samples latents (x0 not clipped: latents have no [-1, 1] range, as DiT's sampler) and decodes each batch with
        its autoencoder, so the result is images at the data set's resolution."""
        from .sampling import sample_batches, sample_images

        model = self.model if model is None else model
        labels = sampling_labels(self.num_classes, num_samples, seed)
        if labels is not None and guidance_scale != 1.0:
            model = GuidedModel(model, guidance_scale)
        if not self.latent:
            return sample_images(model, num_samples, image_shape=self.image_shape, steps=sampling_steps, seed=seed,
                                 batch_size=batch_size, labels=labels)
        with torch.no_grad():
            return np.concatenate([self.to_pixels(z) for z in sample_batches(
                model, num_samples, shape=self.image_shape, steps=sampling_steps, seed=seed, batch_size=batch_size,
                labels=labels, clip_denoised=False)])


def latent_pixels(pool) -> "data_lib.PixelImages":
    """The real images a latent cache was encoded from, row for row; refused when the source no longer holds as many
    images as the cache (the rows would not be the same images)."""
    images = data_lib.PixelImages(pool.spec)
    if len(images) != len(pool):
        raise ValueError(f"{pool.root} holds {len(pool)} latents but its source now has {len(images)} images: "
                         "encode the data set again")
    return images


class ImageRows:
    """Rows ``idx`` of a lazy image pool, read on access: ``len``, ``rows[a:b]`` -> uint8 array."""

    def __init__(self, images, idx: np.ndarray):
        self.images, self.idx = images, np.asarray(idx)

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.idx), *self.images.shape[1:])

    def __getitem__(self, sl) -> np.ndarray:
        return self.images[self.idx[sl]]
