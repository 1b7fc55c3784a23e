"""The typer application and the helpers every command shares: config building, output, progress."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from perp.config import PerpConfig, load_params
from perp.io.atomic import dumps_json

app = typer.Typer(
    name="perp",
    help="Prune LLMs, then recover their quality by retraining a tiny subset of parameters (PERP).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Evaluate a model: perplexity and zero-shot accuracy.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

console = Console(stderr=True)

ParamsOption = typer.Option(None, "--params", "-p", help="params.yaml (default: ./params.yaml when present).")
SetOption = typer.Option(None, "--set", "-S", help="Dotted override, DVC style: -S prune.sparsity=0.6 (repeatable).")
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def build_config(params: Optional[Path], sets: Optional[list[str]], **cli_values: Any) -> PerpConfig:
    """Validate params.yaml + `-S` overrides + this command's options (dotted key → value, None = not given).

    Everything goes through the same pydantic config, so a bad value is rejected with the same one-line error
    by every command, before any model is loaded.
    """
    if params is None and Path("params.yaml").is_file():
        params = Path("params.yaml")
    overrides = list(sets or [])
    for key, value in cli_values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = "[" + ", ".join(json.dumps(v) for v in value) + "]"
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, str):
            value = json.dumps(value)
        overrides.append(f"{key}={value}")
    return load_params(params, overrides)


def emit(result: dict[str, Any], as_json: bool, title: str = "") -> None:
    """JSON on stdout with --json, else a readable table."""
    if as_json:
        sys.stdout.write(dumps_json(result) + "\n")
        return
    table = Table(title=title or None, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        table.add_row(str(key), str(value))
    Console().print(table)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr; yields `advance(n)`."""
    if not enabled:
        yield lambda n=1: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str = "") -> None:
            progress.update(task, advance=n, status=status)

        yield advance
