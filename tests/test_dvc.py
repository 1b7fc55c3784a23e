"""`dvc repro` for real, in a temporary git repository, on a tiny random model; and a DVC remote on moto's S3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
STAGES = ("calibrate", "mask", "recover", "evaluate", "report", "register")


def _tiny_params(store: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["name"] = "tiny-llama"
    params["data"]["calibration"].update(nsamples=4, seqlen=64)
    params["data"]["evaluation"].update(seqlen=64, max_windows=2)
    params["recover"].update(steps=2, seqlen=64)
    params["evaluate"]["perplexity"] = [{"name": "wiki-eval", "source": "embedded:wiki-eval", "seqlen": 64,
                                         "max_windows": 2}]
    params["register"]["store"] = str(store)
    return params


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}  # `dvc init` would otherwise leave an analytics report file in /tmp
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(_tiny_params(tmp_path / "store"), sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["git", "config", "user.email", "ci@example.com"], repo)
    _run(["git", "config", "user.name", "ci"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo)
    return repo


def _dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], repo, check=check)


def test_dvc_repro_runs_the_chain_and_is_then_a_no_op(dvc_repo):
    _dvc(dvc_repo, "repro")
    metrics = json.loads((dvc_repo / "out" / "metrics.json").read_text())
    assert 0.45 < metrics["sparsity"] < 0.55
    registered = json.loads((dvc_repo / "out" / "registered.json").read_text())
    assert registered["version"] == 1
    status = _dvc(dvc_repo, "status")
    assert "up to date" in status.stdout.lower(), status.stdout
    again = _dvc(dvc_repo, "repro")
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout, again.stdout

    _run(["git", "add", "-A"], dvc_repo)
    _run(["git", "commit", "-qm", "baseline"], dvc_repo)
    _dvc(dvc_repo, "exp", "run", "-S", "prune.sparsity=0.6")
    metrics = json.loads((dvc_repo / "out" / "metrics.json").read_text())
    assert 0.55 < metrics["sparsity"] < 0.65


def test_invalid_params_fail_the_first_stage_and_write_nothing(dvc_repo):
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    params["prune"]["sparsity"] = 1.5
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params))
    result = _dvc(dvc_repo, "repro", check=False)
    assert result.returncode != 0
    assert "prune.sparsity: must be in [0, 1), got 1.5" in result.stderr + result.stdout
    assert "calibrate" in result.stderr + result.stdout
    assert not (dvc_repo / "out").exists() or not any((dvc_repo / "out").iterdir())


def test_dvc_remote_on_s3_push_and_pull(dvc_repo, moto_endpoint, s3_bucket):
    _dvc(dvc_repo, "repro", "mask")
    _dvc(dvc_repo, "remote", "add", "-d", "storage", f"s3://{s3_bucket}/dvc")
    _dvc(dvc_repo, "remote", "modify", "storage", "endpointurl", moto_endpoint)
    _dvc(dvc_repo, "push")
    pruned = dvc_repo / "out" / "pruned"
    weights = sorted(pruned.glob("*.safetensors"))
    original = {path.name: path.read_bytes() for path in weights}
    shutil.rmtree(dvc_repo / "out")
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    _dvc(dvc_repo, "pull", "mask")
    assert {path.name: path.read_bytes() for path in sorted(pruned.glob("*.safetensors"))} == original
