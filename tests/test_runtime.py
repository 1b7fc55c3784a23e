"""CPU runtime policies (perp/runtime.py): freed memory is reused inside `reuse_freed_memory`, and not after."""

from __future__ import annotations

import resource
import threading

import pytest
import torch

from perp import runtime
from perp.runtime import reuse_freed_memory

def _thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
            return "[always]" in handle.read()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(runtime._glibc() is None, reason="the policy needs glibc's malloc, untuned")

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


@pytest.mark.skipif(_thp_always(), reason="with transparent huge pages always on, faults count 2 MiB pages")
def test_freed_large_blocks_are_reused_inside_and_not_outside():
    outside = _faults()
    with reuse_freed_memory() as active:
        assert active
        inside = _faults()
    # by default each round maps fresh pages (glibc now and then keeps one block): most rounds fault every page
    assert outside > 0.6 * _CYCLES * _PAGES
    assert inside < 0.4 * _CYCLES * _PAGES


def test_policy_is_reference_counted_across_threads(monkeypatch):
    calls: list[tuple[int, int]] = []
    real_set = runtime._set
    monkeypatch.setattr(runtime, "_set", lambda libc, params: calls.append(params) or real_set(libc, params))
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
    assert held_after_inner == (1, [runtime._REUSE])
    assert runtime._STATE["holders"] == 0
    assert calls == [runtime._REUSE, runtime._AFTER]


def test_after_the_policy_mid_size_blocks_are_still_reused():
    """Leaving the policy must not leave malloc trimming every freed block (glibc's dynamic threshold is off
    for good once parameters are set)."""
    with reuse_freed_memory():
        pass
    size = 20 * 1024 * 1024
    for _ in range(2):
        torch.ones(size // 4).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(_CYCLES):
        torch.ones(size // 4).sum()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 0.4 * _CYCLES * (size // resource.getpagesize())  # not every round (glibc keeps a few)


def test_disabled_policy_does_nothing():
    with reuse_freed_memory(enabled=False) as active:
        assert not active
        assert runtime._STATE["holders"] == 0
