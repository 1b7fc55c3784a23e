"""Compact sparse checkpoint format ("perp-sparse", version 1) with an exact, byte-identical round trip.

A pruned Hugging Face checkpoint is mostly zeros, and dense safetensors store every one of them. This format
stores each sufficiently sparse tensor as a **bitmask plus its non-zero values**, and every other tensor as its
plain values; both are then split into byte planes (for bf16: the sign/exponent byte and the mantissa byte) and
each plane is Huffman-coded (a standard zlib stream) when that pays off. Exponent planes of trained weights
compress well; mantissa planes do not, and are stored raw.

Exactness. Zero is decided on the *bit pattern* (``-0.0`` is a value, not a zero), values are kept as raw bit
patterns (no float arithmetic), and the source file's header bytes are stored verbatim, so unpacking rebuilds
the source ``.safetensors`` file byte for byte: its sha256 is checked against the recorded one, and a mismatch is
an error. Any dtype safetensors knows round-trips; dtypes narrower than a byte are stored as raw bytes.

Layout. ``pack_checkpoint(hf_dir, out_dir)`` mirrors the directory: every ``X.safetensors`` becomes
``X.perp-sparse.safetensors`` (itself a valid safetensors file of uint8 parts; its ``__metadata__["perp"]`` is a
JSON description), every other file is copied unchanged, and ``perp-sparse.json`` lists each original file with
its sha256 and size. Nothing but safetensors is ever parsed; other files (including any ``.bin``) are copied as
opaque bytes. Tensors are encoded and decoded on a few threads (zlib and numpy release the GIL) and written in
order, so memory stays bounded by a few tensors at a time (`workers`, default `PERP_PACK_WORKERS` or up to 4).

Size (``bench/sparse_format.py``), SmolLM2-135M with 50% of each decoder Linear zeroed by magnitude, in bf16:
0.431 of the dense safetensors (0.437 with N(0, 0.02) weights of the same shapes, since this SmolLM2 copy is
dequantised from Q4_1); mask + raw values alone would be ~0.65 there, as the embeddings stay dense.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import threading
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Callable, Generator, Iterable, Iterator, Optional, TypeVar

import numpy as np

from perp.errors import PerpError

FORMAT = "perp-sparse"
FORMAT_VERSION = 1
INDEX_FILE = "perp-sparse.json"
PACKED_SUFFIX = ".perp-sparse.safetensors"
METADATA_KEY = "perp"

# Element width in bytes of the safetensors dtypes whose zero is the all-zero bit pattern.
DTYPE_WIDTH = {
    "F64": 8, "I64": 8, "U64": 8, "C64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors limit
_SAMPLE = 256 * 1024  # bytes tried before compressing a whole plane
_COMPRESS_IF_BELOW = 0.92  # compress a plane when its sample shrinks below this ratio
_CHUNK = 8 * 1024 * 1024
_T = TypeVar("_T")
_R = TypeVar("_R")


MAX_WORKERS = 64


def default_workers() -> int:
    """Threads that encode or decode tensors: `PERP_PACK_WORKERS`, else up to 4 of the cores this process may
    run on (its CPU affinity, which container limits narrow)."""
    configured = os.environ.get("PERP_PACK_WORKERS", "").strip()
    if configured:
        if not (configured.isascii() and configured.isdecimal() and 1 <= int(configured) <= MAX_WORKERS):
            raise SparseFormatError(f"PERP_PACK_WORKERS must be a whole number from 1 to {MAX_WORKERS}, "
                                    f"got '{configured}'")
        return int(configured)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


def _ordered_map(function: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Generator[_R, None, None]:
    """`map(function, items)` on `workers` threads, in order, with at most `workers` + 2 results alive at once
    (`workers` + 1 submitted, the one the caller holds; each may be a tensor's worth of bytes). Close the generator
    (`contextlib.closing`) when the caller may stop early: that cancels what has not started."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="perp-pack") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # an error (or an abandoned generator): drop what has not started
                future.cancel()


class SparseFormatError(PerpError):
    """A checkpoint cannot be packed or unpacked (corrupt safetensors, mismatched hash, foreign file)."""


# --------------------------------------------------------------------------------------------- safetensors


class SafetensorsHeader:
    """The parsed header of a safetensors file, plus its exact bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SparseFormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER or length + 8 > self.file_size:
                raise SparseFormatError(f"{path}: not a safetensors file (header length {length} is invalid)")
            self.header_bytes = handle.read(length)
        try:
            header = json.loads(self.header_bytes)
        except (UnicodeDecodeError, ValueError):
            raise SparseFormatError(f"{path}: not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise SparseFormatError(f"{path}: not a safetensors file (header is not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + length
        self.data_len = self.file_size - self.data_start
        self.tensors: list[tuple[str, str, list[int], int, int]] = []  # name, dtype, shape, begin, end
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
                ok = isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                ok = ok and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= self.data_len
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise SparseFormatError(f"{path}: corrupt safetensors header entry for tensor '{name}'")
            width = DTYPE_WIDTH.get(dtype)
            if width is not None and math.prod(shape) * width != end - begin:
                raise SparseFormatError(f"{path}: tensor '{name}' size does not match its shape and dtype")
            self.tensors.append((name, dtype, shape, begin, end))
        self.tensors.sort(key=lambda t: (t[3], t[4]))
        for (name_a, _, _, _, end_a), (name_b, _, _, begin_b, _) in zip(self.tensors, self.tensors[1:]):
            if begin_b < end_a:
                raise SparseFormatError(f"{path}: tensors '{name_a}' and '{name_b}' overlap")


def _write_safetensors(path: Path, parts: list[tuple[str, int, int]], data_file: BinaryIO,
                       metadata: dict[str, str], fsync: bool = True) -> str:
    """Write a safetensors file of 1-D uint8 tensors whose bytes lie contiguously in `data_file`; returns the
    sha256 of what was written (computed as it is written)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    for name, begin, end in parts:
        header[name] = {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "wb") as out:
        for piece in (struct.pack("<Q", len(encoded)), encoded):
            digest.update(piece)
            out.write(piece)
        data_file.seek(0)
        while count := data_file.readinto(buffer):  # type: ignore[attr-defined]
            digest.update(view[:count])
            out.write(view[:count])
        out.flush()
        if fsync:
            os.fsync(out.fileno())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- planes


def _deflate(data: np.ndarray) -> bytes:
    """A standard zlib stream, Huffman coding only: byte planes of weights are close to i.i.d. symbols, where
    LZ77 matching costs ~30x the time for a worse ratio (measured on bf16 exponent planes)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return compressor.compress(data.data) + compressor.flush()


def _encode_plane(plane: np.ndarray) -> tuple[str, bytes | memoryview]:
    """zlib when a sample says it pays off, else raw."""
    if plane.size < 64:
        return "raw", plane.data
    start = max(0, plane.size // 2 - _SAMPLE // 2)
    sample = plane[start:start + _SAMPLE]
    if len(_deflate(sample)) >= _COMPRESS_IF_BELOW * sample.size:
        return "raw", plane.data
    packed = _deflate(plane)
    if len(packed) >= plane.size:
        return "raw", plane.data
    return "zlib", packed


def _decode_plane(codec: str, data: np.ndarray, expected: int, what: str) -> np.ndarray:
    if codec == "raw":
        out = data
    elif codec == "zlib":
        try:
            out = np.frombuffer(zlib.decompress(data.data), dtype=np.uint8)
        except zlib.error as error:
            raise SparseFormatError(f"{what}: corrupt compressed data ({error})") from None
    else:
        raise SparseFormatError(f"{what}: unknown codec '{codec}'")
    if out.size != expected:
        raise SparseFormatError(f"{what}: expected {expected} bytes, found {out.size}")
    return out


def _byte_planes(words: np.ndarray, width: int) -> Iterator[np.ndarray]:
    """Little-endian byte planes of a 1-D array of unsigned words: plane j holds byte j of every element."""
    if width == 1:
        yield np.ascontiguousarray(words.view(np.uint8))
        return
    as_bytes = words.view(np.uint8).reshape(-1, width)
    for j in range(width):
        yield np.ascontiguousarray(as_bytes[:, j])


# --------------------------------------------------------------------------------------------- files


def sha256_path(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_packed_file(path: str | Path) -> bool:
    return str(path).endswith(PACKED_SUFFIX)


def packed_name(name: str) -> str:
    return name[: -len(".safetensors")] + PACKED_SUFFIX


_Tensor = tuple[str, str, list[int], int, int]  # name, dtype, shape, begin, end (SafetensorsHeader.tensors)


def _segments(header: SafetensorsHeader) -> list[tuple[int, int, Optional[_Tensor]]]:
    """The data section in offset order: each tensor's bytes, and the gaps no tensor covers as raw segments."""
    cursor = 0
    segments: list[tuple[int, int, Optional[_Tensor]]] = []
    for tensor in header.tensors:
        if tensor[3] > cursor:
            segments.append((cursor, tensor[3], None))
        segments.append((tensor[3], tensor[4], tensor))
        cursor = max(cursor, tensor[4])
    if cursor < header.data_len:
        segments.append((cursor, header.data_len, None))
    return segments


class _Parts:
    """The packed file's payload, written to a scratch file part by part, with each part's label and span."""

    def __init__(self, scratch: BinaryIO) -> None:
        self.scratch = scratch
        self.spans: list[tuple[str, int, int]] = []
        self.offset = 0

    def add(self, label: str, payload: bytes | memoryview) -> None:
        size = len(payload) if isinstance(payload, bytes) else payload.nbytes
        self.scratch.write(payload)
        self.spans.append((label, self.offset, self.offset + size))
        self.offset += size


_Payloads = list[tuple[str, "bytes | memoryview"]]


def _encode_segment(index: int, raw: np.ndarray, tensor: Optional[_Tensor],
                    sparse_min_zero_fraction: float) -> tuple[dict[str, Any], _Payloads]:
    """One segment's description entry (raw, dense or sparse) and its encoded parts, in file order."""
    payloads: _Payloads = []

    def plane(label: str, data: np.ndarray) -> list[str]:
        codec, payload = _encode_plane(data)
        payloads.append((label, payload))
        return [label, codec]

    width = DTYPE_WIDTH.get(tensor[1]) if tensor else None
    entry: dict[str, Any] = {} if tensor is None else {"name": tensor[0]}
    if width is None or raw.size == 0:
        return entry | {"kind": "raw", "planes": [plane(f"{index}.r", np.ascontiguousarray(raw))]}, payloads
    words = raw.view(f"<u{width}")
    nonzero = words != 0
    nnz = int(np.count_nonzero(nonzero))
    n = words.size
    if (n - nnz) >= sparse_min_zero_fraction * n and nnz * width + (n + 7) // 8 < n * width:
        mask = plane(f"{index}.m", np.packbits(nonzero, bitorder="little"))
        entry.update(kind="sparse", width=width, nnz=nnz, mask=mask)
        values = words[nonzero]
    else:
        entry.update(kind="dense", width=width)
        values = words
    del nonzero
    entry["planes"] = [plane(f"{index}.p{j}", data) for j, data in enumerate(_byte_planes(values, width))]
    return entry, payloads


def pack_file(src: str | Path, dst: str | Path, sparse_min_zero_fraction: float = 0.1, *,
              fsync: bool = True, workers: Optional[int] = None) -> dict[str, Any]:
    """Pack one safetensors file. Returns {sha256, size, packed_size, packed_sha256, tensors, sparse_tensors}.

    A tensor is stored as mask + values when at least `sparse_min_zero_fraction` of its elements are zero and
    that is smaller than storing it dense.

    The source is read once: its sha256 is `perp.io.hashing.cached_sha256`'s when that cache holds it for the
    file as it is (same path, size, mtime), else it is computed from the bytes read for packing. `packed_sha256`
    (the sha256 of `dst`) is computed while `dst` is written. Both digests are recorded in that cache, so
    `cached_sha256` of either file costs no read. A source that changes while it is packed is an error.
    `fsync=False` skips flushing `dst` to disk (for a temporary file that is uploaded and removed). `workers`:
    threads that encode tensors (default `default_workers()`); the output does not depend on it.
    """
    from perp.io.hashing import lookup_sha256, seed_sha256

    src, dst = Path(src), Path(dst)
    before = src.stat()
    header = SafetensorsHeader(src)
    source_sha = lookup_sha256(src)
    source_hash, hashed = None, 0
    if source_sha is None:  # hash the source as it is read for packing (the header bytes, then every segment)
        source_hash = hashlib.sha256(struct.pack("<Q", len(header.header_bytes)) + header.header_bytes)
        hashed = header.data_start
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = (np.memmap(src, dtype=np.uint8, mode="r", offset=header.data_start, shape=(header.data_len,))
            if header.data_len else np.zeros(0, dtype=np.uint8))
    segments = _segments(header)

    def encode(index: int) -> tuple[dict[str, Any], _Payloads]:
        begin, end, tensor = segments[index]
        return _encode_segment(index, data[begin:end], tensor, sparse_min_zero_fraction)

    with tempfile.TemporaryFile(dir=dst.parent) as scratch:
        parts = _Parts(scratch)
        entries = []
        with contextlib.closing(_ordered_map(encode, range(len(segments)), workers or default_workers())) as encoded:
            for (begin, end, _), (entry, payloads) in zip(segments, encoded):
                if source_hash is not None:
                    source_hash.update(data[begin:end].data)
                    hashed += end - begin
                for label, payload in payloads:
                    parts.add(label, payload)
                entries.append({"begin": begin, "end": end} | entry)
        if source_hash is not None:
            if hashed != header.file_size:  # the segments tile the data section; this guards that invariant
                raise SparseFormatError(f"{src}: hashed {hashed} bytes of {header.file_size}")
            source_sha = source_hash.hexdigest()
        description = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "source": {"sha256": source_sha, "size": header.file_size,
                       "header_b64": base64.b64encode(header.header_bytes).decode()},
            "entries": entries,
        }
        after = src.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise SparseFormatError(f"{src} changed while it was being packed")
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        try:
            packed_sha = _write_safetensors(tmp, parts.spans, scratch,
                                            {METADATA_KEY: json.dumps(description, separators=(",", ":"))}, fsync)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    if source_hash is not None:
        assert source_sha is not None
        seed_sha256(src, source_sha, before)
    packed_stat = dst.stat()
    seed_sha256(dst, packed_sha, packed_stat)
    sparse_count = sum(entry["kind"] == "sparse" for entry in entries)
    return {"sha256": source_sha, "size": header.file_size, "packed_size": packed_stat.st_size,
            "packed_sha256": packed_sha, "tensors": len(header.tensors), "sparse_tensors": sparse_count}


