"""Where the harness runs: the device to use and how many CPU threads torch and BLAS may take.

One module for both, so that every command resolves ``--device auto`` the same way and every thread limit
(the CLI's ``--threads``, the FID step's ``cpu_threads``, the benchmark) goes through the same calls.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

__all__ = ["resolve_device", "set_threads", "limit_cpu_threads"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): CUDA when available, else the CPU; anything else as ``torch.device`` reads it.

    Returns a ``torch.device``; where a string is wanted (a report, a settings record) use ``str()`` of it:
    "cpu", "cuda", "cuda:1".
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_threads(n: int | None) -> None:
    """Use ``n`` torch intra-op threads from now on; None or 0 leaves torch's default."""
    if n:
        torch.set_num_threads(int(n))


_OPENBLAS_GET_SET = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


def _loaded_openblas_controls() -> list[tuple[Any, Any]]:
    """(get, set) thread-count functions of every OpenBLAS already loaded in this
    process (numpy and scipy each bundle one).  Linux only; [] elsewhere."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1]}
    except OSError:
        return []
    out = []
    for path in sorted(paths):
        if not os.path.isfile(path):
            continue
        try:
            lib = ctypes.CDLL(path)  # already loaded: just a new handle
        except OSError:
            continue
        for get_name, set_name in _OPENBLAS_GET_SET:
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                out.append((get, set_))
                break
    return out


@contextlib.contextmanager
def limit_cpu_threads(n: int | None):
    """Temporarily use ``n`` CPU threads for torch (intra-op) and for numpy/scipy's
    OpenBLAS; ``None`` changes nothing.

    On small shared CPU boxes this matters a lot: with other jobs running, 2 spinning
    OpenBLAS threads made torch-fidelity's FID step (``numpy.linalg.eigvals`` of a
    2048x2048 matrix) take 30-45 s instead of 4-6 s with 1 thread, and Inception ran
    about 2x faster with 1 torch thread.
    """
    if n is None:
        yield
        return
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    import numpy  # noqa: F401  (make sure numpy's OpenBLAS is loaded)

    prev_torch = torch.get_num_threads()
    saved = []
    for get, set_ in _loaded_openblas_controls():
        saved.append((set_, int(get())))
        set_(n)
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev_torch)
        for set_, old in saved:
            set_(old)
