"""The `perp` command line. Each stage's commands live in their own module; importing them registers them."""

from __future__ import annotations

import errno
import os
import signal
import sys
import warnings

from perp.cli.app import app, console
from perp.cli import calibrate, evaluate, info, prune, recover, register, registry, report, run, zeroshot  # noqa: F401,E501
from perp.errors import PerpError


def main() -> None:
    """Entry point: a PerpError (bad input, missing file...) is one red line and exit code 2, no traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # perp shows its own progress; transformers' per-load bars would drown it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.showwarning = _show_warning
    _exit_on_sigterm()
    try:
        # Standalone mode: click prints usage errors itself and exits with their code; `typer.Exit(n)` exits n.
        app(standalone_mode=True)
    except PerpError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as error:
        # A path that is a file, not a directory (or the reverse), a permission, a full disk: the user's to fix,
        # and the path says where. PERP_TRACEBACK=1 shows the traceback.
        if error.errno not in _PATH_ERRNOS or os.environ.get("PERP_TRACEBACK"):
            raise
        where = f": '{error.filename}'" if error.filename else ""
        console.print(f"[bold red]error:[/] {error.strerror}{where}", highlight=False, soft_wrap=True)
        sys.exit(2)


def _exit_on_sigterm() -> None:
    """`docker stop`, Kubernetes eviction and DVC or Prefect cancellation send SIGTERM, whose default kills the
    process where it stands, leaving a checkpoint's worth of staging on the disk. Exit through Python instead, so
    that partial outputs and scratch are removed on the way out (exit status 143, as a shell reports SIGTERM)."""
    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


_PATH_ERRNOS = frozenset({errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENOENT,
                          errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG})


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """perp's own warnings (data repeats, an ignored setting, a worse model) are one yellow line for a user, not
    a source location; everything else keeps Python's format."""
    if category.__module__.startswith("perp") or filename.startswith(_PERP_ROOT):
        console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_PERP_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_python_showwarning = warnings.showwarning

__all__ = ["app", "main"]
