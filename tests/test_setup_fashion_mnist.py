"""scripts/setup_fashion_mnist.sh for a user without root or sudo, run with a fake environment.

Fake ``id``, ``sudo`` and ``apt-get`` on PATH and a fake Python for torchvision's download: nothing is
installed or downloaded and the Debian package is never touched.
"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "setup_fashion_mnist.sh"
FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def _exe(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"

    def run(*, uid=1000, sudo_ok=False, download_ok=False, env_dir=None):
        _exe(bin_dir / "id", f'[ "$1" = "-u" ] && echo {uid} || /usr/bin/id "$@"')
        _exe(bin_dir / "sudo", f'echo "sudo $*" >> {calls}; [ "$1" = "-n" ] && [ "$2" = "true" ] && exit {0 if sudo_ok else 1}; exit 1')
        _exe(bin_dir / "apt-get", f'echo "apt-get $*" >> {calls}; exit 1')
        make = "".join(f'; : > "$2/{f}"' for f in FILES)
        _exe(bin_dir / "python", f'cat > /dev/null; echo "download $2" >> {calls}; '
             + (f'mkdir -p "$2"{make}; exit 0' if download_ok else "exit 1"))
        env = {k: v for k, v in os.environ.items() if k != "DIFFBIAS_FASHION_MNIST"}
        env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FMNIST_SYSTEM_DIR=str(tmp_path / "no-debian"),
                   FMNIST_CACHE_DIR=str(tmp_path / "cache"), FMNIST_PYTHON=str(bin_dir / "python"))
        if env_dir is not None:
            env["DIFFBIAS_FASHION_MNIST"] = str(env_dir)
        if calls.exists():
            calls.unlink()
        done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        return done, (calls.read_text() if calls.exists() else "")

    return tmp_path, run


def test_no_root_no_network_says_what_to_do(fake):
    tmp, run = fake
    done, calls = run()
    assert done.returncode == 0  # never fails the set-up
    last = done.stdout.strip().splitlines()[-1]
    assert "copy the four *-ubyte.gz files to" in last and "DIFFBIAS_FASHION_MNIST" in last
    assert "apt-get" not in calls and "download" in calls  # no root: no apt-get, the download was tried


def test_no_root_downloads_into_the_cache(fake):
    tmp, run = fake
    done, calls = run(download_ok=True)
    assert done.returncode == 0 and "downloaded by torchvision" in done.stdout
    assert sorted(p.name for p in (tmp / "cache").iterdir()) == sorted(FILES)
    again, calls = run()  # idempotent: the cache is found, nothing is fetched
    assert "using" in again.stdout and "download" not in calls


def test_environment_variable_is_used(fake):
    tmp, run = fake
    folder = tmp / "mine"
    folder.mkdir()
    (folder / FILES[0]).write_bytes(b"")
    done, calls = run(env_dir=folder)
    assert f"using DIFFBIAS_FASHION_MNIST={folder}" in done.stdout and calls == ""


def test_root_or_sudo_tries_apt_get_first(fake):
    tmp, run = fake
    done, calls = run(uid=0)
    assert "apt-get update" in calls and "download" in calls  # apt failed here, so the download was tried
    done, calls = run(sudo_ok=True)
    assert "sudo -n apt-get update" in calls
