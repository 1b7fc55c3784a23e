"""The `perp` command line. Each stage's commands live in their own module; importing them registers them."""

from __future__ import annotations

import os
import sys

from perp.cli.app import app, console
from perp.cli import calibrate, evaluate, info, prune, recover, registry, report, run, zeroshot  # noqa: F401
from perp.errors import PerpError


def main() -> None:
    """Entry point: a PerpError (bad input, missing file...) is one red line and exit code 2, no traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        exit_code = app(standalone_mode=False)
    except PerpError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as error:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(error, click.exceptions.ClickException):
            error.show()
            sys.exit(error.exit_code)
        if isinstance(error, click.exceptions.Abort):
            sys.exit(1)
        raise
    # Non-standalone click returns the code of `typer.Exit(n)` instead of exiting with it.
    if isinstance(exit_code, int) and exit_code != 0:
        sys.exit(exit_code)


__all__ = ["app", "main"]
