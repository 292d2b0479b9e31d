"""A long-lived worker that forks one child per ``python -m diffbias`` command (a "fork server").

Every Snakemake job runs ``python -m diffbias <command> ...`` and would pay a fresh interpreter plus the
heavy imports (torch, pandas, pyarrow, torch-fidelity, matplotlib: seconds per job, for jobs that often compute
for less than that). With ``DIFFBIAS_WORKER=on`` the command is instead run by a worker process that imported
all of that once and forks a child per command; the child runs ``diffbias.cli.main(argv)`` exactly as a fresh
process would, in the client's working directory and environment, writing straight into the client's
stdin/stdout/stderr (the file descriptors are passed over a Unix socket), and the client exits with the child's
exit status. ``docs/worker.md`` describes it for users.

Client (``delegate``, called first by ``diffbias/__main__.py``): stays light (no torch/numpy/pandas import).
It computes the worker's identity (everything that must match between the client and the interpreter that runs
the job: executable, interpreter flags, sys.path, a fingerprint of the diffbias sources, host, cgroup, SLURM
job, uid, the environment variables read at import time), connects to that worker's socket or starts the worker
(``fcntl.flock`` guards start-up), sends the request with ``socket.send_fds`` and waits for the exit status.
SIGTERM/SIGINT/SIGHUP are forwarded to the job; if the client dies, the worker kills the job's process group.
Any failure before the job started prints one line and returns, and the command runs in-process as before.

Worker (``python -m diffbias.worker SPEC``): limits BLAS/OpenMP pools to one thread before importing anything
heavy, preloads the libraries and every diffbias module, does no tensor compute and never initialises CUDA, then
serves requests from a single-threaded ``selectors`` loop: per request it forks, the parent records the child,
reaps it (SIGCHLD through the wakeup fd) and sends its status. It exits after ``DIFFBIAS_WORKER_IDLE`` seconds
(default 60) without jobs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import sys
import time

__all__ = ["delegate", "run", "WorkerUnavailable", "worker_paths", "identity", "source_fingerprint", "shutdown"]

ENV_SWITCH = "DIFFBIAS_WORKER"                    # on / 1: run commands in a worker
ENV_DIR = "DIFFBIAS_WORKER_DIR"                   # where sockets, locks and logs live (default below)
ENV_IDLE = "DIFFBIAS_WORKER_IDLE"                 # seconds without jobs before the worker exits (60)
ENV_START_TIMEOUT = "DIFFBIAS_WORKER_START_TIMEOUT"  # how long a client waits for a worker to answer (60 s)
ENV_KILL_GRACE = "DIFFBIAS_WORKER_KILL_GRACE"     # SIGTERM -> SIGKILL delay for an orphaned job (5 s)
ENV_PRELOAD = "DIFFBIAS_WORKER_PRELOAD"           # 0: import nothing ahead (tests, debugging); part of the identity
# Worker settings that do not change what a job computes (so they are not part of the identity).
_NOT_IDENTITY = {ENV_SWITCH, ENV_DIR, ENV_IDLE, ENV_START_TIMEOUT, ENV_KILL_GRACE}

PROTOCOL = 1
MAGIC = b"DBW1"
DEFAULT_ENTRY = "diffbias.cli:main"
MAX_SOCKET_PATH = 100  # bytes; a Unix socket path must fit sun_path (108 on Linux, 104 on BSDs)
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Thread-pool sizes a fresh process would read from its environment (Snakemake sets all of them per job).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
# Environment variables read when a library is imported or the interpreter starts: they must match between the
# worker (which imported everything) and the client. Thread counts are not here: the child sets them itself.
IDENTITY_ENV_PREFIXES = ("PYTHON", "LC_", "LANG", "DIFFBIAS_", "TORCH", "PYTORCH", "CUDA", "NVIDIA", "MPL", "OMP_",
                         "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "JE_", "ARROW_", "LD_", "XDG_CONFIG_HOME",
                         "XDG_CACHE_HOME", "HOME")
# A SLURM job (and step) never shares a worker with another, even where the cgroup does not tell them apart
# (proctrack/linuxproc); the executor plugin keeps SLURM_JOB_ID in the job step's environment.
IDENTITY_SLURM = ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_ARRAY_JOB_ID",
                  "SLURM_ARRAY_TASK_ID")


class WorkerUnavailable(RuntimeError):
    """No worker could run the command; the caller runs it in-process."""


class _NotStarted(Exception):
    """The connection closed before the worker started the job (e.g. it was exiting): safe to retry."""


def _switched_on(env=None) -> bool:
    return (env if env is not None else os.environ).get(ENV_SWITCH, "").strip().lower() in ("on", "1", "yes", "true")


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


# ==================================================================================================== identity


def source_fingerprint(pkg_dir: str) -> list:
    """(relative path, size, mtime_ns) of every file of the package (not __pycache__): an edit under src/ gives
    another worker, so a worker never runs stale code."""
    out = []
    for root, dirs, files in os.walk(pkg_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".pyc", ".pyo")):
                continue
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.append([os.path.relpath(path, pkg_dir), st.st_size, st.st_mtime_ns])
    return out


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _interpreter_flags() -> list[str]:
    import subprocess

    return subprocess._args_from_interpreter_flags()


def identity(env=None) -> dict:
    """Everything that must match between this client and the worker that would run its command."""
    import resource

    env = os.environ if env is None else env
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    path_stat = []
    for p in sys.path:  # installing or removing a package changes its site-packages directory's mtime
        mtime = None
        if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages"):
            try:
                mtime = os.stat(p).st_mtime_ns
            except OSError:
                pass
        path_stat.append([p, mtime])
    limits = {}
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            try:
                limits[name] = resource.getrlimit(getattr(resource, name))
            except (ValueError, OSError):
                pass
    try:
        st = os.stat(sys.executable)  # the interpreter behind a venv's link: an upgrade in place changes it
        exe = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
    except OSError:
        exe = None
    namespaces = {}
    for ns in ("mnt", "pid", "net", "user", "ipc"):  # a container or a SLURM job's private /tmp: another worker
        try:
            namespaces[ns] = os.readlink(f"/proc/self/ns/{ns}")
        except OSError:
            pass
    return {
        "protocol": PROTOCOL,
        "executable": sys.executable,
        "executable_stat": exe,
        "namespaces": namespaces,
        "version": sys.version,
        "flags": _interpreter_flags(),
        "sys_path": path_stat,
        "package": pkg_dir,
        "source": source_fingerprint(pkg_dir),
        "host": socket.gethostname(),
        "cgroup": _read("/proc/self/cgroup"),
        "uid": os.getuid(),
        "rlimits": limits,
        "env": {k: v for k, v in sorted(env.items())
                if (k.startswith(IDENTITY_ENV_PREFIXES) or k in IDENTITY_SLURM)
                and k not in _NOT_IDENTITY and k not in THREAD_ENV},
    }


def _identity_key(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def socket_dir(env=None) -> str:
    """The private directory of this user's workers: $DIFFBIAS_WORKER_DIR, else $XDG_RUNTIME_DIR/diffbias-worker,
    else /tmp/diffbias-worker-<uid>. Created with mode 0700; refused unless owned by this user and private."""
    env = os.environ if env is None else env
    d = env.get(ENV_DIR)
    if not d:
        xdg = env.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
            d = os.path.join(xdg, "diffbias-worker")
        else:
            d = f"/tmp/diffbias-worker-{os.getuid()}"
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        st = os.lstat(d)
    except OSError as exc:
        raise WorkerUnavailable(f"cannot use socket directory {d}: {exc}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise WorkerUnavailable(f"socket directory {d} must be a directory owned by uid {os.getuid()} "
                                f"with mode 0700 (found mode {stat.S_IMODE(st.st_mode):o}, owner {st.st_uid})")
    return d


class _Paths:
    def __init__(self, directory: str, key: str):
        self.dir, self.key = directory, key
        base = os.path.join(directory, key)
        self.sock, self.lock, self.life, self.log = base + ".sock", base + ".lock", base + ".life", base + ".log"

    def __repr__(self) -> str:
        return f"_Paths({self.sock!r})"


def worker_paths(env=None) -> _Paths:
    """Socket, start lock, life lock and log of the worker this process would use."""
    paths = _Paths(socket_dir(env), _identity_key(identity(env)))
    if len(os.fsencode(paths.sock)) > MAX_SOCKET_PATH:
        raise WorkerUnavailable(f"socket path {paths.sock} is longer than {MAX_SOCKET_PATH} bytes "
                                f"(set {ENV_DIR} to a shorter directory)")
    return paths


# ==================================================================================================== client


def delegate(argv: list[str], entry: str = DEFAULT_ENTRY) -> None:
    """Run ``entry(argv)`` in a worker and exit with its status when $DIFFBIAS_WORKER is on; otherwise, or when
    no worker can take the command, return (one line on stderr says why) and let the caller run it in-process."""
    if not _switched_on():
        return
    try:
        code = run(argv, entry)
    except WorkerUnavailable as exc:
        print(f"diffbias: worker unavailable, running in-process: {exc}", file=sys.stderr, flush=True)
        return
    sys.exit(code)


def run(argv: list[str], entry: str = DEFAULT_ENTRY) -> int:
    """Run ``entry(argv)`` in this identity's worker (started when needed); the job's exit status.
    Raises WorkerUnavailable when the job could not be started (it then has not run)."""
    paths = worker_paths()
    request = _request(argv, entry)
    last = None
    for _ in range(3):
        sock = _obtain(paths)
        try:
            return _submit(sock, request, paths)
        except _NotStarted as exc:
            last = exc
        finally:
            sock.close()
    raise WorkerUnavailable(f"the worker did not take the job: {last}")


def _request(argv, entry) -> dict:
    umask = os.umask(0)
    os.umask(umask)
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "protocol": PROTOCOL,
        "entry": entry,
        "argv": list(argv),
        "argv0": sys.argv[0] if sys.argv else "",
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "sys_path": list(sys.path),
        "umask": umask,
        "affinity": affinity,
        "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
    }


def _try_connect(path: str):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, socket.timeout):
        s.close()
        return None
    except OSError as exc:
        s.close()
        raise WorkerUnavailable(f"cannot connect to {path}: {exc}") from None
    s.settimeout(None)
    return s


def _life_held(path: str) -> bool:
    """True while a worker holds this identity's life lock (it is starting, or serving the socket)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if we took it
    return False


