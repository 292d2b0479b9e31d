"""Atomic outputs and provenance: nothing half-written is ever mistaken for a result."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io as _io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from .paths import REPO_ROOT  # not from .config: config -> data -> io must not lead back to config

_UMASK = os.umask(0)
os.umask(_UMASK)

PROVENANCE_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "snakemake", "torch-fidelity", "fvcore")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` only on success.

    The one atomic write of the project: the caller writes the temporary file (by name, or by opening it), then
    it is fsync'ed, given a normal file's mode (0666 less the umask, not mkstemp's 0600) and renamed onto
    ``path``; on any error it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data reach the disk before the rename makes them the result
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give results the permissions of a normal file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_torch(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class CorruptFileError(ValueError):
    """A checksummed file that is truncated, altered or unreadable."""


_CHECKSUM_TAG = b"\ndiffbias-sha256:"
_CHECKSUM_LEN = len(_CHECKSUM_TAG) + 64 + 1  # tag, hex digest, newline


def save_torch_checked(obj: Any, path: str | Path) -> None:
    """``torch.save`` with a SHA-256 trailer over the payload, written atomically and fsync'ed.

    For side files that are read back by the same code (training checkpoints): ``load_torch_checked``
    refuses a truncated or altered file instead of handing back garbage.
    """
    import torch

    buf = _io.BytesIO()
    torch.save(obj, buf)
    data = buf.getbuffer()
    digest = hashlib.sha256(data).hexdigest().encode()
    with atomic_path(path) as tmp:  # fsync'ed by atomic_path
        with open(tmp, "wb") as f:
            f.write(data)
            f.write(_CHECKSUM_TAG + digest + b"\n")


def load_torch_checked(path: str | Path, map_location=None) -> Any:
    """Load a file written by ``save_torch_checked``; raise CorruptFileError if it fails its checksum."""
    import torch

    data = Path(path).read_bytes()
    trailer = data[-_CHECKSUM_LEN:]
    if len(data) <= _CHECKSUM_LEN or not trailer.startswith(_CHECKSUM_TAG) or not trailer.endswith(b"\n"):
        # no trailer: truncated, or a plain torch.save file of an older version (loads only if complete)
        try:
            return torch.load(_io.BytesIO(data), map_location=map_location, weights_only=False)
        except Exception as exc:
            raise CorruptFileError(f"{path}: no checksum trailer and not loadable (truncated?): {exc}") from exc
    payload = memoryview(data)[: len(data) - _CHECKSUM_LEN]
    expected = trailer[len(_CHECKSUM_TAG):-1].decode("ascii", "replace")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise CorruptFileError(f"{path}: SHA-256 mismatch (file {actual[:12]}..., recorded {expected[:12]}...)")
    try:
        return torch.load(_io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as exc:  # checksum fine but unreadable (e.g. written by an incompatible torch)
        raise CorruptFileError(f"{path}: checksum matches but torch.load failed: {exc}") from exc


def write_npz(path: str | Path, **arrays) -> None:
    """Arrays as an ``.npz``, atomically. Stored, not deflated: attention maps and samples shrink by ~20 % at most,
    and deflating them cost seconds per job (most of an attention job and of its study pack in the rehearsals)."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: given a name, numpy would append ".npz" to it
            np.savez(fh, **arrays)


def write_parquet(df: pd.DataFrame, path: str | Path, metadata: dict | None = None) -> None:
    """Write a parquet file atomically, with ``metadata`` (e.g. provenance) as JSON in the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged[b"diffbias"] = json.dumps(metadata, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet_metadata(path: str | Path) -> dict:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"diffbias", b"{}"))


# ----------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions(names=PROVENANCE_PACKAGES) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def device_description(device: str | None = None) -> dict:
    import torch

    info = {"device": str(device or "cpu"), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    info["torch_threads"] = torch.get_num_threads()
    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
    return info


def provenance(config_hash: str | None = None, device: str | None = None) -> dict:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "config_hash": config_hash,
        "packages": package_versions(),
        "python": platform.python_version(),
        "host": platform.node(),
        "device": device_description(device),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
