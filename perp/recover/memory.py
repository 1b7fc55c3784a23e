"""Peak memory of a phase: CUDA's allocator peak on GPU, the process's peak resident set on CPU.

`stop()` returns the absolute peak; `baseline` is what was already held when the phase started (the loaded
model, libraries), so `peak - baseline` is what the phase itself added (gradients, optimizer state, activations).
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch


class PeakMemory:
    """`start()` resets the peak and records the baseline; `stop()` returns the peak in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"
        self.baseline = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = int(torch.cuda.memory_allocated(self.device))
            return
        _trim_heap()
        try:  # Linux: "5" resets VmHWM, the peak resident set size, to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "cpu_peak_rss_since_process_start"
        self.baseline = _status_bytes("VmRSS:") or 0

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = _status_bytes("VmHWM:")
        if peak is None:
            peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return peak


def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so the CPU peak measures this phase, not what came before."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