def _obtain(paths: _Paths) -> socket.socket:
    """A connection to the worker, starting one first when none answers (one client at a time starts it)."""
    sock = _try_connect(paths.sock)
    if sock is not None:
        return sock
    timeout = _float_env(ENV_START_TIMEOUT, 60.0)
    deadline = time.monotonic() + timeout
    try:
        lock_fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise WorkerUnavailable(f"cannot open {paths.lock}: {exc}") from None
    try:
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WorkerUnavailable(f"timed out after {timeout:g} s waiting for {paths.lock}") from None
                time.sleep(0.05)
        proc = None
        while True:
            sock = _try_connect(paths.sock)
            if sock is not None:
                return sock
            if proc is not None and proc.poll() is not None:
                raise WorkerUnavailable(f"the worker exited with status {proc.returncode} while starting "
                                        f"(log: {paths.log})")
            if proc is None and not _life_held(paths.life):
                refused = _read(paths.sock + ".refused")
                if refused:  # a worker of this identity found it could not serve safely: do not start another
                    raise WorkerUnavailable(f"{refused} (see {paths.log})")
                with _suppress_missing():
                    os.unlink(paths.sock)  # stale: its worker is gone
                proc = _spawn(paths)
            if time.monotonic() > deadline:
                raise WorkerUnavailable(f"no worker answered within {timeout:g} s (log: {paths.log})")
            time.sleep(0.05)
    finally:
        os.close(lock_fd)


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        return typ is not None and issubclass(typ, FileNotFoundError)


