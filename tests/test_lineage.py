"""`perp register` and `register_stage`: lineage is checked against the stage outputs' own reports, recorded as
far as it is known (never guessed), and re-registering the same model returns the existing version.

The stage outputs are real (calibrate, prune, recover on tiny-llama, built once per module); the metrics files
are written here, naming the measured model's content hash as `perp evaluate` does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from perp import pipeline
from perp.config import dump_params
from perp.models.loading import model_content_hash
from perp.pipeline import config_from_sections

SECTIONS = {
    "model": {"name": "tiny-llama"},
    "data": {"calibration": {"source": "embedded:wiki-calib", "nsamples": 4, "seqlen": 64},
             "evaluation": {"source": "embedded:wiki-eval", "seqlen": 64, "max_windows": 2}},
    "prune": {"method": "wanda", "sparsity": 0.5},
    "recover": {"method": "norm", "steps": 2, "batch_size": 2, "seqlen": 64},
}
GATES = {"ppl_ratio": 1.1, "zeroshot_drop_points": 0.1, "sparsity": 0.5}


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """calibration (seed 0) → pruned A (0.5) → recovered (from A) → recovered twice; pruned B (0.6, same
    calibration); another calibration set (seed 7) that nothing was pruned with."""
    work = tmp_path_factory.mktemp("stages")
    params = dump_params(config_from_sections(**SECTIONS))
    model, prune = params["model"], params["prune"]
    calibration = pipeline.calibrate_stage(model, params["data"]["calibration"], work)
    other = pipeline.calibrate_stage(model, {**params["data"]["calibration"], "seed": 7}, work)
    pruned_a = pipeline.mask_stage(model, prune, calibration, work)
    pruned_b = pipeline.mask_stage(model, {**prune, "sparsity": 0.6}, calibration, work)
    recovered = pipeline.recover_stage(params["recover"], pruned_a, model, params["data"], work, params)
    twice = pipeline.recover_stage({**params["recover"], "steps": 1}, recovered, model, params["data"], work, params)
    paths = {"calibration": calibration, "other_calibration": other, "pruned_a": pruned_a, "pruned_b": pruned_b,
             "recovered": recovered, "recovered_twice": twice}
    assert other["tokens_sha256"] != calibration["tokens_sha256"]
    return {key: Path(ref["uri"]) for key, ref in paths.items()}


def write_metrics(model_dir: Path, target: Path, **extra: object) -> Path:
    target.write_text(json.dumps({"model": {"sha256": model_content_hash(model_dir)}, "sparsity": 0.5,
                                  "target_sparsity": 0.5, "gates": GATES, **extra}))
    return target


@pytest.fixture
def cli(perp_in_process):
    """`perp ARGS...` in-process from an empty directory (no params.yaml, no out/): (exit code, stdout, stderr)."""
    return perp_in_process


def register(cli, store: Path, model_dir: Path, metrics: Path, *options: str) -> tuple[int, dict, str]:
    code, out, err = cli("register", "--model-dir", str(model_dir), "--metrics", str(metrics), *options,
                         "-S", f"register.store={store}", "-S", "register.name=tiny-perp", "--json")
    return code, (json.loads(out) if code == 0 else {}), err


def manifest(store: Path, version: int) -> dict:
    from perp.registry import show

    return show(str(store), "tiny-perp", version)


# --------------------------------------------------------------------------------------------- refusals


def test_a_pruned_dir_the_model_was_not_recovered_from_is_refused_before_any_write(cli, stages, tmp_path):
    store = tmp_path / "store"
    metrics = write_metrics(stages["recovered"], tmp_path / "metrics.json")
    code, _, err = register(cli, store, stages["recovered"], metrics, "--pruned", str(stages["pruned_b"]),
                            "--calibration", str(stages["calibration"]))
    assert code == 2
    assert f"'{stages['recovered']}' was not recovered from '{stages['pruned_b']}'" in err
    assert f"recover_report.json records the input '{stages['pruned_a']}'" in err
    assert "Traceback" not in err and not store.exists()


def test_a_calibration_set_the_model_was_not_pruned_with_is_refused(cli, stages, tmp_path):
    store = tmp_path / "store"
    metrics = write_metrics(stages["recovered"], tmp_path / "metrics.json")
    for pruned in (("--pruned", str(stages["pruned_a"])), ()):  # explicit, and found from recover_report.json
        code, _, err = register(cli, store, stages["recovered"], metrics, *pruned,
                                "--calibration", str(stages["other_calibration"]))
        assert code == 2
        assert (f"the calibration set '{stages['other_calibration']}'" in err
                and f"is not the one '{stages['pruned_a']}' was pruned with" in err), err
    assert not store.exists()


def test_an_altered_calibration_set_is_refused(cli, stages, tmp_path):
    altered = tmp_path / "calibration"
    shutil.copytree(stages["calibration"], altered)
    meta = json.loads((altered / "calibration.json").read_text())
    (altered / "calibration.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    metrics = write_metrics(stages["recovered"], tmp_path / "metrics.json")
    code, _, err = register(cli, tmp_path / "store", stages["recovered"], metrics, "--calibration", str(altered))
    assert code == 2 and "does not match its recorded sha256" in err and not (tmp_path / "store").exists()


def test_a_prune_output_registered_as_the_model_must_be_its_own_pruned_input(cli, stages, tmp_path):
    store = tmp_path / "store"
    metrics = write_metrics(stages["pruned_a"], tmp_path / "metrics.json")
    code, _, err = register(cli, store, stages["pruned_a"], metrics, "--pruned", str(stages["pruned_b"]))
    assert code == 2 and f"'{stages['pruned_a']}' is itself a prune output and '{stages['pruned_b']}'" in err
    assert not store.exists()

    code, result, err = register(cli, store, stages["pruned_a"], metrics, "--calibration", str(stages["calibration"]))
    assert code == 0, err
    lineage = manifest(store, result["version"])["lineage"]
    assert lineage["artifacts"]["pruned"]["uri"] == str(stages["pruned_a"].resolve())
    assert lineage["recover"] is None and lineage["training_data_sha256"] is None  # not recovered: nothing invented
    assert lineage["prune"]["sparsity"] == 0.5


def test_a_model_recovered_twice_descends_from_the_first_pruned_input(cli, stages, tmp_path):
    store = tmp_path / "store"
    metrics = write_metrics(stages["recovered_twice"], tmp_path / "metrics.json")
    code, _, err = register(cli, store, stages["recovered_twice"], metrics, "--pruned", str(stages["pruned_b"]))
    assert code == 2 and "was not recovered from" in err
    code, result, err = register(cli, store, stages["recovered_twice"], metrics)
    assert code == 0, err
    assert manifest(store, result["version"])["lineage"]["artifacts"]["pruned"]["uri"] == str(stages["pruned_a"])


# --------------------------------------------------------------------------------------------- what is recorded


def test_the_true_chain_is_recorded_with_every_artifact(cli, stages, tmp_path):
    store = tmp_path / "store"
    metrics = write_metrics(stages["recovered"], tmp_path / "metrics.json")
    code, result, err = register(cli, store, stages["recovered"], metrics, "--pruned", str(stages["pruned_a"]),
                                 "--calibration", str(stages["calibration"]))
    assert code == 0, err
    assert result["version"] == 1 and result["reused"] is False
    lineage = manifest(store, 1)["lineage"]
    prune_report = json.loads((stages["pruned_a"] / "prune_report.json").read_text())
    recover_report = json.loads((stages["recovered"] / "recover_report.json").read_text())
    assert lineage["calibration_sha256"] == prune_report["calibration"]["sha256"]
    assert lineage["base_model"] == prune_report["base_model"]
    assert lineage["training_data_sha256"] == recover_report["data_sha256"]
    assert lineage["artifacts"]["calibration"]["uri"] == str(stages["calibration"].resolve())
    assert lineage["artifacts"]["pruned"]["report"] == str(stages["pruned_a"] / "prune_report.json")


def test_the_readme_form_records_what_the_reports_prove(cli, stages, tmp_path):
    """`perp register --model-dir DIR --metrics metrics.json` with no out/ directory: the pruned input is the one
    recover_report.json names (its content verified); the calibration set is known only by its hash."""
    store = tmp_path / "store"
    metrics = write_metrics(stages["recovered"], tmp_path / "metrics.json")
    code, result, err = register(cli, store, stages["recovered"], metrics)
    assert code == 0, err
    lineage = manifest(store, result["version"])["lineage"]
    prune_report = json.loads((stages["pruned_a"] / "prune_report.json").read_text())
    assert lineage["artifacts"]["pruned"]["uri"] == str(stages["pruned_a"])
    assert lineage["artifacts"]["calibration"] is None
    assert lineage["calibration_sha256"] == prune_report["calibration"]["sha256"]


def test_a_moved_pruned_input_leaves_only_the_recorded_hashes(cli, stages, tmp_path):
    """The recorded input is gone: no pruned artifact, the base model and calibration hash from the record that
    recover_report.json carries, the prune config unknown."""
    moved = tmp_path / "recovered"
    shutil.copytree(stages["recovered"], moved)
    report = json.loads((moved / "recover_report.json").read_text())
    (moved / "recover_report.json").write_text(json.dumps({**report, "model": str(tmp_path / "gone")}))
    store = tmp_path / "store"
    metrics = write_metrics(moved, tmp_path / "metrics.json")
    code, result, err = register(cli, store, moved, metrics)
    assert code == 0, err
    lineage = manifest(store, result["version"])["lineage"]
    assert lineage["artifacts"]["pruned"] is None and lineage["prune"] is None
    assert lineage["base_model"] == report["pruning"]["base_model"]
    assert lineage["calibration_sha256"] == report["pruning"]["calibration_sha256"]

    code, _, err = register(cli, store, moved, metrics, "--pruned", str(stages["pruned_b"]))
    assert code == 2 and "was not recovered from" in err  # still checked against the recorded hash

    (tmp_path / "out").mkdir()  # an unrelated out/pruned was only a guess: not recorded, and no error
    shutil.copytree(stages["pruned_b"], tmp_path / "out" / "pruned")
    code, result, err = register(cli, store, moved, metrics)
    assert code == 0, err
    assert manifest(store, result["version"])["lineage"]["artifacts"]["pruned"] is None


def test_missing_inputs_are_one_line_errors(cli, stages, tmp_path):
    metrics = write_metrics(stages["recovered"], tmp_path / "metrics.json")
    cases = [
        (("--model-dir", "nope"), "the model directory 'nope' does not exist"),
        (("--model-dir", str(stages["recovered"]), "--pruned", "nope"), "the pruned model directory 'nope' does not"),
        (("--model-dir", str(stages["recovered"]), "--calibration", "nope"), "the calibration directory 'nope' does"),
        (("--model-dir", str(stages["calibration"])), "has neither recover_report.json nor prune_report.json"),
        (("--model-dir", str(stages["recovered"]), "--pruned", str(stages["calibration"])),
         "prune_report.json' does not exist (--pruned takes a perp prune output)"),
    ]
    for options, message in cases:
        code, _, err = cli("register", "--metrics", str(metrics), *options, "-S", f"register.store={tmp_path / 's'}")
        assert code == 2 and message in err, (options, err)
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------- idempotency


def _stage_args(stages: dict[str, Path], store: Path, metrics: Path) -> tuple:
    params = dump_params(config_from_sections(**SECTIONS, register={"store": str(store), "name": "tiny-perp"}))
    calibration = pipeline.reference(stages["calibration"], tokens_sha256=json.loads(
        (stages["calibration"] / "calibration.json").read_text())["sha256"])
    pruned = pipeline.reference(stages["pruned_a"], report=str(stages["pruned_a"] / "prune_report.json"))
    candidate = pipeline.reference(stages["recovered"], report=str(stages["recovered"] / "recover_report.json"))
    return (params["register"], candidate, pipeline.reference(metrics), params,
            pipeline.lineage(calibration, pruned, candidate))


def test_register_stage_reuses_the_version_that_holds_exactly_this_run(stages, tmp_path):
    from perp.registry import deregister, history, promote

    store = tmp_path / "store"
    first_metrics = write_metrics(stages["recovered"], tmp_path / "first.json")
    first = pipeline.register_stage(*_stage_args(stages, store, first_metrics))
    assert first["version"] == 1 and first["reused"] is False
    again = pipeline.register_stage(*_stage_args(stages, store, first_metrics))
    assert again["reused"] is True and again["version"] == 1
    assert again["manifest_sha256"] == first["manifest_sha256"] and again["files"] == first["files"]
    assert [e["type"] for e in history(str(store), "tiny-perp")] == ["register"]  # nothing appended

    other_metrics = write_metrics(stages["recovered"], tmp_path / "other.json", note="re-measured")
    second = pipeline.register_stage(*_stage_args(stages, store, other_metrics))
    assert second["version"] == 2 and second["reused"] is False  # other metrics: a new version

    promote(str(store), "tiny-perp", 1, "dev", reason="test")
    held = pipeline.register_stage(*_stage_args(stages, store, first_metrics))
    assert held["version"] == 1 and held["reused"] is True  # a version a stage holds is reused too

    promote(str(store), "tiny-perp", 2, "dev", reason="test")  # v1: neither held nor the newest any more
    third = pipeline.register_stage(*_stage_args(stages, store, first_metrics))
    assert third["version"] == 1 and third["reused"] is True  # an older active version is found too
    promote(str(store), "tiny-perp", 1, "dev", reason="test")
    promote(str(store), "tiny-perp", 2, "dev", reason="test")
    deregister(str(store), "tiny-perp", 1, reason="test")  # a withdrawn version is never handed back
    fourth = pipeline.register_stage(*_stage_args(stages, store, first_metrics))
    assert fourth["version"] == 3 and fourth["reused"] is False


def test_cli_re_run_returns_the_existing_version(cli, stages, tmp_path):
    store = tmp_path / "store"
    metrics = write_metrics(stages["recovered"], tmp_path / "metrics.json")
    options = ("--pruned", str(stages["pruned_a"]), "--calibration", str(stages["calibration"]))
    code, first, err = register(cli, store, stages["recovered"], metrics, *options)
    assert code == 0 and first["reused"] is False, err
    relative = os.path.relpath(stages["pruned_a"], tmp_path)  # the same directory, named another way
    code, again, err = register(cli, store, stages["recovered"], metrics, "--out", "summary.json",
                                "--pruned", relative, "--calibration", str(stages["calibration"]))
    assert code == 0, err
    assert again == {**first, "reused": True}
    assert json.loads((tmp_path / "summary.json").read_text()) == again


def test_a_gone_intermediate_recovery_is_named_not_blamed_on_the_pruned_input(cli, stages, tmp_path):
    """recovered twice → recovered (moved away) → pruned A: the chain cannot be followed, which the error says,
    instead of claiming the model was not recovered from A."""
    twice = tmp_path / "twice"
    shutil.copytree(stages["recovered_twice"], twice)
    report = json.loads((twice / "recover_report.json").read_text())
    (twice / "recover_report.json").write_text(json.dumps({**report, "model": str(tmp_path / "moved-away")}))
    metrics = write_metrics(twice, tmp_path / "metrics.json")
    code, _, err = register(cli, tmp_path / "store", twice, metrics, "--pruned", str(stages["pruned_a"]))
    assert code == 2 and "cannot verify" in err and "moved-away" in err, err


def test_stage_references_from_a_relative_workdir_are_absolute(tmp_path, monkeypatch):
    """Lineage records where the reports are wherever the run started (README: local paths are absolute)."""
    monkeypatch.chdir(tmp_path)
    params = dump_params(config_from_sections(**SECTIONS))
    model = params["model"]
    calibration = pipeline.calibrate_stage(model, params["data"]["calibration"], "runs")
    pruned = pipeline.mask_stage(model, params["prune"], calibration, "runs")
    recovered = pipeline.recover_stage(params["recover"], pruned, model, params["data"], "runs", params)
    for ref in (calibration, pruned, recovered):
        assert Path(ref["uri"]).is_absolute() and ref["uri"].startswith(str(tmp_path.resolve()))
    assert Path(pruned["report"]).is_absolute() and Path(pruned["report"]).is_file()
    assert Path(recovered["report"]).is_absolute() and Path(recovered["report"]).is_file()
