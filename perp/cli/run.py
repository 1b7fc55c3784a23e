"""`perp run`: the main job — calibrate, prune, recover, evaluate and register, as configured."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config, console, emit


@app.command()
def run(
    workdir: Path = typer.Option(Path("runs"), "--workdir", help="Where stage outputs go (reused when unchanged)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Render the Markdown/HTML report."),
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Run the whole chain on params.yaml (embedded defaults when absent), as the Prefect `compress` flow does.

    Stages whose inputs did not change are reused from WORKDIR, so an interrupted run resumes where it stopped.
    """
    config = build_config(params, sets)
    from perp.config import absolute_store
    from perp.pipeline import run_pipeline

    def on_stage(stage: str, result: Any) -> None:
        if not as_json:
            if stage == "register":
                where = (f"{result.get('name')} v{result.get('version')} in {config.register.store}"
                         + (" (already registered: reused)" if result.get("reused") else ""))
            else:
                where = result.get("uri", "")
            console.print(f"[green]✓[/] {stage} {where}", highlight=False)

    refs = run_pipeline(config, workdir, on_stage=on_stage)
    summary: dict[str, Any] = {
        "metrics": refs["metrics"]["uri"],
        "model": refs["recovered"]["uri"],
        "registered": {"store": absolute_store(config.register.store), "name": refs["registered"].get("name"),
                       "version": refs["registered"].get("version"),
                       "reused": bool(refs["registered"].get("reused"))},
    }
    if report:
        from perp.pipeline import assemble_run
        from perp.report import render_report

        summary["report"] = str(render_report(assemble_run(workdir, refs), html=True))
    from perp.pipeline import read_json

    metrics = read_json(Path(refs["metrics"]["uri"]))
    summary["sparsity"] = metrics.get("sparsity")
    summary["perplexity"] = {name: {k: v.get(k) for k in ("ppl", "dense_ppl", "ratio")}
                             for name, v in (metrics.get("perplexity") or {}).items()}
    emit(summary, as_json, title="perp run")
    if not as_json:
        registered = summary["registered"]
        verb = "already registered as" if registered["reused"] else "registered"
        console.print(f"[green]done[/]: {verb} {registered['name']} v{registered['version']} in "
                      f"{registered['store']}" + (f"; report {summary['report']}" if report else ""), highlight=False)
