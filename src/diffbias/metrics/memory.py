"""Peak memory of a piece of work, on whatever device runs it.

CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``), reset at the start, so the number
belongs to the measured work alone. CPU: the process's peak resident set size (``ru_maxrss``); Linux cannot
reset it, so on the CPU it is the peak of the whole process up to now (an upper bound for the work), and the
``memory_kind`` column says which of the two a number is.
"""

from __future__ import annotations

import resource
import sys

import torch

CUDA_KIND = "cuda_max_allocated"
CPU_KIND = "process_max_rss"


def reset_peak_memory(device: str | torch.device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: str | torch.device) -> tuple[float, str]:
    """(peak MiB, kind) since the last :func:`reset_peak_memory` (CUDA) or since the process started (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, CUDA_KIND
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), CPU_KIND
