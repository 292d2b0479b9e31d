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
from .config import spec_hash
from .device import resolve_device  # defined in device.py; cli.py and older callers import it from here
from .diffusion import create_diffusion
from .io import CorruptFileError, load_torch_checked, provenance, save_torch, save_torch_checked, write_json, write_parquet
from .metrics.memory import peak_memory_mb, reset_peak_memory
from .models import build_model

log = logging.getLogger("diffbias.train")

EXIT_TIME_BUDGET = 75  # EX_TEMPFAIL: "try again", the retry resumes from the checkpoint


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


def diffusion_loss(model, diffusion, x0, t, noise, y=None) -> dict[str, torch.Tensor]:
    """Per-sample hybrid loss terms; adds the per-stage losses of cascade backbones (DiMR-style).

    A backbone with ``stage_loss_weights`` (w_1, w_2, ...) and ``stage_outputs``/``stage_targets`` gets
    sum_i w_i * MSE(stage_i eps, eps pooled to stage i) for the coarser stages, from the same forward pass.
    """
    weights = getattr(model, "stage_loss_weights", None)
    if not weights or not any(weights[1:]):
        return diffusion.training_losses(model, x0, t, noise=noise, model_kwargs={"y": y})
    cache: dict[str, list] = {}

    def full_resolution(x, t_, y=None):
        cache["outs"] = model.stage_outputs(x, t_, y)
        return cache["outs"][0]

    terms = diffusion.training_losses(full_resolution, x0, t, noise=noise, model_kwargs={"y": y})
    C = x0.shape[1]
    aux = sum(
        w * (out[:, :C] - target).pow(2).flatten(1).mean(1)
        for w, out, target in zip(weights[1:], cache["outs"][1:], model.stage_targets(noise)[1:])
        if w
    )
    return {**terms, "loss": terms["loss"] + aux, "stage_mse": aux}


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
        self.hash = spec_hash(spec)
        run = spec["run"]

        images, labels, meta = data_lib.load_prepared(data_path)
        train_idx, _ = data_lib.split_indices(len(images), run["N"], spec["dataset"]["test_size"], run["seed"])
        self.x_train = data_lib.to_model_range(images[train_idx]).to(self.device)  # small data sets live on the device
        self.num_classes = 0
        self.y_train = None
        if self.cfg["class_conditional"]:
            if labels is None:
                raise ValueError(f"dataset {run['dataset']!r} has no labels; set training.class_conditional: false")
            self.num_classes = int(labels.max()) + 1
            self.y_train = torch.as_tensor(labels[train_idx], dtype=torch.long, device=self.device)
        C, H = self.x_train.shape[1], self.x_train.shape[2]
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
        found = self._load_checkpoint()
        if found is None:
            return False
        ckpt, path = found
        if path != self.checkpoint_path:  # resume from the previous one: it becomes the latest again
            os.replace(path, self.checkpoint_path)
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        self.gen.set_state(ckpt["gen"].to(self.gen.device) if hasattr(ckpt["gen"], "to") else ckpt["gen"])
        self.step, self.rows = ckpt["step"], list(ckpt["rows"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------------------------------------
    def sample_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        bs, n, g, dev = self.cfg["batch_size"], len(self.x_train), self.gen, self.device
        idx = torch.randint(0, n, (bs,), generator=g, device=dev)
        x = self.x_train[idx]
        if self.cfg["hflip"]:
            flip = torch.rand(bs, generator=g, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        t = torch.randint(0, self.diffusion.num_timesteps, (bs,), generator=g, device=dev)
        noise = torch.randn(x.shape, generator=g, device=dev)
        y = None
        if self.y_train is not None:
            y = self.y_train[idx]
            drop = torch.rand(bs, generator=g, device=dev) < self.cfg["label_dropout"]
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)  # null label for guidance
        return x, t, noise, y

    def train_step(self) -> torch.Tensor:
        x, t, noise, y = self.sample_batch()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            terms = diffusion_loss(self.forward, self.diffusion, x, t, noise, y)
        loss = terms["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        apply_warmup(self.opt, self.step + 1, self.cfg.get("warmup_steps"))  # self.step: steps done so far
        self.opt.step()
        ema_update(self.ema, self.model, ema_decay_at(self.step, self.cfg["ema_decay"], self.cfg["ema_warmup"]))
        return torch.stack([loss.detach(), terms["mse"].mean().detach(), terms["vb"].mean().detach()])

    def run(self, progress: bool = True) -> None:
        cfg = self.cfg
        if not self.try_resume():
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
                loss, mse, vb = (acc / acc_steps).tolist()
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
                if progress:
                    print(f"[{self.spec['run']['variant']} N={self.spec['run']['N']} seed={self.spec['run']['seed']}] "
                          f"step {self.step}/{cfg['steps']} loss {loss:.4f} mse {mse:.4f} vb {vb:.4f} "
                          f"{self.rows[-1]['images_per_s']:.0f} img/s", flush=True)
                acc.zero_()
                acc_steps, t_interval = 0, time.perf_counter()
            if self.step in self.snapshot_steps:
                self.save_snapshot()
            if at_ckpt:
                self.save_checkpoint()
            if budget is not None and self.step < cfg["steps"]:
                spent = (time.monotonic() - start) / 60
                per_step = spent / (self.step - start_step)
                if spent + 2 * per_step + 0.5 > budget:  # leave time to write the checkpoint
                    self.save_checkpoint()
                    raise TimeBudgetReached(
                        f"time budget of {budget} min nearly spent at step {self.step}/{cfg['steps']}; "
                        f"checkpoint saved to {self.checkpoint_path}; rerun to resume"
                    )
        self.write_outputs()

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
