"""The one training loop, shared by every backbone.

- Deterministic for a given seed: model init from ``torch.manual_seed(seed)``; batches, timesteps, noise,
  flips and label dropout all come from one generator whose state is checkpointed.
- Resumable: a checkpoint (model, EMA, optimiser, generator, log so far) is written atomically every
  ``checkpoint_every`` steps to a side path that is not a declared Snakemake output; a restarted run
  resumes from it and ends with the same result as an uninterrupted one. The checkpoint carries a SHA-256
  trailer and the previous one is kept (``checkpoint.prev.pt``): a truncated or corrupt checkpoint is
  logged and skipped, and the run resumes from the previous one, or from step 0.
- Time-budgeted: with ``max_runtime_minutes`` the run checkpoints and exits (code 75, EX_TEMPFAIL) before
  the budget, so a scheduler retry resumes it.
- EMA snapshots at ``snapshot_steps`` (for FID over training) are kept beside the checkpoint and
  published as ``ema_snapshots/`` at the end; peak memory is logged (see ``metrics.memory``).
- Declared outputs (EMA weights, snapshots, train log parquet, run.json) are written atomically at the very end.
- Several processes (``training.gpus_per_run``, launched by torchrun; :mod:`diffbias.distributed`): every rank
  draws the same global batch (indices, flips, timesteps, noise, label dropout) from the same generator and
  trains on its contiguous share, ``batch_size / world_size`` samples; DDP averages the gradients, so a step
  equals the one-process step at the same global batch up to float rounding. EMA, logs, snapshots and
  checkpoints are rank 0's; the others wait at a barrier where it writes files. All ranks resume from the
  same checkpoint.
- Latent data sets (a cache written by ``encode-latents``, :mod:`diffbias.latents`): the training latents live
  on the device when they fit in ``LATENTS_ON_DEVICE_BYTES``, else rows are gathered per batch from the
  memory-mapped pool; ``training.hflip`` takes the cached latents of the mirrored image (a flipped latent is not
  the latent of the flipped image).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import data as data_lib
from . import distributed
from .config import spec_hash
from .device import resolve_device  # defined in device.py; cli.py and older callers import it from here
from .diffusion import create_diffusion
from .io import CorruptFileError, load_torch_checked, provenance, save_torch, save_torch_checked, write_json, write_parquet
from .metrics.memory import peak_memory_mb, reset_peak_memory
from .models import build_model

log = logging.getLogger("diffbias.train")

EXIT_TIME_BUDGET = 75  # EX_TEMPFAIL: "try again", the retry resumes from the checkpoint
# Training latents up to this size (float32, twins included) are kept on the device; larger sets (ImageNet:
# 1.28M x 4096 x 4 B = 21 GB) are gathered per batch from the memory-mapped cache. Same values either way.
LATENTS_ON_DEVICE_BYTES = 2 * 1024**3


class NonFiniteLossError(RuntimeError):
    pass


class TimeBudgetReached(RuntimeError):
    pass


def build_from_spec(spec: dict, in_channels: int, input_size: int, num_classes: int = 0) -> torch.nn.Module:
    m = spec["model"]
    return build_model(
        m["backbone"], None, m["options"], input_size=input_size, in_channels=in_channels, num_classes=num_classes
    )


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """SSM-style parameters named by the backbone get no weight decay and lr <= 1e-3 (S4D convention)."""
    keywords = getattr(model, "no_weight_decay_keywords", ())
    special = [p for n, p in model.named_parameters() if p.requires_grad and any(k in n for k in keywords)]
    special_ids = {id(p) for p in special}
    regular = [p for p in model.parameters() if p.requires_grad and id(p) not in special_ids]
    # "base_lr": the group's rate after warm-up (warmup_factor scales "lr" from it at every step)
    groups = [{"params": regular, "lr": lr, "base_lr": lr, "weight_decay": weight_decay}]
    if special:
        groups.append({"params": special, "lr": min(lr, 1e-3), "base_lr": min(lr, 1e-3), "weight_decay": 0.0})
    return groups


DEFAULT_BETAS = (0.9, 0.999)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] | list[float] | None = None) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one kernel for every parameter, on CPU as on CUDA): the per-parameter loop of
    the default CPU implementation was ~9% of a DiT-T/2 step at batch 8 (one thread). ``betas`` None: AdamW's
    (0.9, 0.999); U-ViT's recipe is (0.99, 0.999)."""
    betas = tuple(float(b) for b in (betas or DEFAULT_BETAS))
    return torch.optim.AdamW(param_groups(model, lr, weight_decay), lr=lr, betas=betas, fused=True)


