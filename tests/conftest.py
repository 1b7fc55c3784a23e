"""Shared fixtures. Tests never touch the network: the Hub is forced offline and S3 is a local moto server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

os.environ.setdefault("PERP_CACHE", str(REPO / ".cache" / "perp"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 API over HTTP: moto's threaded server on 127.0.0.1 with throwaway credentials."""
    from perp.store.testing import moto_s3

    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch):
    """A fresh bucket; AWS_ENDPOINT_URL points boto3 (and perp) at the moto server."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    name = f"perp-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models and tensors run fastest on one thread: on a shared 2-core CPU, thread start-up and OpenMP
    barriers cost more than they save. Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from perp.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory) -> Path:
    from perp.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-opt"), "opt")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `perp` entry point in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "perp", *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=900)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def model_loads(monkeypatch) -> list[str]:
    """Every model `perp.models.load_model` is asked for, in order (the real loader still runs)."""
    import perp.models

    calls: list[str] = []
    real = perp.models.load_model

    def counting(spec, *args, **kwargs):
        calls.append(str(spec))
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(perp.models, "load_model", counting)
    return calls


@pytest.fixture
def perp_in_process(monkeypatch, capsys, tmp_path):
    """`perp ARGS...` through the real entry point, in this process, from an empty directory (no params.yaml,
    no out/): returns (exit code, stdout, stderr with whitespace folded: rich wraps long lines)."""
    from perp.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["perp", *args])
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, " ".join(err.split())

    return run


@pytest.fixture
def full_disk(monkeypatch):
    """`full_disk(root, free)`: the file system holding `root` (and everything under it) has `free` bytes free as
    the tree is now, and less as files are written under it (more as they are removed); others report what the
    real one does. A real full disk is not something a test can make safely."""
    import shutil
    from collections import namedtuple

    import perp.io.atomic

    real, Usage = shutil.disk_usage, namedtuple("Usage", "total used free")
    full: dict[Path, tuple[int, int]] = {}  # root → (free when registered, bytes under it then)

    def used(root: Path) -> int:
        return sum(path.stat().st_size for path in root.rglob("*") if path.is_file() and not path.is_symlink())

    def usage(path):
        path = Path(path).absolute()
        for root, (free, then) in full.items():
            if path == root or root in path.parents:
                total = 1 << 40
                now = max(0, free - (used(root) - then))
                return Usage(total, total - now, now)
        return real(path)

    monkeypatch.setattr(perp.io.atomic.shutil, "disk_usage", usage)

    def make(root: Path, free: int = 1 << 20) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        full[root.absolute()] = (free, used(root.absolute()))
        return root

    return make
