"""Outputs that appear whole or not at all.

A stage writes into a hidden sibling directory and renames it into place only when everything is written, so
an interrupted run never leaves an output directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

COMPLETE_MARKER = ".perp-complete"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove staging directories of `target` left by killed processes on this host (a checkpoint's worth of disk)."""
    host = socket.gethostname()
    removed = []
    for staging in target.parent.glob(f".{target.name}.partial-*"):
        try:
            stage_host, pid, _ = staging.name.rsplit(".partial-", 1)[1].rsplit("-", 2)
        except ValueError:
            continue
        if stage_host == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `target` atomically, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = target.parent / f".{target.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        (staging / COMPLETE_MARKER).write_text("")
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} already exists")
            trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, trash)
            os.replace(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / COMPLETE_MARKER).is_file()


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
