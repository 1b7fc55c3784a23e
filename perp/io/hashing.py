"""sha256 of files, directories and token tensors."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Optional

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


def _index_file(resolved: Path) -> Path:
    from perp.io.cache import cache_dir

    return cache_dir("hashes") / (hashlib.sha256(str(resolved).encode()).hexdigest()[:32] + ".json")


def _stat_key(stat: os.stat_result) -> dict[str, int]:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def lookup_sha256(path: str | Path) -> Optional[str]:
    """The digest `cached_sha256` holds for a file as it is now (same path, size and mtime), else None; never
    reads the file."""
    path = Path(path).resolve()
    index_file = _index_file(path)
    if not index_file.is_file():
        return None
    try:
        record = json.loads(index_file.read_text())
        if record.get("key") == _stat_key(path.stat()):
            return record["sha256"]
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        pass
    return None


def seed_sha256(path: str | Path, digest: str, stat: Optional[os.stat_result] = None) -> None:
    """Record the sha256 of a file that the caller has just computed from its content (a verified download, a
    file written while hashing), so that `cached_sha256` does not read it again. `stat` is the file's stat at the
    time the digest describes (default: now)."""
    path = Path(path).resolve()
    _write_index(_index_file(path), _stat_key(stat if stat is not None else path.stat()), digest)


def _write_index(index_file: Path, key: dict[str, int], digest: str) -> None:
    tmp = index_file.with_suffix(f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps({"key": key, "sha256": digest}))
        os.replace(tmp, index_file)
    finally:
        tmp.unlink(missing_ok=True)


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so that large checkpoints are hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    index_file = _index_file(path)
    key = _stat_key(stat)
    if index_file.is_file():
        try:
            record = json.loads(index_file.read_text())
            if record.get("key") == key:
                return record["sha256"]
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    digest = sha256_file(path)
    _write_index(index_file, key, digest)
    return digest