def _spawn(paths: _Paths):
    import subprocess

    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    spec = {"socket": paths.sock, "life": paths.life, "key": paths.key, "package": pkg_dir,
            "sys_path": list(sys.path), "idle": _float_env(ENV_IDLE, 60.0),
            "grace": _float_env(ENV_KILL_GRACE, 5.0)}
    env = dict(os.environ)
    src = os.path.dirname(pkg_dir)  # so that `-m diffbias.worker` finds this very package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        if os.path.exists(paths.log) and os.path.getsize(paths.log) > 1 << 20:
            os.truncate(paths.log, 0)
        log = open(paths.log, "ab")
    except OSError as exc:
        raise WorkerUnavailable(f"cannot open {paths.log}: {exc}") from None
    try:
        return subprocess.Popen([sys.executable, *_interpreter_flags(), "-m", "diffbias.worker", json.dumps(spec)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        raise WorkerUnavailable(f"cannot start a worker: {exc}") from None
    finally:
        log.close()


class _Lines:
    """Newline-delimited JSON messages from a socket; None at end of stream."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def next(self):
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(4096)
            except (ConnectionResetError, socket.timeout):
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def _send_msg(sock, msg: dict) -> None:
    sock.sendall(json.dumps(msg).encode() + b"\n")


def _submit(sock, request: dict, paths: _Paths) -> int:
    fds, opened = [], []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:  # a closed standard stream: the job gets /dev/null there
            fds.append(os.open(os.devnull, os.O_RDWR))
            opened.append(fds[-1])
    payload = json.dumps(request).encode()
    header = MAGIC + struct.pack("!I", len(payload))
    try:
        socket.send_fds(sock, [header], fds)
        sock.sendall(payload)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise _NotStarted(exc) from None
    except OSError as exc:
        raise WorkerUnavailable(f"cannot send the request: {exc}") from None
    finally:
        for fd in opened:
            os.close(fd)
    reader = _Lines(sock)
    try:
        msg = reader.next()
    except (OSError, ValueError) as exc:
        raise WorkerUnavailable(f"bad answer from the worker: {exc}") from None
    if msg is None:
        raise _NotStarted("the worker closed the connection")
    if "error" in msg or "pid" not in msg:
        raise WorkerUnavailable(f"the worker refused the job: {msg.get('error', msg)}")
    pid = msg["pid"]

    def forward(signum, frame):  # to the job's process group, through the worker
        try:
            _send_msg(sock, {"signal": int(signum)})
        except OSError:
            pass

    previous = {}
    for sig in FORWARDED_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, forward)
        except (ValueError, OSError):  # not the main thread
            pass
    try:
        try:
            msg = reader.next()
            while msg is not None and "exit" not in msg:
                msg = reader.next()
        except (OSError, ValueError):
            msg = None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if msg is None:
        print(f"diffbias: lost the worker while it ran job {pid} (log: {paths.log})", file=sys.stderr, flush=True)
        return 1
    return int(msg["exit"])


def shutdown(paths: _Paths | None = None, timeout: float = 10.0) -> bool:
    """Ask a worker to stop (its running jobs are terminated); True when one was running. For tests and tools."""
    paths = paths or worker_paths()
    sock = _try_connect(paths.sock)
    if sock is None:
        return False
    with sock:
        payload = json.dumps({"protocol": PROTOCOL, "shutdown": True}).encode()
        sock.sendall(MAGIC + struct.pack("!I", len(payload)) + payload)
        sock.settimeout(timeout)
        answer = _Lines(sock).next() or {}
    deadline = time.monotonic() + timeout
    while _pid_alive(answer.get("pid")) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def _pid_alive(pid) -> bool:
    """The process exists and is not a zombie (Linux /proc; elsewhere: it exists)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(int(pid), 0)
            return True
        except ProcessLookupError:
            return False


# ==================================================================================================== worker

# Preloaded by the worker before it serves: what the commands import (the diffbias modules are found by walking
# the package). Imported defensively: a module that fails is skipped and logged.
PRELOAD = (
    "torch", "numpy", "numpy.random", "pandas", "pyarrow", "pyarrow.parquet", "yaml", "jsonschema", "PIL.Image",
    "scipy.linalg", "tqdm.auto", "torch_fidelity", "torch_fidelity.utils", "torch_fidelity.defaults",
    "torch_fidelity.metric_fid", "torch_fidelity.metric_kid", "torch_fidelity.metric_prc",
    "torch_fidelity.feature_extractor_inceptionv3", "fvcore.nn", "matplotlib", "matplotlib.pyplot",
    "matplotlib.backends.backend_agg", "matplotlib.backends.backend_pdf", "matplotlib.patches", "matplotlib.colors",
)
_TORCH_DEFAULT_SEED = 67280421310721  # torch's fixed default seed in versions that have one


def _log(msg: str) -> None:
    try:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} [diffbias worker {os.getpid()}] {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # a full or vanished log must not stop the worker
        pass


def _env_threads(env, *names):
    for name in names:
        try:
            n = int(env.get(name, "") or 0)
        except ValueError:
            n = 0
        if n > 0:
            return n
    return None


def _physical_cores() -> int:
    """torch's default intra-op thread count without OMP/MKL_NUM_THREADS: physical cores (cpuinfo's count, which
    ignores affinity), else logical processors."""
    cores, cpus = set(), 0
    base = "/sys/devices/system/cpu"
    try:
        names = [n for n in os.listdir(base) if n.startswith("cpu") and n[3:].isdigit()]
    except OSError:
        names = []
    for name in names:
        topo = os.path.join(base, name, "topology")
        core = _read(os.path.join(topo, "core_id")).strip()
        package = _read(os.path.join(topo, "physical_package_id")).strip()
        if core:
            cpus += 1
            cores.add((package, core))
    if not cpus:
        return os.cpu_count() or 1
    return len(cores) if 0 < len(cores) < cpus else cpus


class _State:
    """What the children need from the parent's start-up."""
    worker_pid = 0
    torch_state = None      # torch's RNG state right after import, when torch seeds deterministically
    torch_default_threads = None
    cuda_queried = False    # the CUDA runtime was asked for devices while preloading
    cuda_restore = None


def _preload(enabled: bool) -> None:
    import importlib

    t_all = time.perf_counter()
    if not enabled:
        _log("preloading nothing (DIFFBIAS_WORKER_PRELOAD=0)")
        return
    for name in PRELOAD:
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a missing optional module is skipped
            _log(f"preload {name}: skipped ({type(exc).__name__}: {exc})")
            continue
        if name == "torch":
            if mod.initial_seed() == _TORCH_DEFAULT_SEED:
                _State.torch_state = mod.get_rng_state()
            _watch_cuda_runtime(mod)
        if name == "matplotlib":
            mod.use("Agg")  # what diffbias.report selects; never a GUI backend in the worker
        _log(f"preload {name}: {time.perf_counter() - t0:.2f} s")
    import pkgutil

    import diffbias

    for info in pkgutil.walk_packages(diffbias.__path__, "diffbias."):
        if info.name in ("diffbias.__main__", "diffbias.worker"):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # noqa: BLE001
            _log(f"preload {info.name}: skipped ({type(exc).__name__}: {exc})")
    _warm_up()
    _log(f"preloaded in {time.perf_counter() - t_all:.2f} s")


def _warm_up() -> None:
    """Build, once before forking, what many jobs would each build on first use: the config schema with every
    measurement's settings (~0.06 s per measurement job) and torch's forward-AD decompositions (TorchScript,
    ~0.13 s per Jacobian job). Neither touches a tensor library's thread pools or CUDA."""
    for what, warm in (("config schema", _warm_schema), ("forward-AD decompositions", _warm_forward_ad)):
        t0 = time.perf_counter()
        try:
            warm()
        except Exception as exc:  # noqa: BLE001 - a job builds it itself then
            _log(f"warm-up {what}: skipped ({type(exc).__name__}: {exc})")
            continue
        _log(f"warm-up {what}: {time.perf_counter() - t0:.2f} s")


def _warm_schema() -> None:
    from diffbias.config import load_schema

    load_schema()


def _warm_forward_ad() -> None:
    from torch.autograd import forward_ad

    forward_ad._maybe_load_decompositions()


def _watch_cuda_runtime(torch) -> None:
    """Record any query of the CUDA runtime while preloading: cudaGetDeviceCount initialises the driver in this
    process (torch.cuda.is_initialized() stays False), and a child forked after that cannot use CUDA."""
    original = getattr(torch._C, "_cuda_getDeviceCount", None)
    if original is None:
        return

    def watched(*args, **kwargs):
        _State.cuda_queried = True
        return original(*args, **kwargs)

    torch._C._cuda_getDeviceCount = watched
    _State.cuda_restore = lambda: setattr(torch._C, "_cuda_getDeviceCount", original)


def _refuse(spec: dict, why: str, code: int) -> int:
    """Give up serving this identity, and say why to later clients (they run in-process at once)."""
    _log(why)
    try:
        with open(spec["socket"] + ".refused", "w") as fh:
            fh.write(why)
    except OSError:
        pass
    return code


def _check_parent_state(spec: dict) -> int:
    if _State.cuda_restore is not None:
        _State.cuda_restore()
    torch = sys.modules.get("torch")
    if torch is not None and (torch.cuda.is_initialized() or _State.cuda_queried):
        return _refuse(spec, "CUDA was initialised or queried while preloading: refusing to fork from the worker", 3)
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        tasks = []
    if len(tasks) > 1:
        names = sorted(_read(f"/proc/self/task/{t}/comm").strip() for t in tasks)
        _log(f"warning: {len(tasks)} threads before forking: {names}")
    return 0


class _Conn:
    def __init__(self, sock, peer_pid):
        self.sock, self.peer_pid = sock, peer_pid
        self.pid = None          # the job's pid (= its process group)
        self.buf = b""
        self.t0 = time.monotonic()
        self.argv = []

    def send(self, msg: dict) -> bool:
        try:
            _send_msg(self.sock, msg)
            return True
        except OSError:
            return False


class _Server:
    def __init__(self, spec: dict):
        import selectors

        self.spec = spec
        self.idle = float(spec.get("idle", 60.0))
        self.grace = float(spec.get("grace", 5.0))
        self.sel = selectors.DefaultSelector()
        self.listener = None
        self.life_fd = None
        self.conns: dict[int, _Conn] = {}   # by socket fd
        self.jobs: dict[int, _Conn] = {}    # by pid
        self.kill_at: dict[int, float] = {} # pid -> when to SIGKILL its group
        self.last_activity = time.monotonic()
        self.stopping = False
        self.serving = False  # owns the socket path
        self.wake_r = self.wake_w = -1

    # ------------------------------------------------------------------ start-up and shutdown
    def take_life_lock(self) -> bool:
        self.life_fd = os.open(self.spec["life"], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.life_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.life_fd)
            self.life_fd = None
            return False
        return True

    def bind(self) -> None:
        import selectors

        path = self.spec["socket"]
        with _suppress_missing():
            os.unlink(path)  # we hold the life lock: a socket file left here is stale
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o600)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda s, f: None)  # wakes select through the wakeup fd
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self._on_stop_signal)
        self.serving = True

    def _on_stop_signal(self, signum, frame):
        self.stopping = True  # only a flag: this handler may run in a child right after fork

    def release_socket(self) -> None:
        """Stop being this identity's worker: new clients start another one; connections already queued on
        the listener are still served."""
        if self.serving:
            with _suppress_missing():
                os.unlink(self.spec["socket"])
            self.serving = False
        if self.life_fd is not None:
            os.close(self.life_fd)
            self.life_fd = None

    # ------------------------------------------------------------------ main loop
    def loop(self) -> None:
        draining_since = None
        while True:
            now = time.monotonic()
            if self.stopping and self.serving:
                _log("stopping: terminating running jobs")
                self.release_socket()
                for pid in self.jobs:
                    self._signal_job(pid, signal.SIGTERM)
                    self.kill_at.setdefault(pid, now + self.grace)
            if self.serving and not self.jobs and now - self.last_activity >= self.idle:
                _log(f"idle for {self.idle:g} s: exiting")
                self.release_socket()
            if not self.serving and not self.jobs:
                if draining_since is None:
                    draining_since = now
                elif now - draining_since > 0.2:
                    break  # no job left and nothing queued on the listener
            else:
                draining_since = None
            deadlines = [self.last_activity + self.idle] if self.serving and not self.jobs else []
            deadlines += list(self.kill_at.values())
            timeout = min([1.0] + [max(0.0, d - now) for d in deadlines])
            if not self.serving and not self.jobs:
                timeout = 0.05
            for key, _ in self.sel.select(timeout):
                try:
                    if key.data == "listen":
                        self._accept_all()
                    elif key.data == "wake":
                        try:
                            while os.read(self.wake_r, 512):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        self._readable(key.data)
                except Exception as exc:  # noqa: BLE001 - one bad connection must not end the running jobs
                    _log(f"error serving a connection: {type(exc).__name__}: {exc}")
            self._reap()
            now = time.monotonic()
            for pid, when in list(self.kill_at.items()):
                if now >= when:
                    self._signal_job(pid, signal.SIGKILL)
                    del self.kill_at[pid]
        _log("exited")

    def _accept_all(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self._handle(sock)

    def _handle(self, sock) -> None:
        import selectors

        fds = []
        try:
            sock.setblocking(True)
            sock.settimeout(10)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            peer_pid, peer_uid, _ = struct.unpack("3i", creds)
            if peer_uid != os.getuid():
                raise ValueError(f"client uid {peer_uid} is not this worker's uid {os.getuid()}")
            header, fds, _, _ = socket.recv_fds(sock, 8, 3)
            while len(header) < 8:
                more = sock.recv(8 - len(header))
                if not more:
                    raise ValueError("truncated request header")
                header += more
            if header[:4] != MAGIC:
                raise ValueError("not a diffbias worker request")
            (size,) = struct.unpack("!I", header[4:])
            payload = b""
            while len(payload) < size:
                more = sock.recv(min(1 << 20, size - len(payload)))
                if not more:
                    raise ValueError("truncated request")
                payload += more
            request = json.loads(payload)
            if self.stopping:  # closed unanswered: the client retries with a new worker
                for fd in fds:
                    os.close(fd)
                sock.close()
                return
            if request.get("protocol") != PROTOCOL:
                raise ValueError(f"protocol {request.get('protocol')} != {PROTOCOL}")
            if request.get("shutdown"):
                _log(f"shutdown requested by pid {peer_pid}")
                self.stopping = True
                _send_msg(sock, {"ok": True, "pid": os.getpid()})
                sock.close()
                return
            if len(fds) != 3:
                raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
        except Exception as exc:  # noqa: BLE001 - a bad request must not take the worker down
            _log(f"bad request: {type(exc).__name__}: {exc}")
            try:
                _send_msg(sock, {"error": f"{type(exc).__name__}: {exc}"})
            except OSError:
                pass
            for fd in fds:
                os.close(fd)
            sock.close()
            return
        conn = _Conn(sock, peer_pid)
        conn.argv = request["argv"]
        self._fork(conn, request, fds)
        if conn.pid is None:
            sock.close()
            return
        if sock.fileno() < 0:  # the client went away at once: its job is being terminated
            return
        sock.setblocking(False)
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)

    def _fork(self, conn: _Conn, request: dict, fds: list[int]) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        blocked = (signal.SIGCHLD, *FORWARDED_SIGNALS)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        t_fork = time.perf_counter()
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            _log(f"fork failed: {exc}")
            conn.send({"error": f"fork failed: {exc}"})
            for fd in fds:
                os.close(fd)
            return
        if pid == 0:  # ---------------------------------------------------------------- child
            code = 70
            try:
                self._close_in_child(conn)
                code = _child(request, fds)
            except BaseException:  # noqa: BLE001 - never return into the server loop
                try:
                    import traceback

                    traceback.print_exc()
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        # ---------------------------------------------------------------------------------- parent
        fork_ms = 1000 * (time.perf_counter() - t_fork)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        try:
            os.setpgid(pid, pid)  # also done by the child: whichever runs first
        except OSError:
            pass
        for fd in fds:
            os.close(fd)
        conn.pid = pid
        conn.t0 = time.monotonic()
        self.jobs[pid] = conn
        self.last_activity = time.monotonic()
        _log(f"job {pid} for client {conn.peer_pid}: {' '.join(request['argv'][:1])} (fork {fork_ms:.0f} ms)")
        if not conn.send({"pid": pid}):
            self._client_gone(conn)

    def _close_in_child(self, conn: _Conn) -> None:
        signal.set_wakeup_fd(-1)
        for c in list(self.conns.values()) + [conn]:
            c.sock.close()
        if self.listener is not None:
            self.listener.close()
        self.sel.close()
        for fd in (self.wake_r, self.wake_w, self.life_fd):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._client_gone(conn)
            return
        conn.buf += data
        while b"\n" in conn.buf:
            line, conn.buf = conn.buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
                sig = int(msg["signal"])
            except (ValueError, KeyError, TypeError):
                continue
            if conn.pid is not None and conn.pid in self.jobs:
                self._signal_job(conn.pid, sig)

    def _drop(self, conn: _Conn) -> None:
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self.conns.pop(conn.sock.fileno(), None)
        conn.sock.close()

    def _client_gone(self, conn: _Conn) -> None:
        """The client died or was killed: so does its job (SIGTERM, then SIGKILL after the grace period)."""
        self._drop(conn)
        if conn.pid is not None and conn.pid in self.jobs:
            _log(f"client of job {conn.pid} disconnected: terminating the job")
            self._signal_job(conn.pid, signal.SIGTERM)
            self.kill_at[conn.pid] = time.monotonic() + self.grace

    def _signal_job(self, pid: int, sig: int) -> None:
        if pid not in self.jobs:  # reaped: its pid (and process group id) may be reused
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except OSError as exc:
            _log(f"signal {sig} to job {pid}: {exc}")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.jobs.pop(pid, None)
            self.kill_at.pop(pid, None)
            self.last_activity = time.monotonic()
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code  # a signal death: 128 + signum, as a shell reports it
            _log(f"job {pid} exited {code} after {time.monotonic() - conn.t0:.2f} s")
            if conn.sock.fileno() >= 0:
                conn.send({"exit": code})
                self._drop(conn)


