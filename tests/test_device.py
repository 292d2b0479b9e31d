"""diffbias.device: one resolution of --device and one way to limit CPU threads."""

from __future__ import annotations

import pytest
import torch

from diffbias import benchmark, train
from diffbias.device import _loaded_openblas_controls, limit_cpu_threads, resolve_device, set_threads


def test_resolve_device_auto_and_explicit():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device(None) == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert str(resolve_device("cuda:1")) == "cuda:1"  # no CUDA needed to name a device
    with pytest.raises(RuntimeError):
        resolve_device("no-such-device")


def test_one_definition_shared_by_train_and_benchmark():
    # train.resolve_device stays importable for cli.py, but is the same function
    assert train.resolve_device is resolve_device
    assert benchmark.resolve_device is resolve_device


def test_set_threads_sets_and_none_keeps():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_limit_cpu_threads_restores():
    before = torch.get_num_threads()
    blas_before = [get() for get, _ in _loaded_openblas_controls()]
    with limit_cpu_threads(1):
        assert torch.get_num_threads() == 1
        assert all(get() == 1 for get, _ in _loaded_openblas_controls())
    assert torch.get_num_threads() == before
    assert [get() for get, _ in _loaded_openblas_controls()] == blas_before
    with pytest.raises(ValueError):
        with limit_cpu_threads(0):
            pass
