"""The fork-server worker (diffbias.worker): a command run through it behaves as in a fresh process.

Every test uses its own short socket directory (DIFFBIAS_WORKER_DIR) and stops every worker it started. Most
run tests/worker_probe.py (a test-only command with the same two-line entry point as `python -m diffbias`),
either through one preloaded worker shared by the module or through workers that preload nothing
(DIFFBIAS_WORKER_PRELOAD=0), which start in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from diffbias import worker

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "worker_probe.py"
SNAKEMAKE_THREADS = {name: "1" for name in worker.THREAD_ENV}  # what a Snakemake job with threads: 1 gets


def _env(wdir, on=True, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFBIAS_WORKER") and k not in worker.THREAD_ENV}
    env.update(PYTHONPATH=str(ROOT / "src"), DIFFBIAS_WORKER="on" if on else "off", DIFFBIAS_WORKER_DIR=str(wdir),
               DIFFBIAS_WORKER_IDLE="300")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _probe(*args, env, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 180)
    return subprocess.run([sys.executable, str(PROBE), *map(str, args)], env=env, capture_output=True, text=True, **kw)


def _worker_pids(wdir) -> set[int]:
    pids = set()
    for log in Path(wdir).glob("*.log"):
        pids |= {int(p) for p in re.findall(r"\[diffbias worker (\d+)\]", log.read_text(errors="replace"))}
    return pids


def _jobs_logged(wdir) -> int:
    logs = (log.read_text(errors="replace") for log in Path(wdir).glob("*.log"))
    return sum(len(re.findall(r"\bjob \d+ for client", text)) for text in logs)


def _is_worker(pid: int) -> bool:
    try:
        return b"diffbias.worker" in Path(f"/proc/{pid}/cmdline").read_bytes() and worker._pid_alive(pid)
    except OSError:
        return False


def _stop_workers(wdir) -> None:
    """Shut down every worker of this directory (an explicit request), then kill any that did not go."""
    for sock in Path(wdir).glob("*.sock"):
        try:
            worker.shutdown(worker._Paths(str(wdir), sock.name.removesuffix(".sock")), timeout=10)
        except (OSError, worker.WorkerUnavailable):
            pass
    for pid in _worker_pids(wdir):
        if _is_worker(pid):
            os.kill(pid, signal.SIGKILL)


def _wait_until(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture
def wdir():
    d = tempfile.mkdtemp(prefix="dbw-", dir="/tmp")  # short: a socket path must stay under ~100 bytes
    yield Path(d)
    _stop_workers(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def warm():
    """A socket directory whose (preloaded) worker the module's tests share; started by the first client."""
    d = tempfile.mkdtemp(prefix="dbw-", dir="/tmp")
    yield Path(d)
    _stop_workers(d)
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- client


def test_importing_the_client_does_not_import_torch_numpy_or_pandas(tmp_path):
    code = ("import sys, diffbias, diffbias.worker as w; w.identity(); w.worker_paths(); "
            "print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path / "w"), capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_worker_is_off_unless_switched_on(tmp_path):
    env = _env(tmp_path / "w", on=False)
    for value in ("", "off", "0"):
        env["DIFFBIAS_WORKER"] = value
        out = _probe("ppid", env=env)
        assert out.returncode == 0 and out.stderr == ""
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------------- same behaviour


@pytest.mark.parametrize("args", [("ok", "a", "b"), ("raise", "now"), ("sysexit-msg",), ("exit", "75"), ("exit", "0"),
                                  ("exit", "1"), ("exit", "300"), ("kill-self", "9")])
def test_output_and_exit_status_as_in_a_fresh_process(warm, args):
    jobs = _jobs_logged(warm)
    fresh = _probe(*args, env=_env(warm, on=False))
    via = _probe(*args, env=_env(warm))
    assert _jobs_logged(warm) == jobs + 1, via.stderr  # it did run in the worker
    expected = fresh.returncode if fresh.returncode >= 0 else 128 - fresh.returncode  # as a shell reports it
    assert via.returncode == expected
    assert via.stdout == fresh.stdout
    if args[0] == "raise":  # the same traceback, less the frames of the entry points
        assert via.stderr.splitlines()[0] == "Traceback (most recent call last):"
        assert via.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1] == "RuntimeError: boom now"
        assert "worker.py" not in via.stderr
    else:
        assert via.stderr == fresh.stderr