def warmup_factor(step: int, warmup_steps: int | None) -> float:
    """Linear warm-up: the learning rate of optimiser step ``step`` (1-based) is ``min(1, step / warmup_steps)``
    times the base rate. A function of the step alone, so a resumed run continues the same schedule (no
    scheduler state to checkpoint)."""
    if not warmup_steps:
        return 1.0
    return min(1.0, step / warmup_steps)


def apply_warmup(opt: torch.optim.Optimizer, step: int, warmup_steps: int | None) -> None:
    factor = warmup_factor(step, warmup_steps)
    for group in opt.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor  # a checkpoint from before warm-up existed


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    # Warm-up (1+t)/(10+t): with a few hundred steps a 0.9999 EMA would barely leave the initialisation.
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def diffusion_loss(model, diffusion, x0, t, noise, y=None, *, stage_forward=None) -> dict[str, torch.Tensor]:
    """Per-sample hybrid loss terms; adds the per-stage losses of cascade backbones (DiMR-style).

    A backbone with ``stage_loss_weights`` (w_1, w_2, ...) and ``stage_outputs``/``stage_targets`` gets
    sum_i w_i * MSE(stage_i eps, eps pooled to stage i) for the coarser stages, from the same forward pass.
    ``stage_forward``: what computes ``stage_outputs`` (default the model's own method); under DDP it is the
    wrapped :class:`AllStages`, so that the forward goes through DDP and its gradients are synchronised.
    """
    weights = getattr(model, "stage_loss_weights", None)
    if not weights or not any(weights[1:]):
        return diffusion.training_losses(model, x0, t, noise=noise, model_kwargs={"y": y})
    cache: dict[str, list] = {}
    stages = stage_forward if stage_forward is not None else model.stage_outputs

    def full_resolution(x, t_, y=None):
        cache["outs"] = stages(x, t_, y)
        return cache["outs"][0]

    terms = diffusion.training_losses(full_resolution, x0, t, noise=noise, model_kwargs={"y": y})
    C = x0.shape[1]
    aux = sum(
        w * (out[:, :C] - target).pow(2).flatten(1).mean(1)
        for w, out, target in zip(weights[1:], cache["outs"][1:], model.stage_targets(noise)[1:])
        if w
    )
    return {**terms, "loss": terms["loss"] + aux, "stage_mse": aux}


