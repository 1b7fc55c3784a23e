"""`perp recover`: PERP retraining (filled by the recovery issue)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config
from perp.errors import PerpError


@app.command()
def recover(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Pruned model."),
    dense: Optional[str] = typer.Option(None, "--dense", help="Dense reference (layer-wise mode)."),
    method: Optional[str] = typer.Option(None, "--method", help="bias, norm, lm_head, lora, masklora, scalelora, full; combine with '+'."),
    mode: Optional[str] = typer.Option(None, "--mode", help="end2end or layerwise."),
    steps: Optional[int] = typer.Option(None, "--steps"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    seqlen: Optional[int] = typer.Option(None, "--seqlen"),
    rank: Optional[int] = typer.Option(None, "--rank"),
    data: Optional[str] = typer.Option(None, "--data", help="Training text (default: the calibration source)."),
    out: Path = typer.Option(Path("out/recovered"), "--out"),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Retrain a tiny subset (biases, norms, LM-head LoRA, sparsity-preserving LoRA), end to end or layer-wise."""
    build_config(params, sets, **{
        "model.name": model, "recover.method": method, "recover.mode": mode, "recover.steps": steps,
        "recover.lr": lr, "recover.batch_size": batch_size, "recover.seqlen": seqlen, "recover.rank": rank,
        "recover.data.source": data,
    })
    raise PerpError("perp recover: recovery is not in this build yet")
