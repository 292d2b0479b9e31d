"""A test-only command for tests/test_worker.py, run as a fresh process or through the worker.

    python tests/worker_probe.py ACTION [ARGS...]

Its ``__main__`` block does what ``diffbias/__main__.py`` does (``worker.delegate`` first, then the command
in-process), with this module's ``main`` as the entry point instead of ``diffbias.cli.main``.
"""

import json
import os
import signal
import sys
import time


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _state() -> dict:
    import logging
    import random
    import tempfile

    import numpy as np
    import torch

    from diffbias.device import _loaded_openblas_controls, limit_cpu_threads

    def blas():
        return [int(get()) for get, _ in _loaded_openblas_controls()]

    with limit_cpu_threads(2):
        limited = {"torch": torch.get_num_threads(), "blas": blas()}
    return {
        "torch_threads": torch.get_num_threads(),
        "blas_threads": blas(),
        "limited": limited,
        "after_limit": {"torch": torch.get_num_threads(), "blas": blas()},
        "torch_seed": torch.initial_seed(),
        "torch_draw": torch.rand(1).item(),
        "numpy_draw": float(np.random.random()),
        "random_draw": random.random(),
        "cwd": os.getcwd(),
        "argv": sys.argv[1:],
        "probe_env": os.environ.get("PROBE_VALUE"),
        "tempdir": tempfile.gettempdir(),
        "umask": _umask(),
        "root_handlers": len(logging.root.handlers),
        "root_level": logging.root.level,
        "sigint": str(signal.getsignal(signal.SIGINT)),
        "sigterm": str(signal.getsignal(signal.SIGTERM)),
        "sigpipe": str(signal.getsignal(signal.SIGPIPE)),
        "stdout": [sys.stdout.encoding, sys.stdout.errors, sys.stdout.line_buffering],
        "stderr": [sys.stderr.encoding, sys.stderr.errors, sys.stderr.line_buffering],
        "affinity": sorted(os.sched_getaffinity(0)),
        "grad": torch.is_grad_enabled(),
        "dtype": str(torch.get_default_dtype()),
        "cuda_initialized": torch.cuda.is_initialized(),
    }


def main(argv):
    action, args = argv[0], argv[1:]
    if action == "ok":
        print("to stdout", *args)
        print("to stderr", file=sys.stderr)
    elif action == "raise":
        print("before the error")
        raise RuntimeError("boom " + " ".join(args))
    elif action == "sysexit-msg":
        raise SystemExit("a message from SystemExit")
    elif action == "exit":
        print("exiting", args[0])
        sys.exit(int(args[0]))
    elif action == "stdin":
        print(sys.stdin.read().upper(), end="")
    elif action == "state":
        print(json.dumps(_state()))
    elif action == "ppid":  # the worker's pid when run through it
        time.sleep(float(args[0]) if args else 0)
        print(os.getppid())
    elif action == "sleep":  # PIDFILE SECONDS: the job's pid, then a long sleep
        with open(args[0] + ".tmp", "w") as fh:
            fh.write(str(os.getpid()))
        os.rename(args[0] + ".tmp", args[0])
        time.sleep(float(args[1]))
        print("slept")
    elif action == "kill-self":
        os.kill(os.getpid(), int(args[0]))
    else:
        raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    from diffbias import worker

    worker.delegate(sys.argv[1:], entry="worker_probe:main")
    main(sys.argv[1:])
