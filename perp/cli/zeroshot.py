"""`perp eval zeroshot` (lm-eval's stock tasks, offline with --task-data) and the `perp evaluate` stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from perp.cli.app import (
    JsonOption,
    ParamsOption,
    SetOption,
    app,
    build_config,
    console,
    eval_app,
    progress_bar,
)
from perp.errors import ConfigError
from perp.io.atomic import dumps_json


def _tasks_option(tasks: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None


def _pct(value: Optional[float], stderr: Optional[float] = None) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f}" + (f" ± {100 * stderr:.2f}" if stderr is not None else "")


def _print_zeroshot(result: dict[str, Any], title: str, dense: Optional[dict[str, Any]] = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("task", "version", "n", "acc %", "acc_norm %") + (("dense acc %", "drop pts") if dense else ()):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, record in result["tasks"].items():
        row = [task, str(record.get("version")), str(record.get("samples")),
               _pct(record.get("acc"), record.get("acc_stderr")),
               _pct(record.get("acc_norm"), record.get("acc_norm_stderr"))]
        if dense:
            drop = record.get("drop_points")
            row += [_pct(record.get("dense_acc")), "—" if drop is None else f"{drop:+.2f}"]
        table.add_row(*row)
    mean_row = ["mean (acc)", "", "", _pct(result.get("mean_acc")), ""]
    if dense:
        drop = result.get("drop_points")
        mean_row += [_pct(result.get("dense_mean_acc")), "—" if drop is None else f"{drop:+.2f}"]
    table.add_row(*mean_row, style="bold")
    Console().print(table)


@eval_app.command("zeroshot")
def eval_zeroshot(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to evaluate (default: model.name)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated lm-eval task names, e.g. "
                                        "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa."),
    task_data: Optional[str] = typer.Option(None, "--task-data", help="Directory of <task>.jsonl files in each task's "
                                            "Hugging Face field layout (offline). Default: the stock HF datasets."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N examples of each task."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="lm-eval batch size."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Zero-shot accuracy with lm-evaluation-harness's own tasks, HFLM and simple_evaluate.

    The task definitions are lm-eval's stock YAMLs; --task-data only redirects where each task's evaluation split
    is read from. Records the lm-eval and task versions, the limit, acc and acc_norm with their stderr, and the
    mean of acc over the tasks.
    """
    config = build_config(params, sets, **{
        "model.name": model, "evaluate.zeroshot.tasks": _tasks_option(tasks),
        "evaluate.zeroshot.task_data": task_data, "evaluate.zeroshot.limit": limit,
        "evaluate.zeroshot.batch_size": batch_size,
    })
    zs = config.evaluate.zeroshot
    if not zs.tasks:
        raise ConfigError("evaluate.zeroshot.tasks: no tasks; pass --tasks boolq,rte,... or set it in params.yaml")
    from perp.evaluate.zeroshot import evaluate_zeroshot, validate_zeroshot

    plan = validate_zeroshot(zs.tasks, zs.task_data, zs.limit)  # before the model is loaded
    from perp.models import load_model

    loaded = load_model(config.model.name, config.model.device, config.model.dtype, config.model.revision)
    if not as_json:
        console.print(f"zero-shot: {', '.join(plan.names)} on {config.model.name} "
                      f"({'limit ' + str(zs.limit) if zs.limit else 'all examples'})")
    result = evaluate_zeroshot(loaded.model, loaded.tokenizer, plan.names, zs.task_data, zs.limit, zs.batch_size,
                               plan=plan)
    result = {"model": config.model.name, "model_sha256": loaded.content_hash, **result}
    if as_json:
        sys.stdout.write(dumps_json(result) + "\n")
    else:
        _print_zeroshot(result, f"zero-shot, lm-eval {result['lm_eval_version']}, {result['num_fewshot']}-shot")


@app.command()
def evaluate(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to evaluate (default: model.name, the "
                                        "dense model itself)."),
    dense: Optional[str] = typer.Option(None, "--dense", help="Dense baseline (default: the base model the candidate's "
                                        "own reports record, else model.name)."),
    out: Path = typer.Option(Path("out/metrics.json"), "--out", "-o", help="metrics.json path (or a directory)."),
    tasks: Optional[str] = typer.Option(None, "--tasks",
                                        help="Comma-separated lm-eval tasks (evaluate.zeroshot.tasks)."),
    task_data: Optional[str] = typer.Option(None, "--task-data", help="Directory of <task>.jsonl files (offline)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Zero-shot: first N examples of each task."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Perplexity windows per forward pass."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """The evaluation stage: one metrics.json with perplexity on every configured text, zero-shot accuracy, the
    dense baseline's numbers next to them (computed once, cached), and the figures promotion gates read."""
    config = build_config(params, sets, **{
        "evaluate.zeroshot.tasks": _tasks_option(tasks), "evaluate.zeroshot.task_data": task_data,
        "evaluate.zeroshot.limit": limit, "evaluate.batch_size": batch_size,
    })
    from perp.config import classify_model_source

    candidate = model or config.model.name
    for option, spec in (("--model", candidate), ("--dense", dense)):
        if spec is None:
            continue
        try:
            classify_model_source(spec)
        except ConfigError as error:
            raise ConfigError(str(error).replace("model.name:", f"{option}:", 1)) from None
    from perp.evaluate.stage import run_evaluate

    def factory(description: str, total: int):
        return progress_bar(description, total, enabled=not as_json)

    log = None if as_json else (lambda line: console.print(line, highlight=False))
    metrics = run_evaluate(config, candidate, out, dense=dense, progress_factory=factory, log=log)
    if as_json:
        sys.stdout.write(dumps_json(metrics) + "\n")
        return
    _print_metrics(metrics)


def _print_metrics(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    table = Table(title=f"perplexity: {metrics['model']['source']} vs dense {metrics['model']['dense_source']}")
    for column in ("text", "windows × seqlen", "dense ppl", "ppl", "ratio"):
        table.add_column(column, justify="left" if column == "text" else "right")
    for name, entry in metrics["perplexity"].items():
        table.add_row(name, f"{entry['windows']} × {entry['seqlen']}", f"{entry['dense_ppl']:.4f}",
                      f"{entry['ppl']:.4f}", f"{entry['ratio']:.4f}")
    out.print(table)
    if metrics.get("zeroshot"):
        zs = metrics["zeroshot"]
        _print_zeroshot(zs, f"zero-shot, lm-eval {zs['lm_eval_version']}, limit {zs['limit'] or 'none'}", dense=zs)
    gates = metrics["gates"]

    def show(value: Optional[float], fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    out.print(f"sparsity {metrics['sparsity']:.4f} (measured; target {show(metrics.get('target_sparsity'), '.4f')}), "
              f"ppl ratio {show(gates['ppl_ratio'], '.4f')}, "
              f"zero-shot drop {show(gates['zeroshot_drop_points'], '+.2f')} points")


__all__ = ["eval_zeroshot", "evaluate"]
