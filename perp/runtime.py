"""CPU runtime policies for long compute jobs: memory reuse and BLAS thread spinning.

**Freed memory.** glibc's malloc serves every request above its mmap threshold (at most 32 MiB on 64-bit) with
a fresh `mmap` and returns it with `munmap` on free. A calibration forward on CPU allocates and frees tensors of
40–100 MB per op (16k tokens × hidden), so each elementwise op pays for faulting and zeroing its output pages:
measured on one SmolLM2 decoder layer, 0.69 s per forward, of which ~0.15 s is page faults. Inside
`reuse_freed_memory()` malloc takes every block from its heap and does not trim it, so a freed block is reused
at once (0.53 s per forward, the same numbers bit for bit). On exit the defaults come back and `malloc_trim`
returns the free memory to the OS. Only on Linux with glibc; elsewhere (musl, macOS) it does nothing.
Process-wide, so it is reference-counted: concurrent jobs in one process (a sweep on a thread pool) restore the
defaults when the last one leaves.

**BLAS spinning.** `perp/__init__.py` defaults `OPENBLAS_THREAD_TIMEOUT` to 4 (2^4 cycles): numpy's and
scipy's OpenBLAS workers otherwise spin for ~2^28 cycles (~0.1 s) after every call before they sleep, and on a
CPU node they then compete with torch's threads (measured: SparseGPT's calibration forwards 2.7 s slower over
SmolLM2's 30 layers, the Linears right after each scipy call up to 2x slower). The variable is read when OpenBLAS
loads, so it only takes effect if perp is imported before numpy/torch (the `perp` CLI always is); a value already
in the environment wins.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import threading
from typing import Iterator, Optional

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top is kept

_LOCK = threading.Lock()
_STATE = {"holders": 0}
_LIBC: list[Optional[ctypes.CDLL]] = []


def _glibc() -> Optional[ctypes.CDLL]:
    if not _LIBC:
        libc = None
        if sys.platform.startswith("linux"):
            try:
                candidate = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                candidate.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such symbol)
                candidate.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                candidate.malloc_trim.argtypes = [ctypes.c_size_t]
                libc = candidate
            except (OSError, AttributeError):
                libc = None
        _LIBC.append(libc)
    return _LIBC[0]


def _set(libc: ctypes.CDLL, mmap_max: int, trim_threshold: int) -> bool:
    return bool(libc.mallopt(_M_MMAP_MAX, mmap_max)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, freed CPU memory stays in the heap for reuse. Yields whether the policy is active."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _LOCK:
        if _STATE["holders"] == 0:
            _set(libc, 0, _NEVER_TRIM)
        _STATE["holders"] += 1
    try:
        yield True
    finally:
        with _LOCK:
            _STATE["holders"] -= 1
            if _STATE["holders"] == 0:
                _set(libc, _DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
