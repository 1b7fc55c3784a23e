"""The compression chain, stage by stage: calibrate → mask → recover → evaluate → register.

Each stage takes only the config sections it depends on plus references (URI + sha256) to the outputs of the
stages before it, and writes into a directory named by the hash of those inputs. So:

- a stage whose inputs did not change finds its complete output and returns it without recomputing;
- changing one parameter recomputes only the stages downstream of it;
- an interrupted run resumes from the last completed stage (outputs are published atomically).

`perp run` chains these functions directly; the Prefect tasks in `tasks/` wrap the same functions one by one, and
`dvc.yaml` runs the same stages through the CLI. Nothing here imports Prefect or DVC.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from perp.config import PerpConfig, dump_params, validate_section
from perp.errors import PerpError
from perp.io.atomic import is_complete, require_directory
from perp.io.hashing import cached_sha256, directory_hash, sha256_file
from perp.layout import METRICS_FILE, PRUNE_REPORT, RECOVER_REPORT

Ref = dict[str, Any]  # {"uri": str, "sha256": str, ...}
STAGES = ("calibrate", "mask", "recover", "evaluate", "register")


# Bump when a stage's algorithm or output layout changes, so that outputs of older code are not reused.
STAGE_FORMAT = 1


def config_from_sections(**sections: Any) -> PerpConfig:
    """A full, validated config from the given sections (others default); raises ConfigError early."""
    return validate_section(PerpConfig, {name: value for name, value in sections.items() if value is not None})


def _source_identity(spec: str) -> Any:
    """What identifies a model or text source's content: the sha256 of a local file or directory, else the spec."""
    path = Path(spec).expanduser()
    if path.is_file():
        return {"spec": spec, "sha256": cached_sha256(path)}
    if path.is_dir():
        return {"spec": spec, "sha256": directory_hash(path)}
    return spec


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    from perp import __version__

    payload = json.dumps({"stage": stage, "inputs": inputs, "perp": __version__, "format": STAGE_FORMAT},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _stage_dir(workdir: str | Path, stage: str, inputs: dict[str, Any]) -> Path:
    return Path(workdir) / f"{stage}-{stage_key(stage, inputs)[:16]}"


def _stage_inputs(stage: str, args: dict[str, Any]) -> dict[str, Any]:
    """What a stage's output is keyed on, from the stage function's own arguments."""
    if stage == "calibrate":
        model, calibration = args["model"], args["calibration"]
        return {"model": model, "model_content": _source_identity(model["name"]), "calibration": calibration,
                "source_content": _source_identity(calibration["source"])}
    if stage == "mask":
        model = args["model"]
        return {"model": model, "model_content": _source_identity(model["name"]), "prune": args["prune"],
                "calibration": args["calibration"]["sha256"]}
    if stage == "recover":
        return {"recover": args["recover"], "pruned": args["pruned"]["sha256"], "dense": args["dense_model"],
                "data": args["data"]}
    if stage == "evaluate":
        return {"evaluate": args["evaluate"], "candidate": args["candidate"]["sha256"], "dense": args["dense_model"],
                "prune": args["prune"]}
    raise ValueError(f"no keyed output for stage '{stage}'")


def stage_output(stage: str, workdir: str | Path, **args: Any) -> Path:
    """Where `stage` (calibrate, mask, recover, evaluate) writes for these arguments of its stage function: a
    directory, or for evaluate the metrics file."""
    out = _stage_dir(workdir, stage, _stage_inputs(stage, args))
    return out / METRICS_FILE if stage == "evaluate" else out


def output_present(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and is_complete(path))


def reference(path: Path, **extra: Any) -> Ref:
    """A stage output as URI + sha256 (of the file, or of the directory's content)."""
    digest = sha256_file(path) if path.is_file() else directory_hash(path)
    return {"uri": str(path.resolve()), "sha256": digest, **extra}


WORKDIR_MARKER = ".perp-workdir"


def workdir_identity(workdir: str | Path) -> str:
    """A random id written once into the work directory: a new (or wiped) work directory gets a new one, so
    orchestrator caches keyed on it never point at outputs that no longer exist."""
    marker = Path(workdir) / WORKDIR_MARKER
    if not marker.is_file():
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: never replaces an id another process wrote first (works without hard links, e.g. SMB)
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(uuid.uuid4().hex + "\n")
    for _ in range(50):  # another process may have created it and not written it yet
        identity = marker.read_text().strip()
        if identity:
            return identity
        time.sleep(0.01)
    raise PerpError(f"'{marker}' is empty; delete it and re-run")


def is_ref(value: Any) -> bool:
    return isinstance(value, dict) and "uri" in value and "sha256" in value


def ref_present(ref: Ref) -> bool:
    """Whether a stage output still exists, complete, where its reference says."""
    return output_present(Path(ref["uri"]))


def require(ref: Ref, what: str) -> Path:
    """The local path of an upstream stage's output; a clear error if it was removed since it was produced."""
    path = Path(ref["uri"])
    if not ref_present(ref):
        raise PerpError(f"the {what} output '{path}' is missing or incomplete (removed after it was cached?); "
                        "delete the whole work directory to recompute (a new work directory gets a new identity, so "
                        "orchestrator caches keyed on it miss)")
    return path


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise PerpError(f"'{path}' is not valid JSON") from None


def _full_config(params: Optional[dict[str, Any]], **sections: Any) -> PerpConfig:
    """The config a stage runs with: the whole run's params (so reports record them), else just its sections."""
    return config_from_sections(**(params or sections))


def calibrate_stage(model: dict[str, Any], calibration: dict[str, Any], workdir: str | Path,
                    params: Optional[dict[str, Any]] = None) -> Ref:
    from perp.data.calibrate import META_FILE, run_calibrate

    config = _full_config(params, model=model, data={"calibration": calibration})
    out = stage_output("calibrate", workdir, model=model, calibration=calibration)
    if not is_complete(out):
        run_calibrate(config, out)
    return reference(out, tokens_sha256=read_json(out / META_FILE)["sha256"])


def mask_stage(model: dict[str, Any], prune: dict[str, Any], calibration: Ref, workdir: str | Path,
               params: Optional[dict[str, Any]] = None, progress: Optional[Callable[..., None]] = None) -> Ref:
    from perp.data.calibrate import load_token_set
    from perp.prune import run_prune

    config = _full_config(params, model=model, prune=prune)
    out = stage_output("mask", workdir, model=model, prune=prune, calibration=calibration)
    if not is_complete(out):
        calib = load_token_set(require(calibration, "calibrate"))
        run_prune(config, out, calib=calib, progress=progress)
    return reference(out, report=str((out / PRUNE_REPORT).resolve()))


def recover_stage(recover: dict[str, Any], pruned: Ref, dense_model: dict[str, Any], data: dict[str, Any],
                  workdir: str | Path, params: Optional[dict[str, Any]] = None,
                  progress: Optional[Callable[..., None]] = None) -> Ref:
    from perp.recover import run_recover

    config = _full_config(params, model=dense_model, data=data, recover=recover)
    out = stage_output("recover", workdir, recover=recover, pruned=pruned, dense_model=dense_model, data=data)
    if not is_complete(out):
        run_recover(config, str(require(pruned, "mask")), out, dense=dense_model["name"], progress=progress)
    return reference(out, report=str((out / RECOVER_REPORT).resolve()))


def evaluate_stage(evaluate: dict[str, Any], candidate: Ref, dense_model: dict[str, Any], prune: dict[str, Any],
                   workdir: str | Path, params: Optional[dict[str, Any]] = None) -> Ref:
    from perp.evaluate.stage import run_evaluate

    config = _full_config(params, model=dense_model, evaluate=evaluate, prune=prune)
    metrics_path = stage_output("evaluate", workdir, evaluate=evaluate, candidate=candidate,
                                dense_model=dense_model, prune=prune)
    if not metrics_path.is_file():
        run_evaluate(config, str(require(candidate, "recover")), metrics_path, dense=dense_model["name"])
    return reference(metrics_path)


class LineageError(PerpError):
    """The stage outputs named for a registration are not one chain (calibration → pruned → model)."""


MAX_RECOVERY_CHAIN = 8


def is_prune_output(directory: Path) -> bool:
    """A mask stage output, or recovery fused with pruning (it holds both reports)."""
    return (Path(directory) / PRUNE_REPORT).is_file()


def _content_hash(directory: Path) -> str:
    from perp.models.loading import model_content_hash

    return model_content_hash(directory)


def recovered_from(model_dir: Path) -> list[tuple[str, str, Optional[Path]]]:
    """What recover_report.json says the model was recovered from, nearest first: (source as recorded, its
    content sha256, the local directory when it still exists with that content). A recovered input (recovery of
    a recovered model) is followed to its own input; a prune output ends the chain."""
    chain: list[tuple[str, str, Optional[Path]]] = []
    current = Path(model_dir)
    while len(chain) < MAX_RECOVERY_CHAIN and not is_prune_output(current):
        report = read_json(current / RECOVER_REPORT)
        source, digest = report.get("model"), report.get("model_sha256")
        if not isinstance(source, str) or not isinstance(digest, str):
            break
        path = Path(source).expanduser()
        verified = path if path.is_dir() and _content_hash(path) == digest else None
        chain.append((source, digest, verified))
        if verified is None:
            break
        current = verified
    return chain


def find_pruned_input(model_dir: Path) -> Optional[Path]:
    """The prune output `model_dir` descends from, where that is provable from its reports: itself when it is
    one, else the recorded input of its recovery when it still exists with the recorded content."""
    if is_prune_output(model_dir):
        return Path(model_dir)
    chain = recovered_from(model_dir)
    last = chain[-1][2] if chain else None
    return last if last is not None and is_prune_output(last) else None


def check_lineage(calibration: Optional[Ref], pruned: Optional[Ref], candidate: Ref) -> None:
    """Refuse references that do not descend from one another, so a manifest never records false lineage:
    the model must come from `pruned` (recover_report.json's `model_sha256`, or the same content when the model
    is itself a prune output), and `pruned` must have been pruned with `calibration`'s tokens."""
    model_dir = Path(candidate["uri"])
    if pruned is not None:
        _check_pruned_input(model_dir, Path(pruned["uri"]))
    if calibration is not None:
        _check_calibration(calibration, pruned, model_dir)


def _check_pruned_input(model_dir: Path, pruned_dir: Path) -> None:
    if is_prune_output(model_dir):
        if model_dir.resolve() != pruned_dir.resolve() and _content_hash(model_dir) != _content_hash(pruned_dir):
            raise LineageError(f"'{model_dir}' is itself a prune output and '{pruned_dir}' is another one; pass "
                               f"--pruned '{model_dir}' (or leave --pruned out)")
        return
    pruned_hash = _content_hash(pruned_dir)
    chain = recovered_from(model_dir)
    if chain and pruned_hash not in {digest for _, digest, _ in chain}:
        source, digest, reachable = chain[-1]
        recorded = (read_json(model_dir / RECOVER_REPORT).get("pruning") or {}).get("source")
        if reachable is None and recorded and Path(recorded).resolve() == pruned_dir.resolve():
            raise LineageError(f"cannot verify that '{model_dir}' descends from '{pruned_dir}': the recovery it "
                               f"records ran on '{source}', which is gone or changed, so the chain cannot be "
                               "followed; restore that directory, or leave --pruned out (the recorded hashes are "
                               "kept)")
        raise LineageError(f"'{model_dir}' was not recovered from '{pruned_dir}' (sha256 {pruned_hash[:12]}…): "
                           f"{RECOVER_REPORT} records the input '{source}' (sha256 {digest[:12]}…); pass --pruned "
                           "with the directory it was recovered from")


def _check_calibration(calibration: Ref, pruned: Optional[Ref], model_dir: Path) -> None:
    used, where = _recorded_calibration(pruned, model_dir)
    if used is None:
        raise LineageError(f"cannot tie the calibration set '{calibration['uri']}' to '{model_dir}': no prune report "
                           "names the calibration tokens it used; pass --pruned with its prune output")
    if calibration.get("tokens_sha256") != used:
        raise LineageError(f"the calibration set '{calibration['uri']}' (tokens sha256 "
                           f"{str(calibration.get('tokens_sha256'))[:12]}…) is not the one {where} was pruned with "
                           f"(sha256 {used[:12]}…); pass --calibration with the calibration stage output it used")


def _recorded_calibration(pruned: Optional[Ref], model_dir: Path) -> tuple[Optional[str], str]:
    """The calibration tokens sha256 the pruning recorded, and whose record it is (for messages)."""
    if pruned is not None:
        return (read_json(Path(pruned["uri"]) / PRUNE_REPORT).get("calibration") or {}).get("sha256"), \
            f"'{pruned['uri']}'"
    if is_prune_output(model_dir):
        return (read_json(model_dir / PRUNE_REPORT).get("calibration") or {}).get("sha256"), f"'{model_dir}'"
    return (read_json(model_dir / RECOVER_REPORT).get("pruning") or {}).get("calibration_sha256"), \
        f"the pruned input of '{model_dir}'"


def lineage(calibration: Optional[Ref], pruned: Optional[Ref], recovered: Ref) -> dict[str, Any]:
    """What a registered version records about how it was made, from the stage outputs' own reports.

    `calibration` and `pruned` may be None when unknown: the values then come from the records the model
    directory carries (recover_report.json's `pruning`), and what no report says stays None. Raises
    `LineageError` when the references are not one chain (`check_lineage`)."""
    check_lineage(calibration, pruned, recovered)
    prune_report = read_json(Path(pruned["report"])) if pruned and pruned.get("report") else {}
    recover_report = read_json(Path(recovered["report"])) if recovered.get("report") else {}
    recorded = recover_report.get("pruning") if isinstance(recover_report.get("pruning"), dict) else {}
    calibration_sha256 = ((calibration or {}).get("tokens_sha256")
                          or (prune_report.get("calibration") or {}).get("sha256")
                          or recorded.get("calibration_sha256"))
    return {
        "base_model": prune_report.get("base_model") or recorded.get("base_model"),
        "calibration_sha256": calibration_sha256,
        "training_data_sha256": recover_report.get("data_sha256"),
        "prune": (prune_report.get("config") or {}).get("prune"),
        "recover": (recover_report.get("config") or {}).get("recover"),
        "artifacts": {"calibration": calibration, "pruned": pruned, "recovered": recovered},
    }


def register_stage(register: dict[str, Any], candidate: Ref, metrics: Ref, params: dict[str, Any],
                   run_lineage: dict[str, Any], flow_run_id: Optional[str] = None) -> dict[str, Any]:
    """Register the candidate with its metrics and lineage; idempotent: when an active version (a recent one, or
    one a stage holds) already records exactly this model, metrics, params and lineage, that version is
    returned with `"reused": true` and nothing is written, also when an identical run registered it while this one
    uploaded. A new version has `"reused": false`."""
    from perp.registry import register_version

    config = config_from_sections(register=register)
    model_dir = require(candidate, "recover")
    measured = read_json(require(metrics, "evaluate"))
    if not (measured.get("model") or {}).get("sha256"):
        raise PerpError(f"'{metrics['uri']}' does not name the model it measured (model.sha256); "
                        "it was not written by perp evaluate")
    store, name = config.register.store, config.register.name
    return register_version(store, name, model_dir, metrics=measured, params=params, lineage=run_lineage, reuse=True,
                            flow_run_id=flow_run_id)


def assemble_run(workdir: str | Path, refs: dict[str, Any]) -> Path:
    """A directory for one run: its reports side by side and `run.json` with every stage's reference.

    Stage outputs are shared between runs (they are keyed by their inputs); this directory is what a person or
    `perp report` looks at for one run.
    """
    import shutil

    run_dir = Path(workdir) / f"run-{stage_key('run', {k: v.get('sha256') for k, v in refs.items() if isinstance(v, dict)})[:16]}"
    (run_dir / "pruned").mkdir(parents=True, exist_ok=True)
    (run_dir / "recovered").mkdir(parents=True, exist_ok=True)
    shutil.copy(refs["pruned"]["report"], run_dir / "pruned" / PRUNE_REPORT)
    shutil.copy(refs["recovered"]["report"], run_dir / "recovered" / RECOVER_REPORT)
    shutil.copy(refs["metrics"]["uri"], run_dir / METRICS_FILE)
    (run_dir / "run.json").write_text(json.dumps(refs, indent=2, sort_keys=True, default=str) + "\n")
    return run_dir


def run_pipeline(config: PerpConfig, workdir: str | Path = "runs",
                 on_stage: Optional[Callable[[str, Any], None]] = None) -> dict[str, Any]:
    """The whole chain in-process (what `perp run` does); returns every stage's reference."""
    require_directory(Path(workdir), "--workdir")
    params = dump_params(config)
    notify = on_stage or (lambda stage, result: None)
    calibration = calibrate_stage(params["model"], params["data"]["calibration"], workdir, params)
    notify("calibrate", calibration)
    pruned = mask_stage(params["model"], params["prune"], calibration, workdir, params)
    notify("mask", pruned)
    recovered = recover_stage(params["recover"], pruned, params["model"], params["data"], workdir, params)
    notify("recover", recovered)
    metrics = evaluate_stage(params["evaluate"], recovered, params["model"], params["prune"], workdir, params)
    notify("evaluate", metrics)
    registered = register_stage(params["register"], recovered, metrics, params, lineage(calibration, pruned, recovered))
    notify("register", registered)
    return {"calibration": calibration, "pruned": pruned, "recovered": recovered, "metrics": metrics,
            "registered": registered}
