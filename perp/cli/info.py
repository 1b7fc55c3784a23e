"""`perp info`: what a model is, measured from its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config, emit


@app.command()
def info(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model: alias, local dir, .gguf, s3://, Hub id."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Family, layer count, parameter count and decoder-Linear sparsity (measured from the weights)."""
    config = build_config(params, sets, **{"model.name": model})
    from perp.models import load_model, model_info

    # Counting needs no accelerator: the weights stay in host memory, whatever their size next to the device's.
    loaded = load_model(config.model.name, config.model.device, config.model.dtype, config.model.revision,
                        load_to_device=False)
    emit(model_info(loaded), as_json, title="model")