def _set_pdeathsig(sig: int) -> None:
    """Linux: the child gets `sig` when the worker dies, so a job never outlives its worker unnoticed."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _std_stream(fd: int, template, write: bool):
    """A standard stream on `fd` built the way the interpreter builds it at start-up (create_stdio)."""
    import io

    unbuffered = bool(getattr(template, "write_through", False))
    line = not unbuffered and (fd == 2 or os.isatty(fd))
    raw = io.FileIO(fd, "wb" if write else "rb", closefd=False)
    raw.name = ("<stdin>", "<stdout>", "<stderr>")[fd]
    if unbuffered and write:
        buf = raw
    else:
        buf = io.BufferedWriter(raw) if write else io.BufferedReader(raw)
    encoding = getattr(template, "encoding", None) or "utf-8"
    errors = getattr(template, "errors", None) or ("backslashreplace" if fd == 2 else "strict")
    return io.TextIOWrapper(buf, encoding=encoding, errors=errors, newline="\n", line_buffering=line,
                            write_through=unbuffered)


def _fresh_process_state(env) -> None:
    """Make the already-imported libraries look as they would in a fresh process with this environment."""
    import random
    import tempfile

    random.seed()  # a fresh process seeds from the OS; children of one parent must not share a stream
    tempfile.tempdir = None  # recomputed from this environment's TMPDIR
    torch = sys.modules.get("torch")
    if torch is not None:
        if _State.torch_state is not None:
            torch.set_rng_state(_State.torch_state)  # torch's fixed default seed
        else:
            torch.random.default_generator.seed()  # torch seeds each process non-deterministically
        torch.set_num_threads(_env_threads(env, "MKL_NUM_THREADS", "OMP_NUM_THREADS") or _State.torch_default_threads
                              or _physical_cores())
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()  # the legacy global state, seeded from the OS as at import
    if "numpy" in sys.modules:
        try:
            from diffbias.device import _loaded_openblas_controls

            n = _env_threads(env, "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")
            procs = min(os.cpu_count() or 1, len(os.sched_getaffinity(0)))
            n = min(n, procs) if n else procs
            for _, set_ in _loaded_openblas_controls():
                set_(n)
        except Exception:  # noqa: BLE001
            pass
    import logging

    logging.root.handlers.clear()  # a fresh process starts with an unconfigured root logger
    logging.root.setLevel(logging.WARNING)


def _child(request: dict, fds: list[int]) -> int:
    """Become the job: the client's process group, signals, streams, directory, environment; then run it."""
    import atexit

    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != _State.worker_pid:
        return 137  # the worker died right after forking
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN if request.get("sigint_ignored") else signal.default_int_handler)
    for target, fd in enumerate(fds):
        if fd != target:
            os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    templates = (sys.__stdin__, sys.__stdout__, sys.__stderr__)
    sys.stdin = sys.__stdin__ = _std_stream(0, templates[0], False)
    sys.stdout = sys.__stdout__ = _std_stream(1, templates[1], True)
    sys.stderr = sys.__stderr__ = _std_stream(2, templates[2], True)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())  # a pending SIGTERM now kills the job
    atexit._clear()  # the parent's exit handlers act on the parent's resources; the job registers its own
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.umask(int(request["umask"]))
    if request.get("affinity") and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, request["affinity"])
        except OSError:
            pass
    sys.argv = [request.get("argv0", ""), *request["argv"]]
    sys.path[:] = request["sys_path"]
    import importlib

    importlib.invalidate_caches()  # directory listings cached by the parent's imports
    _fresh_process_state(request["env"])
    code = _run_entry(request.get("entry", DEFAULT_ENTRY), request["argv"])
    return _finish(code)


