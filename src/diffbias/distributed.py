"""One training on several processes (GPUs of one node) with PyTorch's own ``torch.distributed``.

The launcher is ``torchrun --standalone --nproc_per_node=N`` (the train rule's command when
``training.gpus_per_run`` > 1, :func:`train_launcher`); it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` for every process. A job started by SLURM with several tasks (``srun``:
``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``) works too, on one node; torchrun's variables win when
both are present (inside a Snakemake SLURM job the executor runs the rule as one task and torchrun forks the
ranks). Nothing here reimplements communication: :func:`init` calls ``init_process_group`` (NCCL on CUDA, gloo on
the CPU) and the trainer wraps its model in ``DistributedDataParallel``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("diffbias.distributed")

__all__ = ["Rank", "from_environment", "init", "gpus_per_run", "train_launcher", "train_gpus", "local_batch_size"]


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment(environ=None) -> Rank | None:
    """This process's place in a multi-process launch, or None when it runs alone (world size 1)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun (or any env:// launcher)
        world, rank, local = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"]))
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # a task of an srun step with several tasks
        # the step's task count, not SLURM_NTASKS: a batch script of a --ntasks=4 job is one process, not rank 0 of 4
        world, rank, local = int(env["SLURM_STEP_NUM_TASKS"]), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
    else:
        return None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world} processes")
    return Rank(rank, world, local)


def init(rank: Rank, device: torch.device) -> torch.device:
    """Join the process group and return this rank's device (``cuda:LOCAL_RANK`` on CUDA).

    Under srun without torchrun, ``MASTER_ADDR`` defaults to 127.0.0.1 on a one-node job and ``MASTER_PORT``
    to a port derived from the job id (``SLURM_JOB_ID``), the same in every task."""
    if device.type == "cuda":
        if rank.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"rank {rank.rank} needs GPU {rank.local_rank} but this job sees {torch.cuda.device_count()}: "
                f"training.gpus_per_run asks for more GPUs than the job was given (SLURM: the rule's "
                f"resources.gpu; the profile's `resources: gpu=` budget caps it, docs/latents-and-multi-gpu.md)")
        device = torch.device("cuda", rank.local_rank)
        torch.cuda.set_device(device)
    if "MASTER_ADDR" not in os.environ:
        if int(os.environ.get("SLURM_NNODES", "1")) > 1:
            raise RuntimeError("a multi-node launch needs MASTER_ADDR and MASTER_PORT (use torchrun); "
                               "training.gpus_per_run runs on one node")
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, rank=rank.rank, world_size=rank.world_size,
                                             device_id=device if device.type == "cuda" else None)
    log.info("rank %d of %d (local %d) on %s, backend %s", rank.rank, rank.world_size, rank.local_rank, device, backend)
    return device


def gpus_per_run(spec: dict) -> int:
    """``training.gpus_per_run`` of a run spec (absent: 1)."""
    n = int(spec.get("training", {}).get("gpus_per_run", 1))
    if n < 1:
        raise ValueError(f"training.gpus_per_run must be >= 1, got {n}")
    return n


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Each rank's share of the global batch, which stays the configured ``training.batch_size``."""
    if global_batch % world_size:
        raise ValueError(f"training.batch_size={global_batch} is not divisible by the {world_size} processes "
                         f"(training.gpus_per_run): every rank takes an equal share of the global batch")
    return global_batch // world_size


def train_launcher(spec: dict) -> str:
    """The command that starts ``diffbias`` for a training: torchrun with one process per GPU when
    ``training.gpus_per_run`` > 1 (``--standalone``: a local rendezvous on a free port, one node), else python."""
    n = gpus_per_run(spec)
    if n == 1:
        return "python -m diffbias"
    return f"torchrun --standalone --nproc_per_node={n} -m diffbias"


def train_gpus(spec: dict, configured: int) -> int:
    """GPUs the train job requests: ``gpus_per_run`` when the config gives training GPUs at all
    (``resources.train.gpu`` > 0), else ``configured`` (0 on a CPU study, whose ranks then run on gloo)."""
    return max(int(configured), gpus_per_run(spec)) if configured else int(configured)