class AllStages(torch.nn.Module):
    """A cascade backbone whose forward is its ``stage_outputs``: DDP must see the whole forward to sync it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, y=None):
        return self.model.stage_outputs(x, t, y)


class Trainer:
    def __init__(self, spec: dict, data_path: str | Path, out_dir: str | Path, checkpoint_path: str | Path,
                 device: str = "auto", max_runtime_minutes: float | None = None, pca_basis: str | Path | None = None):
        self.spec = spec
        self.max_runtime_minutes = max_runtime_minutes  # the job's budget: not part of the spec (no retrain)
        self.cfg = spec["training"]
        self.out_dir = Path(out_dir)
        self.checkpoint_path = Path(checkpoint_path)
        # EMA snapshots (paper 002 figs. 11-12) live beside the side checkpoint until the run finishes, so a
        # killed job keeps them; write_outputs then publishes them as the run's ema_snapshots/ folder.
        self.snapshot_dir = self.checkpoint_path.with_name(self.checkpoint_path.stem + "-ema-snapshots")
        self.snapshot_steps = sorted(set(self.cfg.get("snapshot_steps", [])))
        self.device = resolve_device(device)
        # several processes (torchrun / srun): join the group; each rank takes its share of the global batch
        self.dist = distributed.from_environment()
        world = self.dist.world_size if self.dist else 1
        self.local_batch = distributed.local_batch_size(self.cfg["batch_size"], world)
        if self.dist:
            self.device = distributed.init(self.dist, self.device)
            if world != distributed.gpus_per_run(spec):
                log.warning("launched on %d processes, training.gpus_per_run is %d: the result is the same up to "
                            "float rounding", world, distributed.gpus_per_run(spec))
        self.is_main = self.dist is None or self.dist.is_main
        self.hash = spec_hash(spec)
        run = spec["run"]

        from .latents import LatentPool, is_latent_cache

        self.latent_pool = None
        if is_latent_cache(data_path):
            pool = self.latent_pool = LatentPool(data_path)
            labels, pool_size = pool.labels, len(pool)
        else:
            images, labels, meta = data_lib.load_prepared(data_path)
            pool_size = len(images)
        train_idx, _ = data_lib.run_split(pool_size, spec, data_lib.run_test_mask(spec, str(data_path)))
        self.x_twin = None  # latents of the mirrored images (latent data with training.hflip)
        if self.latent_pool is None:
            self.x_train = data_lib.to_model_range(images[train_idx]).to(self.device)  # small data sets live on the device
            self.data_shape, self.n_train = tuple(self.x_train.shape[1:]), len(self.x_train)
        else:
            self._init_latents(train_idx)
        self.num_classes = 0
        self.y_train = None
        if self.cfg["class_conditional"]:
            if labels is None:
                raise ValueError(f"dataset {run['dataset']!r} has no labels; set training.class_conditional: false")
            self.num_classes = int(labels.max()) + 1
            self.y_train = torch.as_tensor(labels[train_idx], dtype=torch.long, device=self.device)
        C, H = self.data_shape[0], self.data_shape[1]
        self.in_channels, self.input_size = C, H

        torch.manual_seed(run["seed"])
        self.model = build_from_spec(spec, C, H, self.num_classes).to(self.device)
        if spec["model"].get("pca_from"):
            if pca_basis is None:
                raise ValueError("this variant composes attention from principal components: pass --pca-basis")
            self.model.load_pca_basis(torch.load(pca_basis, map_location=self.device, weights_only=False)["components"])
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = make_optimizer(self.model, self.cfg["lr"], self.cfg["weight_decay"], self.cfg.get("betas"))
        self.diffusion = create_diffusion(None)
        self.gen = torch.Generator(device=self.device).manual_seed(run["seed"] + 1)
        self.step = 0
        self.rows: list[dict] = []
        self.amp = self.cfg.get("amp", "none") == "bf16" and self.device.type == "cuda"
        self.forward = torch.compile(self.model) if self.cfg.get("compile") else self.model
        self.stage_forward = None  # one process: diffusion_loss calls the model's stage_outputs itself
        if self.dist:
            from torch.nn.parallel import DistributedDataParallel

            weights = getattr(self.model, "stage_loss_weights", None)
            cascade = bool(weights and any(weights[1:]))
            net = AllStages(self.model) if cascade else self.model
            net = DistributedDataParallel(net, device_ids=[self.device] if self.device.type == "cuda" else None)
            net = torch.compile(net) if self.cfg.get("compile") else net
            if cascade:
                self.forward, self.stage_forward = self.model, net
            else:
                self.forward = net

    def _init_latents(self, train_idx: np.ndarray) -> None:
        """Training latents from the cache: on the device when small, else gathered per batch from the memmap."""
        pool = self.latent_pool
        if self.cfg["hflip"] and not pool.has_hflip:
            raise ValueError(f"training.hflip needs the latents of the mirrored images, which {pool.root} lacks: set "
                             f"datasets.{self.spec['run']['dataset']}.latents.hflip: true and encode again")
        self.data_shape = tuple(pool.shape)
        twins = self.cfg["hflip"]
        size = len(train_idx) * int(np.prod(pool.shape)) * 4 * (2 if twins else 1)
        if size <= LATENTS_ON_DEVICE_BYTES:
            def load(hflip: bool) -> torch.Tensor:
                return torch.from_numpy(pool.gather(train_idx, hflip=hflip).astype(np.float32)).to(self.device)

            self.x_train = load(False)
            self.x_twin = load(True) if twins else None
            self.pool_rows = None
        else:
            self.x_train = None
            self.pool_rows = np.asarray(train_idx)
        self.n_train = len(train_idx)

    def _rows(self, idx: torch.Tensor, hflip: bool = False) -> torch.Tensor:
        """Training images (or latents, or their mirrored twins) ``idx`` as float32 on the device."""
        if self.latent_pool is not None and self.x_train is None:  # large latent set: from the memmap
            rows = self.pool_rows[idx.cpu().numpy()]
            return torch.from_numpy(self.latent_pool.gather(rows, hflip=hflip).astype(np.float32)).to(self.device)
        return (self.x_twin if hflip else self.x_train)[idx]

    # ------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "spec_hash": self.hash,
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "gen": self.gen.get_state(),
            "rows": self.rows,
        }

    @property
    def prev_checkpoint_path(self) -> Path:
        """The checkpoint before the latest one (``checkpoint.prev.pt``): the fallback if the latest is damaged."""
        return self.checkpoint_path.with_name(self.checkpoint_path.stem + ".prev" + self.checkpoint_path.suffix)

    def save_checkpoint(self) -> None:
        """Rotate latest -> prev (one atomic rename), then write the new latest atomically with a SHA-256
        trailer. At every instant at least one complete checkpoint exists, so a kill anywhere loses at most
        one interval."""
        if self.checkpoint_path.exists():
            os.replace(self.checkpoint_path, self.prev_checkpoint_path)
        save_torch_checked(self.state(), self.checkpoint_path)

    def _load_checkpoint(self) -> tuple[dict, Path] | None:
        """The newest checkpoint that passes its checksum and belongs to this spec, else None."""
        for path in (self.checkpoint_path, self.prev_checkpoint_path):
            if not path.exists():
                continue
            try:
                ckpt = load_torch_checked(path, map_location=self.device)
            except (CorruptFileError, OSError) as exc:
                log.warning("ignoring damaged checkpoint (%s); falling back to the previous one or to step 0", exc)
                path.unlink(missing_ok=True)  # never rotate a damaged file over the good previous one
                continue
            if ckpt.get("spec_hash") != self.hash:
                log.warning("ignoring checkpoint %s: it belongs to a different run spec", path)
                continue
            return ckpt, path
        return None

    def try_resume(self) -> bool:
        # Rank 0 picks the checkpoint (dropping damaged ones, promoting the previous one) before the others read:
        # all ranks then load the same file.
        found = self._load_checkpoint() if self.is_main else None
        if found is not None and found[1] != self.checkpoint_path:  # the previous one becomes the latest again
            os.replace(found[1], self.checkpoint_path)
        self._barrier()
        if not self.is_main:
            found = self._load_checkpoint()
        if found is None:
            return False
        ckpt, path = found
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        self.gen.set_state(ckpt["gen"].to(self.gen.device) if hasattr(ckpt["gen"], "to") else ckpt["gen"])
        self.step, self.rows = ckpt["step"], list(ckpt["rows"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------------------------------------
    def sample_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This process's share of the step's global batch: (x0, t, noise, y).

        The whole global batch is drawn, in the same order as always (indices, flips, timesteps, noise, label
        dropout), from the generator every rank holds in the same state; rank r keeps samples
        [r * b, (r + 1) * b) with b = batch_size / world_size, so the ranks' shares are the one-process batch."""
        bs, n, g, dev = self.cfg["batch_size"], self.n_train, self.gen, self.device
        idx = torch.randint(0, n, (bs,), generator=g, device=dev)
        flip = torch.rand(bs, generator=g, device=dev) < 0.5 if self.cfg["hflip"] else None
        t = torch.randint(0, self.diffusion.num_timesteps, (bs,), generator=g, device=dev)
        noise = torch.randn((bs, *self.data_shape), generator=g, device=dev)
        drop = None
        if self.y_train is not None:
            drop = torch.rand(bs, generator=g, device=dev) < self.cfg["label_dropout"]
        if self.dist:
            share = slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)
            idx, t, noise = idx[share], t[share], noise[share]
            flip = None if flip is None else flip[share]
            drop = None if drop is None else drop[share]
        x = self._rows(idx)
        if flip is not None:
            # pixels: mirror the image; latents: the cached latents of the mirrored image
            mirrored = self._rows(idx, hflip=True) if self.latent_pool is not None else x.flip(-1)
            x = torch.where(flip[:, None, None, None], mirrored, x)
        y = None
        if self.y_train is not None:
            y = self.y_train[idx]
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)  # null label for guidance
        return x, t, noise, y

    def train_step(self) -> torch.Tensor:
        x, t, noise, y = self.sample_batch()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            terms = diffusion_loss(self.forward, self.diffusion, x, t, noise, y, stage_forward=self.stage_forward)
        loss = terms["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: gradients averaged over the ranks' equal shares = the global batch's mean
        if self.cfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        apply_warmup(self.opt, self.step + 1, self.cfg.get("warmup_steps"))  # self.step: steps done so far
        self.opt.step()
        if self.is_main:  # the EMA is rank 0's alone (every rank holds the same weights)
            ema_update(self.ema, self.model, ema_decay_at(self.step, self.cfg["ema_decay"], self.cfg["ema_warmup"]))
        return torch.stack([loss.detach(), terms["mse"].mean().detach(), terms["vb"].mean().detach()])

    def _barrier(self) -> None:
        if self.dist:
            torch.distributed.barrier()

    def _global_mean(self, v: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of per-rank means of equal shares: the global batch's mean."""
        if self.dist:
            v = v.clone()
            torch.distributed.all_reduce(v)
            v /= self.dist.world_size
        return v

    def _stop_for_budget(self, spent: float, per_step: float, budget: float) -> bool:
        """Rank 0's clock decides, for every rank: ranks that disagreed would wait for each other forever."""
        stop = torch.tensor([float(spent + 2 * per_step + 0.5 > budget)], device=self.device)
        if self.dist:
            torch.distributed.broadcast(stop, 0)
        return bool(stop.item())

    def run(self, progress: bool = True) -> None:
        cfg = self.cfg
        if not self.try_resume() and self.is_main:
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)  # snapshots of another spec or attempt
        reset_peak_memory(self.device)
        start, start_step = time.monotonic(), self.step
        budget = self.max_runtime_minutes
        self.model.train()
        acc = torch.zeros(3, device=self.device)
        acc_steps, t_interval = 0, time.perf_counter()
        while self.step < cfg["steps"]:
            acc += self.train_step()  # no host sync per step
            acc_steps += 1
            self.step += 1
            at_log = self.step % cfg["log_every"] == 0 or self.step == cfg["steps"]
            at_ckpt = self.step % cfg["checkpoint_every"] == 0 and self.step < cfg["steps"]
            if at_log or at_ckpt:
                loss, mse, vb = self._global_mean(acc / acc_steps).tolist()
                if not all(math.isfinite(v) for v in (loss, mse, vb)):
                    raise NonFiniteLossError(
                        f"non-finite loss (loss={loss}, mse={mse}, vb={vb}) in steps {self.step - acc_steps + 1}..{self.step} "
                        f"of run {self.spec['run']}; stopping. Lower training.lr or set training.grad_clip."
                    )
                elapsed = time.perf_counter() - t_interval
                peak_mb, memory_kind = peak_memory_mb(self.device)
                self.rows.append(
                    {"step": self.step, "loss": loss, "mse": mse, "vb": vb, "images_per_s": acc_steps * cfg["batch_size"] / elapsed,
                     "peak_memory_mb": peak_mb, "memory_kind": memory_kind, "device": str(self.device)}
                )
                if progress and self.is_main:
                    print(f"[{self.spec['run']['variant']} N={self.spec['run']['N']} seed={self.spec['run']['seed']}] "
                          f"step {self.step}/{cfg['steps']} loss {loss:.4f} mse {mse:.4f} vb {vb:.4f} "
                          f"{self.rows[-1]['images_per_s']:.0f} img/s", flush=True)
                acc.zero_()
                acc_steps, t_interval = 0, time.perf_counter()
            if self.step in self.snapshot_steps and self.is_main:
                self.save_snapshot()
            if at_ckpt and self.is_main:
                self.save_checkpoint()
            if budget is not None and self.step < cfg["steps"]:
                spent = (time.monotonic() - start) / 60
                per_step = spent / (self.step - start_step)
                if self._stop_for_budget(spent, per_step, budget):  # leave time to write the checkpoint
                    if self.is_main:
                        self.save_checkpoint()
                    self._barrier()  # no rank exits (and makes torchrun stop the others) before it is written
                    raise TimeBudgetReached(
                        f"time budget of {budget} min nearly spent at step {self.step}/{cfg['steps']}; "
                        f"checkpoint saved to {self.checkpoint_path}; rerun to resume"
                    )
        if self.is_main:
            self.write_outputs()
        self._barrier()
        if self.dist:
            torch.distributed.destroy_process_group()

    def _model_file(self) -> dict:
        """What model.pt and every EMA snapshot hold: load_trained reads either."""
        extra = {"in_channels": self.in_channels, "input_size": self.input_size, "num_classes": self.num_classes}
        return {"spec": self.spec, "ema": self.ema.state_dict(), "step": self.step, **extra}

    def save_snapshot(self) -> None:
        save_torch(self._model_file(), self.snapshot_dir / f"ema_{self.step:08d}.pt")

    def publish_snapshots(self) -> None:
        """Move the configured snapshots into <out_dir>/ema_snapshots/ as one atomic directory rename."""
        final = self.out_dir / "ema_snapshots"
        staging = self.out_dir / ".ema_snapshots.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        missing = [s for s in self.snapshot_steps if not (self.snapshot_dir / f"ema_{s:08d}.pt").exists()]
        if missing:  # e.g. a checkpoint from before snapshot_steps was set (the spec hash prevents that)
            raise RuntimeError(f"EMA snapshots for steps {missing} are missing from {self.snapshot_dir}")
        for step in self.snapshot_steps:
            name = f"ema_{step:08d}.pt"
            shutil.copy2(self.snapshot_dir / name, staging / name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)

    def write_outputs(self) -> None:
        prov = provenance(self.hash, str(self.device))
        model_file = self._model_file()
        extra = {k: model_file[k] for k in ("in_channels", "input_size", "num_classes")}
        peak_mb, memory_kind = peak_memory_mb(self.device)
        extra_run = {"peak_memory_mb": peak_mb, "memory_kind": memory_kind, "snapshot_steps": self.snapshot_steps}
        self.publish_snapshots()
        save_torch(model_file, self.out_dir / "model.pt")
        write_parquet(pd.DataFrame(self.rows), self.out_dir / "train_log.parquet", {"spec": self.spec, "provenance": prov})
        write_json({"spec": self.spec, "spec_hash": self.hash, "provenance": prov, **extra, **extra_run},
                   self.out_dir / "run.json")
        self.checkpoint_path.unlink(missing_ok=True)  # finished: a later rerun starts fresh
        self.prev_checkpoint_path.unlink(missing_ok=True)
        shutil.rmtree(self.snapshot_dir, ignore_errors=True)


def load_trained(model_path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The EMA model of a finished run, in eval mode, and its spec."""
    ckpt = torch.load(model_path, map_location=device, weights_only=False)
    model = build_from_spec(ckpt["spec"], ckpt["in_channels"], ckpt["input_size"], ckpt["num_classes"])
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval(), ckpt