def _exit_code(exc: SystemExit) -> int:
    """The exit status of an uncaught SystemExit, as the interpreter computes it (handle_system_exit)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except Exception:  # noqa: BLE001
        pass
    return 1


def _run_entry(entry: str, argv: list[str]) -> int:
    import importlib

    module, _, func = entry.partition(":")
    try:
        getattr(importlib.import_module(module), func)(argv)
        return 0
    except SystemExit as exc:
        return _exit_code(exc)
    except BaseException as exc:  # noqa: BLE001 - reported as an uncaught exception would be
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # the traceback starts where a fresh process's would reach the entry point
        try:
            sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        except Exception:  # noqa: BLE001
            pass
        if isinstance(exc, KeyboardInterrupt):  # the interpreter re-raises SIGINT to die of it
            _finish(130)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return 130
        return 1


def _finish(code: int) -> int:
    """What the interpreter does at exit: join non-daemon threads, run exit handlers, flush the streams."""
    try:
        import threading

        threading._shutdown()
    except Exception:  # noqa: BLE001
        pass
    try:
        import atexit

        atexit._run_exitfuncs()
    except Exception:  # noqa: BLE001
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception as exc:  # noqa: BLE001 - as at interpreter exit: reported, status 120
            try:
                sys.stderr.write(f"Exception ignored in: {stream!r}\n{type(exc).__name__}: {exc}\n")
            except Exception:  # noqa: BLE001
                pass
            if code == 0:
                code = 120
    return code


def serve(spec: dict) -> int:
    """The worker process: preload, then serve until idle."""
    # Before anything heavy is imported: BLAS/OpenMP pools are created at library load and are not fork-safe.
    # The children set the thread counts their own environment asks for (_fresh_process_state).
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"
    os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")  # pyarrow's jemalloc thread
    # torch.cuda.is_available() during an import asks NVML, not the CUDA runtime (which would initialise the
    # driver here and leave the children unable to use CUDA). The children read their own environment.
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    _State.worker_pid = os.getpid()
    server = _Server(spec)
    if not server.take_life_lock():
        _log("another worker holds this identity: exiting")
        return 0
    sys.path[:] = spec["sys_path"]
    import diffbias

    here = os.path.dirname(os.path.abspath(diffbias.__file__))
    if here != spec["package"]:
        return _refuse(spec, f"the worker imports diffbias from {here}, the client uses {spec['package']}", 2)
    _log(f"starting for {spec['socket']} ({sys.executable})")
    _preload(os.environ.get(ENV_PRELOAD, "1").strip().lower() not in ("0", "off", "no", "false"))
    refused = _check_parent_state(spec)
    if refused:
        return refused
    _State.torch_default_threads = _physical_cores()
    import gc

    gc.collect()
    gc.freeze()  # preloaded objects stay out of the children's collections (fewer copied pages)
    try:
        os.chdir("/")
    except OSError:
        pass
    server.bind()
    _log(f"ready (idle timeout {server.idle:g} s)")
    try:
        server.loop()
    finally:
        server.release_socket()
    return 0


def _main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m diffbias.worker SPEC_JSON (started by diffbias itself; see docs/worker.md)",
              file=sys.stderr)
        return 2
    return serve(json.loads(argv[0]))


if __name__ == "__main__":
    # Run the code of the importable module (one module object, whose __file__ the children's tracebacks skip).
    from diffbias import worker as _worker

    sys.exit(_worker._main(sys.argv[1:]))
