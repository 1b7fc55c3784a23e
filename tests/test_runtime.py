"""CPU runtime policies (perp/runtime.py): freed memory is reused inside `reuse_freed_memory`, and not after."""

from __future__ import annotations

import resource
import threading

import pytest
import torch

from perp import runtime
from perp.runtime import reuse_freed_memory

pytestmark = pytest.mark.skipif(runtime._glibc() is None, reason="the policy needs glibc's malloc")

_BYTES = 96 * 1024 * 1024  # above glibc's largest mmap threshold (32 MiB)
_PAGES = _BYTES // resource.getpagesize()
_CYCLES = 10


def _faults(cycles: int = _CYCLES) -> int:
    """Minor page faults taken by `cycles` allocate-fill-free rounds of one large tensor, after two warm-up rounds
    (glibc's aligned allocations settle in the heap within a few rounds)."""
    for _ in range(2):
        torch.ones(_BYTES // 4).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        torch.ones(_BYTES // 4).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_large_blocks_are_reused_inside_and_not_outside():
    outside = _faults()
    with reuse_freed_memory() as active:
        assert active
        inside = _faults()
    # by default each round maps fresh pages (glibc now and then keeps one block): most rounds fault every page
    assert outside > _CYCLES * _PAGES // 2
    assert inside < _CYCLES * _PAGES // 4


def test_policy_is_reference_counted_across_threads(monkeypatch):
    calls: list[tuple[int, int]] = []
    real_set = runtime._set
    monkeypatch.setattr(runtime, "_set", lambda libc, mmap_max, trim: calls.append((mmap_max, trim))
                        or real_set(libc, mmap_max, trim))
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with reuse_freed_memory():
            entered.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait(30)
    with reuse_freed_memory():
        pass  # an inner holder leaving must not restore the defaults while another still holds
    held_after_inner = (runtime._STATE["holders"], list(calls))
    release.set()
    holder.join()
    assert held_after_inner == (1, [(0, runtime._NEVER_TRIM)])
    assert runtime._STATE["holders"] == 0
    assert calls == [(0, runtime._NEVER_TRIM), (runtime._DEFAULT_MMAP_MAX, runtime._DEFAULT_TRIM_THRESHOLD)]


def test_disabled_policy_does_nothing():
    with reuse_freed_memory(enabled=False) as active:
        assert not active
        assert runtime._STATE["holders"] == 0
