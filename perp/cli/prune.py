"""`perp prune`: the mask stage (filled by the pruning-engine issue)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config
from perp.errors import PerpError


@app.command()
def prune(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Dense model to prune."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text."),
    method: Optional[str] = typer.Option(None, "--method", help="magnitude, wanda or sparsegpt."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Fraction of weights to prune, in [0, 1)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="unstructured, 2:4, 4:8 or any N:M."),
    nsamples: Optional[int] = typer.Option(None, "--nsamples", help="Calibration windows."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Calibration window length."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Calibration sampling seed."),
    out: Path = typer.Option(Path("out/pruned"), "--out", help="Output directory."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Prune every decoder Linear layer by layer (magnitude, Wanda, SparseGPT; unstructured or N:M)."""
    build_config(params, sets, **{
        "model.name": model, "data.calibration.source": calib, "prune.method": method, "prune.sparsity": sparsity,
        "prune.pattern": pattern, "data.calibration.nsamples": nsamples, "data.calibration.seqlen": seqlen,
        "data.calibration.seed": seed,
    })
    raise PerpError("perp prune: the pruning engine is not in this build yet")
