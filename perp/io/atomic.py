"""Outputs that appear whole or not at all.

A stage writes into a hidden sibling directory and renames it into place only when everything is written, so
an interrupted run never leaves an output directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from perp.errors import OutputError, PerpError

COMPLETE_MARKER = ".perp-complete"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: Staging that no process has written to for this long was left by a killed one, on any host (a Kubernetes pod
#: that wrote to a shared volume and was evicted): no stage goes a day without writing its output files.
STALE_STAGING_SECONDS = 24 * 3600


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove staging directories of `target` left by killed processes (a checkpoint's worth of disk each): those
    of this host whose process is gone, and those of any host untouched for `STALE_STAGING_SECONDS`."""
    host = socket.gethostname()
    removed = []
    for staging in target.parent.glob(f".{target.name}.partial-*"):
        try:
            stage_host, pid, _ = staging.name.rsplit(".partial-", 1)[1].rsplit("-", 2)
        except ValueError:
            continue
        dead = stage_host == host and pid.isdigit() and not _pid_alive(int(pid))
        if dead or _untouched_for(staging, STALE_STAGING_SECONDS):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _untouched_for(directory: Path, seconds: float) -> bool:
    """No file or directory under `directory` was modified in the last `seconds`."""
    cutoff = time.time() - seconds
    try:
        return all(path.lstat().st_mtime < cutoff for path in (directory, *directory.rglob("*")))
    except OSError:  # removed meanwhile
        return False


def check_output_directory(target: str | Path, inputs: Iterable[str | Path] = (), what: str = "--out",
                           kind: Optional[str] = None) -> Path:
    """Refuse an output directory that replacing would destroy something perp did not write.

    Allowed: a path that does not exist, an empty directory, or a complete perp output (it has the marker file).
    Refused: a file, a non-empty directory without the marker (someone's data), the current directory or one of
    its ancestors, and a path equal to, inside or containing one of `inputs` (the stage would replace its own
    input). Returns the target as a Path.
    """
    target = Path(target)
    resolved = target.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"{what} '{target}' is the current directory (or contains it); name a new directory")
    for source in inputs:
        source_path = Path(source).expanduser()
        if not source_path.exists():
            continue
        source_resolved = source_path.resolve()
        if resolved == source_resolved or source_resolved in resolved.parents or resolved in source_resolved.parents:
            raise OutputError(f"{what} '{target}' would replace the input '{source}'; write to another directory")
    require_creatable(target, what)
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"{what} '{target}' exists and is not a directory")
        if any(target.iterdir()) and not is_complete(target):
            raise OutputError(f"{what} '{target}' exists and is not empty; choose another directory (perp replaces "
                              "only its own complete outputs)")
        existing = output_kind(target)
        if kind and existing and existing != kind:
            raise OutputError(f"{what} '{target}' holds a perp {existing} output; writing a {kind} output would "
                              "replace it: choose another directory (or remove it first)")
    return target


def require_creatable(target: Path, what: str) -> None:
    """The nearest existing ancestor of `target` must be a directory (a file there would fail the write only after
    the stage's work)."""
    for ancestor in target.expanduser().absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(f"{what} '{target}' cannot be created: '{ancestor}' is a file")
            return


#: What an output holds beyond the estimate a stage gives (tokenizer, reports, file-system overhead).
SPACE_MARGIN_BYTES = 64 * 1024 ** 2


def require_free_space(target: str | Path, needed: int, what: str, content: str,
                       hint: str = "free some space or write elsewhere") -> None:
    """Refuse to start a stage whose output (`needed` bytes of `content`, staged beside `target` and renamed into
    place) does not fit in the free space of `target`'s file system: a full disk found at the save costs the
    hours of pruning or training before it, and leaves nothing. A file system that reports no size (some network
    mounts) is not checked. The staging a killed run left for the same target is removed first: a retry must
    not be refused for the space its own failed attempt holds."""
    target = Path(target).absolute()  # as atomic_directory takes it: no `~` expansion
    if target.is_symlink():  # atomic_directory writes where the link points
        target = target.resolve()
    remove_stale_staging(target)
    existing = next((path for path in (target, *target.parents) if path.exists()), None)
    if existing is None:
        return
    usage = shutil.disk_usage(existing)
    wanted = int(needed * 1.02) + SPACE_MARGIN_BYTES
    if usage.total and wanted > usage.free:
        where = "it" if existing == target else f"'{existing}'"
        raise OutputError(f"{what} '{target}': {content} needs about {format_bytes(wanted)}, but {where} has "
                          f"{format_bytes(usage.free)} free; {hint}")


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def require_directory(path: Path, what: str) -> None:
    """`path` is a directory or can become one (a work directory that stages fill)."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} '{path}' is a file, not a directory")
    require_creatable(path, what)


def output_kind(directory: str | Path) -> Optional[str]:
    """What wrote a complete perp output (`prune`, `recover`, `calibration`...), as its marker records it; None
    for outputs written before markers named their kind."""
    try:
        return (Path(directory) / COMPLETE_MARKER).read_text().strip() or None
    except OSError:
        return None


def check_output_file(target: str | Path, inputs: Iterable[str | Path] = (), what: str = "--out") -> Path:
    """Refuse a file output that would overwrite or land inside a stage's input (a model directory, a metrics
    file), or that names an existing directory. Returns the target as a Path."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{what} '{target}' is a directory; name a file")
    require_creatable(target, what)
    resolved = target.expanduser().resolve()
    for source in inputs:
        source_path = Path(source).expanduser()
        if not source_path.exists():
            continue
        source_resolved = source_path.resolve()
        if resolved == source_resolved or source_resolved in resolved.parents:
            raise OutputError(f"{what} '{target}' would overwrite or write into the input '{source}'; write it "
                              "elsewhere")
    return target


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = True, kind: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `target` atomically, on error it is removed.

    Only an empty directory or a complete perp output is ever replaced (`check_output_directory`); file modes
    follow the umask (some writers create 0600 temporary files and rename them into place)."""
    target = check_output_directory(target, kind=kind)
    if target.is_symlink():  # --out pointing at a directory elsewhere (a bigger disk): write there
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = target.parent / f".{target.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        (staging / COMPLETE_MARKER).write_text(kind or "")
        _apply_umask(staging)
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


def _umask() -> int:
    try:  # Linux: read it; setting it to read it back would race with other threads creating files
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _apply_umask(root: Path) -> None:
    """What `open()` would have given: files 0666 and directories 0777, less the umask."""
    umask = _umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            mode = (0o777 if path.is_dir() else 0o666) & ~umask
            path.chmod(mode | (path.stat().st_mode & stat.S_ISGID))  # keep a group-shared tree's setgid


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / COMPLETE_MARKER).is_file()


def nonfinite_as_null(data: Any) -> Any:
    """`data` with every NaN or ±inf float replaced by None: JSON has no such numbers, and Python's `NaN` tokens
    break strict parsers (JavaScript's JSON.parse, Go, Rust's serde)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: nonfinite_as_null(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [nonfinite_as_null(value) for value in data]
    return data


def dumps_json(data: Any) -> str:
    """Standard JSON (non-finite numbers as null), indented, keys sorted, anything else as its str()."""
    return json.dumps(nonfinite_as_null(data), indent=2, sort_keys=True, default=str, allow_nan=False)


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(dumps_json(data) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's content; {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise PerpError(f"'{path}' is not valid JSON") from None
