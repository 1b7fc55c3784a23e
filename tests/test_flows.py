"""The Prefect flows, run for real under `prefect_test_harness` on a tiny random model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def tiny_sections(store: Path, **changes: object) -> dict:
    """params.yaml sections for a run that takes seconds: tiny-llama, small windows, two recovery steps."""
    sections = {
        "model": {"name": "tiny-llama"},
        "data": {"calibration": {"source": "embedded:wiki-calib", "nsamples": 4, "seqlen": 64},
                 "evaluation": {"source": "embedded:wiki-eval", "seqlen": 64, "max_windows": 2}},
        "prune": {"method": "wanda", "sparsity": 0.5},
        "recover": {"method": "norm", "steps": 2, "batch_size": 2, "seqlen": 64},
        "evaluate": {"perplexity": [{"name": "wiki-eval", "source": "embedded:wiki-eval", "seqlen": 64,
                                     "max_windows": 2}]},
        "register": {"store": str(store), "name": "tiny-perp"},
    }
    for dotted, value in changes.items():
        node = sections
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return sections


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    storage = tmp_path_factory.mktemp("prefect-results")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(storage)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield storage


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def _completed_run_ids(task_name: str) -> set:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterState, \
        TaskRunFilterStateName

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_=f"{task_name}-"), state=TaskRunFilterState(
                name=TaskRunFilterStateName(any_=["Completed"]))))
    return {run.id for run in runs}


def _new_completed_runs(task_name: str, before: set) -> set:
    return _completed_run_ids(task_name) - before


def _versions(store: Path) -> list:
    from perp.registry import list_models

    return list_models(str(store)) if store.exists() else []  # only registering creates a store


def test_compress_runs_end_to_end_then_hits_the_cache(harness, tmp_path):
    from flows.compress import compress

    store, workdir = tmp_path / "store", str(tmp_path / "runs")
    state = compress(**tiny_sections(store), workdir=workdir, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert result["registered"]["version"] == 1
    assert result["registered"]["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    assert Path(result["metrics"]["uri"]).is_file()
    first = _task_states(state.state_details.flow_run_id)
    assert set(first) == {"calibrate", "mask", "recover", "evaluate", "register"}
    assert set(first.values()) == {"Completed"}

    again = compress(**tiny_sections(store), workdir=workdir, return_state=True)
    states = _task_states(again.state_details.flow_run_id)
    assert {states[s] for s in ("calibrate", "mask", "recover", "evaluate")} == {"Cached"}
    assert states["register"] == "Completed"  # the store is asked again: the same version, nothing written
    assert again.result()["registered"]["version"] == 1 and again.result()["registered"]["reused"] is True

    # One changed parameter recomputes only what is downstream of it.
    changed = compress(**tiny_sections(store, **{"prune.sparsity": 0.6}), workdir=workdir, return_state=True)
    states = _task_states(changed.state_details.flow_run_id)
    assert states["calibrate"] == "Cached"
    assert {states[s] for s in ("mask", "recover", "evaluate", "register")} == {"Completed"}


def test_re_running_identical_params_registers_no_duplicate_version(harness, tmp_path):
    """`perp run` (run_pipeline) and the flow's register task (never cached) call register_stage again: the
    version that already holds this model, metrics and lineage comes back."""
    from flows.compress import compress
    from perp.pipeline import config_from_sections, run_pipeline
    from perp.registry import history

    store, workdir = tmp_path / "store", str(tmp_path / "runs")
    state = compress(**tiny_sections(store), workdir=workdir, return_state=True)
    assert state.is_completed(), state
    registered = state.result()["registered"]
    assert registered["version"] == 1 and registered["reused"] is False
    for _ in range(2):
        again = run_pipeline(config_from_sections(**tiny_sections(store)), workdir)["registered"]
        assert again["reused"] is True and again["version"] == 1
        assert again["manifest_sha256"] == registered["manifest_sha256"]
    assert [event["type"] for event in history(str(store), "tiny-perp")] == ["register"]
    assert _versions(store)[0]["versions"] == 1


def test_re_run_after_deregistration_or_a_wiped_store_registers_again(harness, tmp_path):
    import shutil

    from flows.compress import compress
    from perp.registry import deregister, history

    store, workdir = tmp_path / "store", str(tmp_path / "runs")
    assert compress(**tiny_sections(store), workdir=workdir)["registered"]["version"] == 1
    deregister(str(store), "tiny-perp", 1, reason="bad numbers")
    again = compress(**tiny_sections(store), workdir=workdir)["registered"]
    assert again["version"] == 2 and again["reused"] is False
    assert [e["type"] for e in history(str(store), "tiny-perp")] == ["register", "deregister", "register"]
    shutil.rmtree(store)
    fresh = compress(**tiny_sections(store), workdir=workdir)["registered"]
    assert fresh["version"] == 1 and _versions(store)[0]["versions"] == 1


def test_wiped_workdir_recomputes_instead_of_returning_dangling_refs(harness, tmp_path):
    import shutil

    from flows.compress import compress
    from perp.io.hashing import sha256_file

    store, workdir = tmp_path / "store", tmp_path / "runs"
    first = compress(**tiny_sections(store), workdir=str(workdir), return_state=True)
    assert first.is_completed(), first
    first_weights = sha256_file(Path(first.result()["recovered"]["uri"]) / "model.safetensors")
    shutil.rmtree(workdir)

    again = compress(**tiny_sections(store), workdir=str(workdir), return_state=True)
    assert again.is_completed(), again
    assert set(_task_states(again.state_details.flow_run_id).values()) == {"Completed"}
    refs = again.result()
    for stage in ("calibration", "pruned", "recovered", "metrics"):
        assert Path(refs[stage]["uri"]).exists(), stage
    weights = lambda ref: sha256_file(Path(ref["uri"]) / "model.safetensors")  # noqa: E731
    assert weights(refs["recovered"]) == first_weights  # recomputed, and deterministic on CPU


def test_failing_stage_leaves_no_registered_version(harness, tmp_path):
    from flows.compress import compress

    store = tmp_path / "store"
    sections = tiny_sections(store, **{"evaluate.zeroshot": {"tasks": ["no_such_task"]}})
    state = compress(**sections, workdir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed()
    assert _versions(store) == []


def test_invalid_params_fail_before_any_task(harness, tmp_path):
    from flows.compress import compress
    from perp.errors import ConfigError

    with pytest.raises(ConfigError, match="prune.sparsity: must be in"):
        compress(**tiny_sections(tmp_path / "store", **{"prune.sparsity": 1.5}), workdir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_killed_run_resumes_from_last_completed_stage(harness, tmp_path):
    params = tmp_path / "params.yaml"
    sections = tiny_sections(tmp_path / "store", **{"recover.steps": 300})
    params.write_text(yaml.safe_dump(sections))
    workdir = tmp_path / "runs"
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(harness),
           "PREFECT_API_URL": str(get_current_settings().api.url)}
    before = _completed_run_ids("mask")
    log = tmp_path / "flow.log"
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, str(REPO / "flows" / "compress.py"), "--params", str(params),
                                    "--workdir", str(workdir)], env=env, cwd=tmp_path,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # Kill once Prefect has recorded the mask task as completed (its result is persisted by then), while
            # the recover task is running.
            deadline = time.time() + 600
            while time.time() < deadline and not _new_completed_runs("mask", before):
                assert process.poll() is None, f"the flow ended before it could be interrupted:\n{log.read_text()}"
                time.sleep(0.2)
            assert _new_completed_runs("mask", before), f"mask never completed:\n{log.read_text()}"
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert not list(workdir.glob("recover-*/.perp-complete")), log.read_text()

    from flows.compress import compress

    # The same params again: the completed stages come from the cache, the interrupted one runs from scratch.
    state = compress(**sections, workdir=str(workdir), return_state=True)
    assert state.is_completed()
    states = _task_states(state.state_details.flow_run_id)
    assert states["calibrate"] == "Cached" and states["mask"] == "Cached"
    assert states["recover"] == "Completed"
    assert not list(workdir.glob(".*partial*")), "the killed stage's staging directory must not be reused"
    assert len(list(workdir.glob("recover-*/.perp-complete"))) == 1


_FLOW_TERMINATED_WHILE_SAVING = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import perp.prune.run as run

real = run.save_masks

def save_then_terminate(*args, **kwargs):  # SIGTERM arrives with the mask output half-written in its staging
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)

run.save_masks = save_then_terminate
from flows.compress import main
main(["--params", {params!r}, "--workdir", {workdir!r}])
"""


