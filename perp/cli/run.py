"""`perp run`: the main job on the configured model and data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config, console, emit, progress_bar


@app.command()
def run(
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Run the main job on params.yaml (embedded defaults when absent): load the model, report it, measure it."""
    config = build_config(params, sets)
    from perp.data import evaluation_set
    from perp.evaluate import perplexity
    from perp.models import load_model, model_info

    loaded = load_model(config.model.name, config.model.device, config.model.dtype, config.model.revision)
    info = model_info(loaded)
    if not as_json:
        emit(info, False, title="model")
    token_set = evaluation_set(config.data.evaluation, loaded.tokenizer)
    with progress_bar("perplexity", token_set.num_windows, enabled=not as_json) as advance:
        result = perplexity(loaded.model, token_set, config.evaluate.batch_size, progress=advance)
    summary = {"data": config.data.evaluation.source, **result.as_dict()}
    if as_json:
        emit({"model": info, "perplexity": summary}, True)
    else:
        emit(summary, False, title="perplexity")
        console.print(f"[green]done[/]: {config.model.name} perplexity {result.ppl:.3f} on {summary['data']}")
