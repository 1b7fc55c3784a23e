"""CPU runtime policies for long compute jobs: memory reuse and BLAS thread spinning.

**Freed memory.** glibc's malloc serves every request above its mmap threshold (at most 32 MiB on 64-bit) with
a fresh `mmap` and returns it with `munmap` on free. A calibration forward on CPU allocates and frees tensors of
40–100 MB per op (16k tokens × hidden), so each elementwise op pays for faulting and zeroing its output pages:
measured on one SmolLM2 decoder layer, 0.69 s per forward, of which ~0.15 s is page faults. Inside
`reuse_freed_memory()` the main thread's malloc arena serves large blocks from its heap and does not trim it, so
a freed block is reused at once (0.53 s per forward, the same numbers bit for bit). Other threads have their own
arenas, whose heaps are capped at 64 MiB: there glibc still maps blocks above that, so the gain is smaller.

Setting these parameters switches glibc's dynamic mmap threshold off for the rest of the process, so on exit the
policy does not return to the built-in defaults (a 128 KiB trim threshold would then hand every freed block at
the top of the heap back to the OS); it sets what the dynamic scheme reaches on a process that handles large
tensors: mmap above 32 MiB, trim above 64 MiB, then `malloc_trim` returns the free memory. Only on Linux with
glibc's malloc, and never when the user tuned malloc (`GLIBC_TUNABLES` with `glibc.malloc`, `MALLOC_*_`) or
preloads another allocator; elsewhere it does nothing. Process-wide, so it is reference-counted: concurrent jobs
in one process (a sweep on a thread pool) leave the policy when the last one does.

**BLAS spinning.** `perp/__init__.py` defaults `OPENBLAS_THREAD_TIMEOUT` to 4 (2^4 cycles): numpy's and
scipy's OpenBLAS workers otherwise spin for ~2^28 cycles (~0.1 s) after every call before they sleep, and on a
CPU node they then compete with torch's threads (measured: SparseGPT's calibration forwards 2.7 s slower over
SmolLM2's 30 layers, the Linears right after each scipy call up to 2x slower). The variable is read when OpenBLAS
loads, so it only takes effect if perp is imported before numpy/torch (the `perp` CLI always is); a value already
in the environment wins. It is set in `os.environ`, so subprocesses (lm-eval workers, dvc) inherit it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from typing import Iterator, Optional

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_AFTER_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's dynamic threshold at its cap
_AFTER_TRIM_THRESHOLD = 2 * _AFTER_MMAP_THRESHOLD  # ... and the trim threshold it keeps with it
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top is kept
_USER_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                    "MALLOC_ARENA_MAX")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_LOCK = threading.Lock()
_STATE = {"holders": 0}
_LIBC: list[Optional[ctypes.CDLL]] = []


def _user_tuned_malloc() -> bool:
    env = os.environ
    return ("glibc.malloc" in env.get("GLIBC_TUNABLES", "") or any(name in env for name in _USER_MALLOC_ENV)
            or any(name in env.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS))


def _glibc() -> Optional[ctypes.CDLL]:
    """glibc, when it is the allocator in use and the user left its malloc parameters alone; else None."""
    if not _LIBC:
        libc = None
        if sys.platform.startswith("linux") and not _user_tuned_malloc():
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


def _set(libc: ctypes.CDLL, params: dict[int, int]) -> None:
    for param, value in params.items():
        libc.mallopt(param, value)


_REUSE = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: _NEVER_TRIM}
_AFTER = {_M_MMAP_MAX: _DEFAULT_MMAP_MAX, _M_MMAP_THRESHOLD: _AFTER_MMAP_THRESHOLD,
          _M_TRIM_THRESHOLD: _AFTER_TRIM_THRESHOLD}


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, freed CPU memory stays in the heap for reuse. Yields whether the policy is active."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _LOCK:
        if _STATE["holders"] == 0:
            _set(libc, _REUSE)
        _STATE["holders"] += 1
    try:
        yield True
    finally:
        with _LOCK:
            _STATE["holders"] -= 1
            if _STATE["holders"] == 0:
                _set(libc, _AFTER)
                libc.malloc_trim(0)