def test_sigterm_mid_save_crashes_the_run_and_leaves_no_staging(harness, tmp_path):
    """Cancellation and eviction send SIGTERM: Prefect turns it into an exception, so the stage's staging is
    removed on the way out and the run is recorded as crashed."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_sections(tmp_path / "store")))
    workdir = tmp_path / "runs"
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(harness),
           "PREFECT_API_URL": str(get_current_settings().api.url)}
    script = _FLOW_TERMINATED_WHILE_SAVING.format(repo=str(REPO), params=str(params), workdir=str(workdir))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == -signal.SIGTERM, result.stdout + result.stderr
    assert "Execution was aborted by a termination signal" in result.stdout + result.stderr
    assert list(workdir.glob("calibrate-*/.perp-complete"))  # the stage before completed
    assert not list(workdir.glob("mask-*")) and not list(workdir.glob(".*partial*"))  # no output, no staging
    assert _versions(tmp_path / "store") == []


def _perp_error(kind: str):
    from perp.io.s3 import S3Error, S3Unreachable
    from perp.store import StoreIntegrityError, StoreUnreachable

    return {"store unreachable": StoreUnreachable("endpoint down"), "s3 unreachable": S3Unreachable("timeout"),
            "corrupt blob": StoreIntegrityError("blob is corrupt"), "missing object": S3Error("NoSuchKey")}[kind]


@pytest.mark.parametrize("error, attempts", [
    (ConnectionResetError(104, "Connection reset by peer"), 3),  # transient: retried
    (OSError(28, "No space left on device"), 1),  # a full disk fails the same way again: not retried
    (PermissionError(13, "Permission denied"), 1),
    ("store unreachable", 3),
    ("s3 unreachable", 3),
    ("corrupt blob", 1),  # retrying reads the same bytes
    ("missing object", 1),
])
def test_stage_retries_only_transient_io_errors(harness, error, attempts):
    from prefect import flow, task

    from tasks.stages import is_store_error

    calls = []
    error = _perp_error(error) if isinstance(error, str) else error

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=is_store_error)
    def stage() -> None:
        calls.append(1)
        raise error

    @flow
    def chain() -> None:
        stage()

    with pytest.raises(type(error)):
        chain()
    assert len(calls) == attempts


def test_sweep_shares_calibration_and_registers_the_best_point(harness, tmp_path):
    from flows.sweep import sweep
    from perp.registry import show

    store = tmp_path / "store"
    base = tiny_sections(store, **{"register.gates": {"prod": {"max_ppl_ratio": 1000.0, "max_zeroshot_drop": None}}})
    state = sweep(methods=["wanda", "magnitude"], sparsities=[0.5], recover_methods=["norm"], base=base,
                  workdir=str(tmp_path / "runs"), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert len(result["rows"]) == 2 and all(row["passes_gates"] for row in result["rows"])
    best = min(result["rows"], key=lambda row: row["ppl_ratio"])
    assert result["best"]["point"] == best["point"]
    assert result["registered"]["version"] == 1 and result["registered"]["reused"] is False
    registered = show(str(store), "tiny-perp", 1)
    assert registered["params"]["prune"]["method"] == best["method"]
    assert registered["metrics"]["gates"]["ppl_ratio"] == pytest.approx(best["ppl_ratio"])
    states = _task_states(state.state_details.flow_run_id)
    assert sum(name == "calibrate" for name in states) == 1  # one calibration for the whole grid

    strict = tiny_sections(store, **{"register.gates": {"prod": {"max_ppl_ratio": None, "max_zeroshot_drop": None,
                                                                 "min_sparsity": 0.9}}})
    none = sweep(methods=["wanda"], sparsities=[0.5], recover_methods=["norm"], base=strict,
                 workdir=str(tmp_path / "runs"), gate_stage="prod")
    assert none["best"] is None and none["registered"] is None  # prod's gates pass no point
    assert none["rows"][0]["failed_gates"] == "sparsity"
    unfiltered = sweep(methods=["wanda"], sparsities=[0.5], recover_methods=["norm"], base=strict,
                       workdir=str(tmp_path / "runs"))
    assert unfiltered["best"]["point"] == 0 and not unfiltered["rows"][0]["passes_gates"]  # shown, not filtered
