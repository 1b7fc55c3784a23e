"""Where perp keeps its local caches (converted models, downloads, hashes, dense baselines)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

#: Scratch older than this belongs to a process that was killed: no perp job keeps one that long.
STALE_SCRATCH_SECONDS = 24 * 3600


def cache_root() -> Path:
    """`$PERP_CACHE`, else `$XDG_CACHE_HOME/perp`, else `~/.cache/perp`."""
    if os.environ.get("PERP_CACHE"):
        return Path(os.environ["PERP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "perp"


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def scratch_dir(prefix: str) -> Path:
    """The directory for `prefix`-named scratch directories (`tempfile.TemporaryDirectory(dir=..., prefix=...)`),
    after removing those of killed processes: a scratch directory untouched for `STALE_SCRATCH_SECONDS`."""
    base = cache_dir("tmp")
    now = time.time()
    for entry in base.glob(f"{prefix}*"):
        try:
            newest = max([entry.stat().st_mtime] + [p.stat().st_mtime for p in entry.iterdir()])
        except OSError:  # removed meanwhile, or not a directory
            continue
        if now - newest > STALE_SCRATCH_SECONDS:
            shutil.rmtree(entry, ignore_errors=True)
    return base
