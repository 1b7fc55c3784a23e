"""`perp register`: the last pipeline stage — register a recovered model with its metrics and lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config, emit


@app.command()
def register(
    model_dir: Path = typer.Option(Path("out/recovered"), "--model-dir", help="The model to register."),
    metrics: Path = typer.Option(Path("out/metrics.json"), "--metrics", help="Its metrics.json (perp evaluate)."),
    calibration: Path = typer.Option(Path("out/calibration"), "--calibration", help="The calibration stage output."),
    pruned: Path = typer.Option(Path("out/pruned"), "--pruned", help="The mask stage output."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the registered version's summary here."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Register MODEL_DIR as a new immutable version of `register.name`, with lineage read from the stage outputs."""
    config = build_config(params, sets)
    from perp.config import dump_params
    from perp.errors import PerpError
    from perp.io.atomic import write_json_atomic
    from perp.pipeline import lineage, read_json, reference, register_stage

    for what, path in (("model", model_dir), ("calibration", calibration), ("pruned model", pruned)):
        if not path.is_dir():
            raise PerpError(f"perp register: the {what} directory '{path}' does not exist")
    for required in (metrics, calibration / "calibration.json", pruned / "prune_report.json",
                     model_dir / "recover_report.json"):
        if not required.is_file():
            raise PerpError(f"perp register: '{required}' does not exist (lineage needs every stage's output)")
    calibration_ref = reference(calibration, tokens_sha256=read_json(calibration / "calibration.json").get("sha256"))
    pruned_ref = reference(pruned, report=str(pruned / "prune_report.json"))
    candidate = reference(model_dir, report=str(model_dir / "recover_report.json"))
    manifest = register_stage(dump_params(config)["register"], candidate, reference(metrics), dump_params(config),
                              lineage(calibration_ref, pruned_ref, candidate))
    summary = {"store": config.register.store, "name": manifest.get("name"), "version": manifest.get("version"),
               "manifest_sha256": manifest.get("manifest_sha256")}
    if out is not None:
        write_json_atomic(out, summary)
    emit(summary, as_json, title="registered")
