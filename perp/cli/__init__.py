"""The `perp` command line. Each stage's commands live in their own module; importing them registers them."""

from __future__ import annotations

import os
import sys

from perp.cli.app import app, console
from perp.cli import calibrate, evaluate, info, prune, recover, register, registry, report, run, zeroshot  # noqa: F401,E501
from perp.errors import PerpError


def main() -> None:
    """Entry point: a PerpError (bad input, missing file...) is one red line and exit code 2, no traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # perp shows its own progress; transformers' per-load bars would drown it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        # Standalone mode: click prints usage errors itself and exits with their code; `typer.Exit(n)` exits n.
        app(standalone_mode=True)
    except PerpError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)


__all__ = ["app", "main"]
