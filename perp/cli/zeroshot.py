"""`perp eval zeroshot` and the `perp evaluate` stage (filled by the evaluation issue)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config, eval_app
from perp.errors import PerpError


@eval_app.command("zeroshot")
def eval_zeroshot(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated lm-eval task names."),
    task_data: Optional[str] = typer.Option(None, "--task-data", help="Directory of <task>.jsonl files."),
    limit: Optional[int] = typer.Option(None, "--limit"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Zero-shot accuracy with lm-evaluation-harness's stock tasks (offline with --task-data)."""
    build_config(params, sets, **{
        "model.name": model, "evaluate.zeroshot.tasks": tasks.split(",") if tasks else None,
        "evaluate.zeroshot.task_data": task_data, "evaluate.zeroshot.limit": limit,
        "evaluate.zeroshot.batch_size": batch_size,
    })
    raise PerpError("perp eval zeroshot: zero-shot evaluation is not in this build yet")
