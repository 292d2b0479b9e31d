"""A trained run as every measurement sees it: its EMA model, its spec, its training / test / reference
images with their labels, and how it samples.

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
    """One finished run: ``TrainedRun.load(model.pt, data.npz, device)``."""

    def __init__(self, model: torch.nn.Module, checkpoint: dict, images: np.ndarray, labels: np.ndarray | None,
                 device: torch.device, threads: int | None = None, inputs: dict[str, str] | None = None,
                 is_test: np.ndarray | None = None):
        self.model, self.checkpoint, self.device = model, checkpoint, device
        self.images, self.labels = images, labels  # the whole prepared pool: uint8 (P, C, H, W), int64 (P,)
        self.is_test = is_test  # official test images of the pool when the data set uses split: official
        self.threads = threads  # CPU threads of the job (torch and BLAS), for steps that set their own
        self.inputs = dict(inputs or {})  # a measurement's needs: "snapshots", "shared:<name>", "table:<name>" -> path

    @classmethod
    def load(cls, model_path: str | Path, data_path: str | Path, device: str = "auto", threads: int | None = None,
             inputs: dict[str, str] | None = None) -> "TrainedRun":
        dev = resolve_device(device)
        model, ckpt = load_trained(model_path, dev)
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
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    # -- its images -----------------------------------------------------------------------------------------
    @cached_property
    def split(self) -> tuple[np.ndarray, np.ndarray]:
        return data_lib.run_split(len(self.images), self.spec, self.is_test)

    def _images(self, idx: np.ndarray) -> Images:
        x = data_lib.to_model_range(self.images[idx]).to(self.device)
        y = None
        if self.num_classes:
            y = torch.as_tensor(self.labels[idx], dtype=torch.long, device=self.device)
        return Images(x, y)

    def train_images(self, k: int | None = None) -> Images:
        """The first k of the run's N training images (all of them when N < k)."""
        return self._images(self.split[0][:k])

    def test_images(self, k: int | None = None) -> Images:
        """The first k held-out images (the same for every N and model of this seed)."""
        return self._images(self.split[1][:k])

    def reference_images(self, which: str, max_reference: int) -> np.ndarray:
        """uint8 reference set for FID (see :func:`reference_indices`)."""
        idx = reference_indices(self.split, which, max_reference)
        return self.images[idx]

    # -- sampling -------------------------------------------------------------------------------------------
    def load_model(self, path: str | Path) -> tuple[torch.nn.Module, dict]:
        """Another model file of this run (an EMA snapshot), on the run's device."""
        return load_trained(path, self.device)

    def sample(self, num_samples: int, *, sampling_steps: int, seed: int, batch_size: int, guidance_scale: float = 1.0,
               model: torch.nn.Module | None = None) -> np.ndarray:
        """uint8 (num_samples, C, H, W) samples of this run's model (or of ``model``, e.g. a snapshot)."""
        from .sampling import sample_images

        model = self.model if model is None else model
        labels = sampling_labels(self.num_classes, num_samples, seed)
        if labels is not None and guidance_scale != 1.0:
            model = GuidedModel(model, guidance_scale)
        return sample_images(model, num_samples, image_shape=self.image_shape, steps=sampling_steps, seed=seed,
                             batch_size=batch_size, labels=labels)