def read_packed_description(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types
        raise SparseFormatError(f"{path}: not a perp-sparse file ({str(error).splitlines()[0]})") from None
    try:
        description = json.loads(metadata[METADATA_KEY])
    except (KeyError, ValueError):
        raise SparseFormatError(f"{path}: not a perp-sparse file (no '{METADATA_KEY}' metadata)") from None
    if description.get("format") != FORMAT or description.get("version") != FORMAT_VERSION:
        raise SparseFormatError(f"{path}: unsupported format {description.get('format')} "
                                f"v{description.get('version')} (this perp reads {FORMAT} v{FORMAT_VERSION})")
    return description


def unpack_file(src: str | Path, dst: str | Path, expected_sha256: Optional[str] = None, *,
                workers: Optional[int] = None) -> dict[str, Any]:
    """Rebuild the original safetensors file from a packed one, byte for byte; verifies its sha256. `workers`:
    threads that decode tensors (default `default_workers()`)."""
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    description = read_packed_description(src)
    source = description["source"]
    if expected_sha256 is not None and expected_sha256 != source["sha256"]:
        raise SparseFormatError(f"{src}: packs a file with sha256 {source['sha256']}, expected {expected_sha256}")
    header_bytes = base64.b64decode(source["header_b64"])
    entries = _tiling_entries(description["entries"], src)
    rebuilt_size = 8 + len(header_bytes) + (entries[-1]["end"] if entries else 0)
    if rebuilt_size != source["size"]:
        raise SparseFormatError(f"{src}: rebuilt {rebuilt_size} bytes, expected {source['size']}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with safe_open(str(src), framework="np") as packed, open(tmp, "wb") as out:
            parts = _PackedParts(packed, src)
            for prefix in (struct.pack("<Q", len(header_bytes)), header_bytes):
                digest.update(prefix)
                out.write(prefix)
            with contextlib.closing(_ordered_map(parts.decode, entries, workers or default_workers())) as decoded:
                for chunk in decoded:  # one tensor at a time (plus those being decoded), never the whole file
                    digest.update(chunk)
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != source["sha256"]:
            raise SparseFormatError(f"{src}: rebuilt file has sha256 {digest.hexdigest()}, expected {source['sha256']}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"sha256": source["sha256"], "size": source["size"]}


def _tiling_entries(entries: list[dict[str, Any]], src: Path) -> list[dict[str, Any]]:
    """The entries in offset order, refused unless they tile the data section from its start."""
    ordered = sorted(entries, key=lambda e: e["begin"])
    cursor = 0
    for entry in ordered:
        if entry["begin"] != cursor:
            name = entry.get("name", f"gap@{entry['begin']}")
            raise SparseFormatError(f"{src}: tensor '{name}': entries do not tile the data section")
        cursor = entry["end"]
    return ordered


class _PackedParts:
    """A packed file's parts, read by label (one at a time: the reader is shared by the decoding threads)."""

    def __init__(self, packed: Any, src: Path) -> None:
        self.packed, self.src = packed, src
        self.lock = threading.Lock()

    def part(self, label: str) -> np.ndarray:
        try:
            with self.lock:
                return self.packed.get_tensor(label)
        except Exception:
            raise SparseFormatError(f"{self.src}: part '{label}' is missing or unreadable") from None

    def decode(self, entry: dict[str, Any]) -> memoryview:
        """The original bytes of one entry (a tensor, or a gap between tensors)."""
        begin, end = entry["begin"], entry["end"]
        what = f"{self.src}: tensor '{entry.get('name', f'gap@{begin}')}'"
        size = end - begin
        if entry["kind"] == "raw":
            label, codec = entry["planes"][0]
            return _decode_plane(codec, self.part(label), size, what).data
        width = entry["width"]
        n = size // width
        count = entry["nnz"] if entry["kind"] == "sparse" else n
        if len(entry["planes"]) != width:
            raise SparseFormatError(f"{what}: expected {width} byte planes")
        values = np.empty((count, width), dtype=np.uint8)
        for j, (label, codec) in enumerate(entry["planes"]):
            values[:, j] = _decode_plane(codec, self.part(label), count, what)
        words = values.view(f"<u{width}").reshape(-1)
        if entry["kind"] == "sparse":
            label, codec = entry["mask"]
            mask_bytes = _decode_plane(codec, self.part(label), (n + 7) // 8, what)
            mask = np.unpackbits(mask_bytes, count=n, bitorder="little").view(bool)
            if int(np.count_nonzero(mask)) != count:
                raise SparseFormatError(f"{what}: mask and values disagree")
            full = np.zeros(n, dtype=f"<u{width}")
            full[mask] = words
            words = full
        return words.view(np.uint8).data


# --------------------------------------------------------------------------------------------- directories


def _files(directory: Path) -> list[Path]:
    """Regular files under a directory, sorted; hidden files and directories (e.g. markers) are skipped."""
    return sorted(p for p in directory.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def pack_checkpoint(hf_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Pack a Hugging Face checkpoint directory. Returns the index, plus the dense and packed sizes."""
    from perp.io.atomic import atomic_directory

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise SparseFormatError(f"'{hf_dir}' is not a directory")
    files: dict[str, Any] = {}
    dense_bytes = packed_bytes = 0
    with atomic_directory(out_dir) as staging:
        for path in _files(hf_dir):
            rel = path.relative_to(hf_dir).as_posix()
            if rel == INDEX_FILE or is_packed_file(rel):
                raise SparseFormatError(f"'{hf_dir}' is already packed ({rel}); unpack it first")
            if rel.endswith(".safetensors"):
                info = pack_file(path, staging / packed_name(rel))
                files[rel] = {"kind": "packed", "packed": packed_name(rel), "sha256": info["sha256"],
                              "size": info["size"], "packed_size": info["packed_size"]}
            else:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, staging / rel)
                size = path.stat().st_size
                files[rel] = {"kind": "copy", "sha256": sha256_path(path), "size": size, "packed_size": size}
            dense_bytes += files[rel]["size"]
            packed_bytes += files[rel]["packed_size"]
        index = {"format": FORMAT, "version": FORMAT_VERSION, "files": files}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {**index, "dense_bytes": dense_bytes, "packed_bytes": packed_bytes,
            "ratio": packed_bytes / dense_bytes if dense_bytes else 1.0}


def unpack_checkpoint(packed_dir: str | Path, out_hf_dir: str | Path) -> dict[str, Any]:
    """Rebuild the dense checkpoint directory exactly; every file's sha256 is checked against the index."""
    from perp.io.atomic import atomic_directory

    packed_dir, out_hf_dir = Path(packed_dir), Path(out_hf_dir)
    index_path = packed_dir / INDEX_FILE
    if not index_path.is_file():
        raise SparseFormatError(f"'{packed_dir}' is not a packed checkpoint (no {INDEX_FILE})")
    try:
        index = json.loads(index_path.read_text())
        files = index["files"]
    except (ValueError, KeyError):
        raise SparseFormatError(f"{index_path}: corrupt index") from None
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise SparseFormatError(f"{index_path}: unsupported format {index.get('format')} v{index.get('version')}")
    with atomic_directory(out_hf_dir) as staging:
        for rel, info in sorted(files.items()):
            target = staging / _safe_relpath(rel)
            if info["kind"] == "packed":
                unpack_file(packed_dir / _safe_relpath(info["packed"]), target, expected_sha256=info["sha256"])
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(packed_dir / _safe_relpath(rel), target)
                actual = sha256_path(target)
                if actual != info["sha256"]:
                    raise SparseFormatError(f"{packed_dir / rel}: sha256 {actual} does not match {info['sha256']}")
    return index


def _safe_relpath(rel: str) -> str:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise SparseFormatError(f"unsafe path '{rel}' in a packed checkpoint index")
    return rel
