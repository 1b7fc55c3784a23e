"""sha256 of files, directories and token tensors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_manifest(directory: str | Path) -> dict[str, dict[str, int | str]]:
    """Relative path → {sha256, size} for every file under a directory, sorted."""
    directory = Path(directory)
    manifest: dict[str, dict[str, int | str]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        manifest[path.relative_to(directory).as_posix()] = {"sha256": cached_sha256(path), "size": path.stat().st_size}
    return manifest


def directory_hash(directory: str | Path, suffixes: tuple[str, ...] | None = None) -> str:
    """One hash for a directory's content: sha256 over the sorted (path, file sha256) pairs."""
    manifest = file_manifest(directory)
    if suffixes is not None:
        manifest = {k: v for k, v in manifest.items() if k.endswith(suffixes)}
    return sha256_bytes(json.dumps({k: v["sha256"] for k, v in manifest.items()}, sort_keys=True).encode())


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so that large checkpoints are hashed once."""
    from perp.io.cache import cache_dir

    path = Path(path).resolve()
    stat = path.stat()
    index_file = cache_dir("hashes") / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if index_file.is_file():
        try:
            record = json.loads(index_file.read_text())
            if record.get("key") == key:
                return record["sha256"]
        except (ValueError, KeyError):
            pass
    digest = sha256_file(path)
    tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "sha256": digest}))
    os.replace(tmp, index_file)
    return digest