def test_the_job_reads_the_clients_stdin(warm):
    assert _probe("stdin", env=_env(warm), input="hello\nworld\n").stdout == "HELLO\nWORLD\n"


def test_a_job_starts_as_a_fresh_process_would(warm, tmp_path):
    """Thread counts (torch, OpenBLAS, device.limit_cpu_threads), RNG streams, environment, working directory,
    umask, TMPDIR, logging and signal set-up match a fresh process's with the same environment."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    affinity = {min(os.sched_getaffinity(0))}
    variants = [
        ({}, {}),
        ({**SNAKEMAKE_THREADS, "TMPDIR": tmp_path, "PROBE_VALUE": "x"},
         {"umask": 0o027, "preexec_fn": lambda: os.sched_setaffinity(0, affinity)}),
        ({"OMP_NUM_THREADS": 2, "OPENBLAS_NUM_THREADS": 1}, {}),
    ]
    fresh_runs, worker_runs = [], []
    for extra, kw in variants:
        states = []
        for on in (False, True):
            out = _probe("state", env=_env(warm, on=on, **extra), cwd=cwd, **kw)
            assert out.returncode == 0, out.stderr
            states.append(json.loads(out.stdout))
        fresh, via = states
        fresh_runs.append(fresh)
        worker_runs.append(via)
        for state in states:  # the worker may have more OpenBLAS copies loaded (scipy's): all set alike
            for d in (state, state["limited"], state["after_limit"]):
                d["blas"] = sorted(set(d.pop("blas", None) or d.pop("blas_threads")))
        random = ("torch_seed", "torch_draw", "numpy_draw", "random_draw")
        assert {k: v for k, v in via.items() if k not in random} == {k: v for k, v in fresh.items() if k not in random}
    assert worker_runs[1]["tempdir"] == str(tmp_path) and worker_runs[1]["torch_threads"] == 1
    assert worker_runs[2]["torch_threads"] == 2 and worker_runs[2]["blas"] == [1]
    # RNG: torch seeds every process from the OS (or, in older versions, with one fixed seed); jobs must not
    # share a stream inherited from the worker.
    seeds_differ = len({r["torch_seed"] for r in fresh_runs}) > 1
    assert (len({r["torch_seed"] for r in worker_runs}) > 1) == seeds_differ
    if not seeds_differ:
        assert {r["torch_draw"] for r in worker_runs} == {r["torch_draw"] for r in fresh_runs}
    for key in ("numpy_draw", "random_draw"):
        assert len({r[key] for r in worker_runs}) == len(worker_runs)


def test_the_worker_forks_from_a_single_threaded_parent_without_cuda(warm):
    out = _probe("ppid", env=_env(warm))
    pid = int(out.stdout)
    assert _is_worker(pid)
    assert len(os.listdir(f"/proc/{pid}/task")) == 1
    log = "".join(p.read_text() for p in warm.glob("*.log"))
    assert "threads before forking" not in log and "CUDA was initialised" not in log
    assert "preload torch:" in log and "preload diffbias" not in log  # nothing failed to preload


# ---------------------------------------------------------------------------------------------------- signals


def _start_sleeper(env, tmp_path):
    pidfile = tmp_path / "job.pid"
    client = subprocess.Popen([sys.executable, str(PROBE), "sleep", str(pidfile), "120"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_until(pidfile.exists, 60), "the job did not start"
    job = int(pidfile.read_text())
    assert worker._pid_alive(job) and job != client.pid
    return client, job


def test_killing_the_client_kills_the_job(warm, tmp_path):
    client, job = _start_sleeper(_env(warm), tmp_path)
    client.kill()  # SIGKILL: what Snakemake or SLURM do to a job's process group
    client.wait()
    assert _wait_until(lambda: not worker._pid_alive(job), 5), "the job outlived its client"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_client_is_forwarded_and_its_status_returned(warm, tmp_path, sig):
    client, job = _start_sleeper(_env(warm), tmp_path)
    client.send_signal(sig)
    assert client.wait(timeout=10) == 128 + sig  # SIGINT: KeyboardInterrupt, then death by SIGINT, as Python does
    assert _wait_until(lambda: not worker._pid_alive(job), 5)
    if sig == signal.SIGINT:
        assert client.stderr.read().rstrip().endswith("KeyboardInterrupt")


# ---------------------------------------------------------------------------------------------------- lifecycle


def test_a_source_edit_gives_a_new_worker(wdir, tmp_path):
    shutil.copytree(ROOT / "src" / "diffbias", tmp_path / "src" / "diffbias",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = _env(wdir, DIFFBIAS_WORKER_PRELOAD=0, PYTHONPATH=tmp_path / "src")
    first, again = (_probe("ppid", env=env) for _ in range(2))
    assert first.returncode == 0 and first.stdout == again.stdout and _is_worker(int(first.stdout))
    assert len(list(wdir.glob("*.sock"))) == 1
    data_py = tmp_path / "src" / "diffbias" / "data.py"
    data_py.write_text(data_py.read_text() + "\n# edited\n")
    edited = _probe("ppid", env=env)
    assert edited.returncode == 0 and edited.stdout != first.stdout and _is_worker(int(edited.stdout))
    assert len(list(wdir.glob("*.sock"))) == 2


def test_concurrent_clients_start_one_worker_and_both_complete(wdir):
    env = _env(wdir, DIFFBIAS_WORKER_PRELOAD=0)
    clients = [subprocess.Popen([sys.executable, str(PROBE), "ppid", "1"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [c.communicate(timeout=120) for c in clients]
    assert [c.returncode for c in clients] == [0, 0, 0], outs
    assert len({out for out, _ in outs}) == 1 and all(err == "" for _, err in outs)
    assert len(_worker_pids(wdir)) == 1 and len(list(wdir.glob("*.sock"))) == 1


def test_concurrent_jobs_in_a_warm_worker(warm):
    env = _env(warm)
    t0 = time.monotonic()
    clients = [subprocess.Popen([sys.executable, str(PROBE), "ppid", "2"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [c.communicate(timeout=120) for c in clients]
    assert [c.returncode for c in clients] == [0, 0] and outs[0] == outs[1]
    assert time.monotonic() - t0 < 3.9  # side by side, not one after the other (once warm)


def test_a_stale_socket_is_replaced(wdir):
    env = _env(wdir, DIFFBIAS_WORKER_PRELOAD=0)
    old = int(_probe("ppid", env=env).stdout)
    os.kill(old, signal.SIGKILL)
    assert _wait_until(lambda: not worker._pid_alive(old), 5)
    assert len(list(wdir.glob("*.sock"))) == 1  # left behind, nobody listening
    out = _probe("ppid", env=env)
    assert out.returncode == 0 and int(out.stdout) != old and out.stderr == ""


def test_an_idle_worker_exits_and_removes_its_socket(wdir):
    out = _probe("ppid", env=_env(wdir, DIFFBIAS_WORKER_PRELOAD=0, DIFFBIAS_WORKER_IDLE=1))
    pid = int(out.stdout)
    assert _wait_until(lambda: not _is_worker(pid), 15)
    assert not list(wdir.glob("*.sock"))


def test_a_worker_that_refused_its_identity_is_not_started_again(wdir):
    env = _env(wdir, DIFFBIAS_WORKER_PRELOAD=0)
    first = int(_probe("ppid", env=env).stdout)
    (sock,) = wdir.glob("*.sock")
    _stop_workers(wdir)
    assert _wait_until(lambda: not _is_worker(first), 10)
    Path(f"{sock}.refused").write_text("CUDA was initialised or queried while preloading")
    out = _probe("ok", env=env)
    assert out.returncode == 0 and out.stdout == "to stdout\n"
    assert out.stderr.splitlines()[0].startswith("diffbias: worker unavailable, running in-process: CUDA was")
    assert _worker_pids(wdir) == {first}


@pytest.mark.parametrize("problem", ["a file", "not private", "too long"])
def test_an_unusable_socket_directory_falls_back_to_in_process(tmp_path, problem):
    if problem == "a file":
        target = tmp_path / "file"
        target.write_text("")
    elif problem == "not private":
        target = tmp_path / "shared"
        target.mkdir(mode=0o755)
        target.chmod(0o755)
    else:
        target = tmp_path / ("d" * 60) / ("e" * 60)
    out = _probe("ok", "x", env=_env(target))
    assert out.returncode == 0 and out.stdout == "to stdout x\n"
    lines = out.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("diffbias: worker unavailable, running in-process: ")
    assert lines[1] == "to stderr"


def test_python_m_diffbias_runs_in_the_worker(wdir, tmp_path):
    """The real entry point, a real command: same output and status with and without the worker."""
    env_on, env_off = _env(wdir, DIFFBIAS_WORKER_PRELOAD=0), _env(wdir, on=False)
    micro = ROOT / "workflow" / "configs" / "micro.yaml"
    for args in (["validate", str(micro)], ["validate", str(tmp_path / "missing.yaml")]):
        fresh, via = (subprocess.run([sys.executable, "-m", "diffbias", *args], env=env, cwd=tmp_path,
                                     capture_output=True, text=True, timeout=180) for env in (env_off, env_on))
        assert (via.returncode, via.stdout) == (fresh.returncode, fresh.stdout)
        assert via.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]
    assert _jobs_logged(wdir) == 2


# ---------------------------------------------------------------------------------------------------- equivalence


@pytest.mark.slow
def test_train_and_measure_through_the_worker_give_identical_outputs(tiny_dataset, tmp_path, wdir):
    """train, psnr and fid as the rules run them, in fresh processes and through a preloaded worker: the
    same model weights, training log, PSNR table, FID table and samples, bit for bit."""
    import numpy as np
    import pandas as pd
    import torch

    spec = {
        "run": {"dataset": "tiny", "variant": "dit", "N": 20, "seed": 3},
        "dataset": {"source": "npz", "resolution": 16, "channels": 1, "test_size": 20},
        "model": {"backbone": "dit", "preset": "DiT-T/2",
                  "options": {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "attention": "3,G"}},
        "training": {"steps": 12, "batch_size": 4, "lr": 1e-3, "weight_decay": 0.0, "ema_decay": 0.999,
                     "ema_warmup": True, "hflip": True, "class_conditional": False, "label_dropout": 0.1,
                     "checkpoint_every": 4, "log_every": 2, "grad_clip": None},
    }
    fid = {"num_samples": 8, "steps": 3, "reference": "train", "max_reference": 8, "batch_size": 8}
    common = ["--device", "cpu", "--threads", "1"]
    for mode in ("off", "on"):
        d = tmp_path / mode
        run = d / "run"
        commands = [
            ["train", "--spec", json.dumps(spec), "--data", tiny_dataset, "--out-dir", run,
             "--checkpoint", d / "ck.pt"],
            ["psnr", "--model", run / "model.pt", "--data", tiny_dataset, "--out", d / "psnr.parquet",
             "--config", json.dumps({"num_images": 8, "respacing": 5})],
            ["fid", "--model", run / "model.pt", "--data", tiny_dataset, "--out", d / "fid.parquet",
             "--samples-out", d / "samples.npz", "--config", json.dumps(fid)],
        ]
        env = _env(wdir, on=mode == "on", **SNAKEMAKE_THREADS)
        for cmd in commands:
            out = subprocess.run([sys.executable, "-m", "diffbias", *map(str, cmd), *common], env=env, cwd=d.parent,
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr
            assert "worker unavailable" not in out.stderr
    assert _jobs_logged(wdir) == 3
    off, on = tmp_path / "off", tmp_path / "on"
    a, b = (torch.load(p / "run" / "model.pt", map_location="cpu", weights_only=False) for p in (off, on))
    ema_a, ema_b = (x.get("ema", x.get("model", x)) for x in (a, b))
    flat_a, flat_b = ({k: v for k, v in m.items() if torch.is_tensor(v)} for m in (ema_a, ema_b))
    assert flat_a.keys() == flat_b.keys() and flat_a
    assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)
    volatile = re.compile(r"(_s$|per_s|memory)")  # wall times, throughput, peak memory (compare_study_tables)
    for name in ("run/train_log.parquet", "psnr.parquet", "fid.parquet"):
        da, db = (pd.read_parquet(p / name) for p in (off, on))
        keep = [c for c in da.columns if not volatile.search(c)]
        pd.testing.assert_frame_equal(da[keep], db[keep], check_exact=True, obj=name)
    with np.load(off / "samples.npz") as sa, np.load(on / "samples.npz") as sb:
        assert sorted(sa.files) == sorted(sb.files)
        for key in sa.files:
            assert np.array_equal(sa[key], sb[key]), key
