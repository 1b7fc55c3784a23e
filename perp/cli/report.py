"""`perp report RUN_DIR [--html]`: Markdown (and HTML) with PNG plots, plus the same series as DVC plot files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from perp.cli.app import JsonOption, app, console


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (or a sweep: a directory of runs)."),
    html: bool = typer.Option(False, "--html", help="Also write a self-contained report.html."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: RUN_DIR/report)."),
    as_json: bool = JsonOption,
) -> None:
    """Render what pruning cost and what recovery won back: perplexity of dense, pruned and recovered models,
    per-layer sparsity and reconstruction error, the recovery loss curve, zero-shot accuracy per task; for a
    sweep, the sparsity × quality front. Parts whose artifacts are missing are skipped."""
    from perp.report import render_report

    path = render_report(run_dir, html=html, out_dir=out)
    files = sorted(str(p) for p in path.parent.rglob("*") if p.is_file())
    if as_json:
        result = {"report": str(path), "html": str(path.with_suffix(".html")) if html else None, "files": files}
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        console.print(f"[green]report[/]: {path}" + (f" and {path.with_suffix('.html')}" if html else "")
                      + f" ({len(files)} files)", highlight=False)
