"""`perp calibrate`: the first stage — sample and store the calibration windows."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config, emit


@app.command()
def calibrate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model whose tokenizer cuts the windows."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text."),
    nsamples: Optional[int] = typer.Option(None, "--nsamples", help="Number of random windows."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Tokens per window."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    out: Path = typer.Option(Path("out/calibration"), "--out", help="Output directory."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Sample seeded calibration windows (SparseGPT/Wanda sampler) and store them with their sha256."""
    config = build_config(params, sets, **{
        "model.name": model, "data.calibration.source": calib, "data.calibration.nsamples": nsamples,
        "data.calibration.seqlen": seqlen, "data.calibration.seed": seed,
    })
    from perp.data.calibrate import run_calibrate

    description = run_calibrate(config, out)
    emit({"out": str(out), **description}, as_json, title="calibration")
