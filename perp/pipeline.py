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
from perp.io.atomic import is_complete, read_json, require_directory
from perp.io.hashing import cached_sha256, directory_hash, sha256_file
from perp.layout import METRICS_FILE, PRUNE_REPORT, RECOVER_REPORT, Ref
from perp.lineage import LineageError, check_lineage, find_pruned_input, lineage  # noqa: F401  (the chain's API)
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

    digests = {name: ref.get("sha256") for name, ref in refs.items() if isinstance(ref, dict)}
    run_dir = Path(workdir) / f"run-{stage_key('run', digests)[:16]}"
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
