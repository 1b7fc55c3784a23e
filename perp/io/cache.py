"""Where perp keeps its local caches (converted models, downloads, hashes, dense baselines)."""

from __future__ import annotations

import os
from pathlib import Path


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
