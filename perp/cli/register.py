"""`perp register`: the last pipeline stage — register a recovered model with its metrics and lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config, emit

DEFAULT_CALIBRATION = Path("out/calibration")
DEFAULT_PRUNED = Path("out/pruned")


@app.command()
def register(
    model_dir: Path = typer.Option(Path("out/recovered"), "--model-dir", help="The model to register."),
    metrics: Path = typer.Option(Path("out/metrics.json"), "--metrics", help="Its metrics.json (perp evaluate)."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", show_default=False,
        help=f"The calibration stage output the model was pruned with (default: {DEFAULT_CALIBRATION} when it "
             "exists, else only the tokens hash the prune report records). Checked against the prune report."),
    pruned: Optional[Path] = typer.Option(
        None, "--pruned", show_default=False,
        help="The mask stage output the model was recovered from (default: MODEL_DIR when it is a prune output, "
             f"else the input recover_report.json records when it still exists, else {DEFAULT_PRUNED} when it "
             "exists). Checked against recover_report.json."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the registered version's summary here."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Register MODEL_DIR as a new immutable version of `register.name`, with lineage read from the stage outputs.

    The lineage is checked before anything is written: the model must come from --pruned, and --pruned must
    have been pruned with --calibration's tokens. What is not known is recorded as unknown, never guessed.
    Registering the same model with the same metrics, params and lineage again returns the existing version.
    """
    config = build_config(params, sets)
    from perp.config import absolute_store, dump_params
    from perp.io.atomic import check_output_file, write_json_atomic
    from perp.pipeline import LineageError, lineage, reference, register_stage

    if out is not None:
        check_output_file(out, inputs=[model_dir, metrics] + [p for p in (pruned, calibration) if p is not None])
    candidate = _candidate(model_dir, metrics)
    pruned_ref = _pruned_ref(pruned, model_dir)
    calibration_ref = _calibration_ref(calibration)
    try:
        run_lineage = lineage(calibration_ref, pruned_ref, candidate)
    except LineageError:
        # out/pruned and out/calibration are only guesses when not named: if they are not this model's, they are
        # not its lineage (recorded as unknown); what the user named must hold.
        guessed_pruned = pruned is None and pruned_ref is not None and Path(pruned_ref["uri"]) == \
            DEFAULT_PRUNED.resolve()
        guessed_calibration = calibration is None and calibration_ref is not None
        if not (guessed_pruned or guessed_calibration):
            raise
        run_lineage = lineage(None if guessed_calibration else calibration_ref,
                              None if guessed_pruned else pruned_ref, candidate)
    manifest = register_stage(dump_params(config)["register"], candidate, reference(metrics), dump_params(config),
                              run_lineage)
    summary = {"store": absolute_store(config.register.store), "name": manifest.get("name"),
               "version": manifest.get("version"), "manifest_sha256": manifest.get("manifest_sha256"),
               "reused": manifest.get("reused", False)}
    if out is not None:
        write_json_atomic(out, summary)
    emit(summary, as_json, title="already registered" if summary["reused"] else "registered")


def _candidate(model_dir: Path, metrics: Path) -> dict[str, Any]:
    """The model to register: a recover output or a prune output (recovery fused with pruning is both)."""
    from perp.errors import PerpError
    from perp.pipeline import PRUNE_REPORT, RECOVER_REPORT, reference

    if not model_dir.is_dir():
        raise PerpError(f"perp register: the model directory '{model_dir}' does not exist")
    if not metrics.is_file():
        raise PerpError(f"perp register: '{metrics}' does not exist (run perp evaluate on the model first)")
    report = model_dir / RECOVER_REPORT
    if not report.is_file() and not (model_dir / PRUNE_REPORT).is_file():
        raise PerpError(f"perp register: '{model_dir}' has neither {RECOVER_REPORT} nor {PRUNE_REPORT}: it is not a "
                        "perp recover or prune output (register other checkpoints with `perp registry register`)")
    return reference(model_dir, **({"report": str(report.resolve())} if report.is_file() else {}))


def _pruned_ref(pruned: Optional[Path], model_dir: Path) -> Optional[dict[str, Any]]:
    from perp.errors import PerpError
    from perp.pipeline import PRUNE_REPORT, find_pruned_input, reference

    if pruned is None:
        pruned = find_pruned_input(model_dir) or (DEFAULT_PRUNED if DEFAULT_PRUNED.is_dir() else None)
        if pruned is None:
            return None
    elif not pruned.is_dir():
        raise PerpError(f"perp register: the pruned model directory '{pruned}' does not exist")
    if not (pruned / PRUNE_REPORT).is_file():
        raise PerpError(f"perp register: '{pruned / PRUNE_REPORT}' does not exist (--pruned takes a perp prune output)")
    return reference(pruned, report=str((pruned / PRUNE_REPORT).resolve()))


def _calibration_ref(calibration: Optional[Path]) -> Optional[dict[str, Any]]:
    from perp.data.calibrate import load_token_set
    from perp.errors import PerpError
    from perp.pipeline import reference

    if calibration is None:
        if not DEFAULT_CALIBRATION.is_dir():
            return None
        calibration = DEFAULT_CALIBRATION
    elif not calibration.is_dir():
        raise PerpError(f"perp register: the calibration directory '{calibration}' does not exist")
    tokens = load_token_set(calibration)  # checks the stored windows against their recorded sha256
    return reference(calibration, tokens_sha256=tokens.hash)
