"""Calibration statistics of one input group: Linears of a layer that read the same input (q/k/v; gate/up).

Collected in fp32 while the calibration windows stream through the layer, once per group, whatever the number of
Linears that share it:

- `colsq`: Σ_t x_tj² per input column j (Wanda's ‖X_j‖²);
- `hessian`: Σ_t x_t x_tᵀ (SparseGPT's H = XᵀX; its scale does not matter, dampening is relative);
- `sample`: a fixed, seeded subset of the input rows, to estimate the reconstruction error of methods that keep
  no Hessian.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

_CHUNK_BYTES = 64 * 1024 * 1024


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """a @ b with fp32 output; for half inputs on CUDA the products are exact and accumulated in fp32."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError) as error:  # older torch: no out_dtype
            if not _FP32_FALLBACK_WARNED:
                _FP32_FALLBACK_WARNED.append(True)
                warnings.warn(f"half-precision GEMM with fp32 output unavailable ({error}); Hessians accumulate "
                              f"through fp32 copies of the inputs, several times slower", RuntimeWarning, stacklevel=3)
            return None
    return None


_FP32_FALLBACK_WARNED: list[bool] = []


_BLAS_CONTROLLER: list = []
_BLAS_LOCK = threading.Lock()
_BLAS_REQUESTS: list[int] = []  # thread counts asked for by the blocks now inside `blas_threads`
_BLAS_ORIGINAL: list = []  # the threadpoolctl limiter that holds the limits from before the first request


def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries, rebuilt when Python has imported modules since (an
    import is how a new BLAS arrives; inspecting the process costs ~1 ms, too much for every block)."""
    modules = len(sys.modules)
    if not _BLAS_CONTROLLER or _BLAS_CONTROLLER[0][0] != modules:
        try:
            from threadpoolctl import ThreadpoolController

            controller = ThreadpoolController()
        except Exception:  # threadpoolctl missing or unable to inspect: BLAS keeps its own threads
            controller = None
        _BLAS_CONTROLLER[:] = [(len(sys.modules), controller)]
    return _BLAS_CONTROLLER[0][1]


@contextlib.contextmanager
def blas_threads(count: int) -> Iterator[None]:
    """Limit the OpenBLAS pools that numpy and scipy bring (not torch's) to `count` threads within the block.

    Their worker threads otherwise run as many threads as cores, more than torch may use. Process-wide, so
    concurrent blocks (a sweep on a thread pool) are combined: the smallest count asked for applies while any
    block is inside, and the original limits come back when the last one leaves, whatever the order.
    No-op without threadpoolctl."""
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with _BLAS_LOCK:
        _BLAS_REQUESTS.append(count)
        limiter = controller.limit(limits=min(_BLAS_REQUESTS), user_api="blas")
        if len(_BLAS_REQUESTS) == 1:
            _BLAS_ORIGINAL[:] = [limiter]
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_REQUESTS.remove(count)
            if _BLAS_REQUESTS:
                controller.limit(limits=min(_BLAS_REQUESTS), user_api="blas")
            else:
                _BLAS_ORIGINAL.pop().restore_original_limits()


def _syrk() -> Optional[Callable[..., np.ndarray]]:
    """scipy's BLAS ssyrk (XᵀX from one triangle: half the flops of a GEMM) limited to torch's thread count,
    or None without scipy (a GEMM then does the same job)."""
    try:
        from scipy.linalg import blas
    except ImportError:
        return None

    def syrk(*args: Any, **kwargs: Any) -> np.ndarray:
        with blas_threads(torch.get_num_threads()):
            return blas.ssyrk(*args, **kwargs)

    return syrk


class GroupStats:
    """Running statistics of one group's input, on the compute device."""

    def __init__(self, in_features: int, device: torch.device, colsq: bool = False, hessian: bool = False,
                 sample_index: Optional[torch.Tensor] = None) -> None:
        self.in_features = in_features
        self.tokens = 0
        self.colsq = torch.zeros(in_features, dtype=torch.float32, device=device) if colsq else None
        self._hessian: Optional[torch.Tensor] = None
        # On CPU the Hessian accumulates into one triangle of a column-major array through BLAS syrk.
        self._syrk = _syrk() if hessian and torch.device(device).type == "cpu" else None
        self._upper: Optional[np.ndarray] = None
        if self._syrk is not None:
            self._upper = np.zeros((in_features, in_features), dtype=np.float32, order="F")
        elif hessian:
            self._hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._sample_index = sample_index  # sorted global token positions (CPU int64), or None
        self._samples: list[torch.Tensor] = []
        self._sample: Optional[torch.Tensor] = None

    @torch.no_grad()
    def add(self, x: torch.Tensor, offset: int) -> None:
        """Accumulate a batch of inputs; `offset` is the global position of its first token (for sampling)."""
        x = x.reshape(-1, x.shape[-1])
        rows = x.shape[0]
        hessian_done = False
        if self._syrk is not None and self._upper is not None and x.device.type == "cpu":
            chunk = x.detach().to(torch.float32).contiguous()
            # x is [rows, d] row-major, so its numpy transpose [d, rows] is column-major: C += Xᵀ X, no copy
            self._upper = self._syrk(1.0, chunk.numpy().T, beta=1.0, c=self._upper, trans=0, lower=0, overwrite_c=1)
            hessian_done = True
        elif self._hessian is not None and x.dtype != torch.float32:
            product = _mm_fp32(x.t(), x)
            if product is not None:
                self._hessian += product
                hessian_done = True
        colsq_done = False
        if self.colsq is not None and x.is_cuda:
            # one pass that reads bf16 and accumulates in fp32 (the chunked path below reads x three times)
            self.colsq += torch.linalg.vector_norm(x, 2, dim=0, dtype=torch.float32).square_()
            colsq_done = True
        if (self.colsq is not None and not colsq_done) or (self._hessian is not None and not hessian_done):
            step = max(1, _CHUNK_BYTES // (4 * x.shape[1]))
            for start in range(0, rows, step):
                chunk = x[start:start + step].float()
                if self.colsq is not None and not colsq_done:
                    self.colsq += (chunk * chunk).sum(dim=0)
                if self._hessian is not None and not hessian_done:
                    self._hessian.addmm_(chunk.t(), chunk)
        self.tokens += rows
        self._add_sample(x, offset)

    @property
    def hessian(self) -> Optional[torch.Tensor]:
        """Σ x xᵀ over every token added so far (fp32, symmetric)."""
        if self._upper is not None:
            upper = torch.from_numpy(np.triu(self._upper))
            self._hessian = upper + torch.triu(upper, diagonal=1).t()
            self._upper = None
        return self._hessian

    def finite(self) -> bool:
        """Whether every statistic collected so far is finite (an overflowed forward leaves inf or NaN)."""
        if self.colsq is not None and not bool(torch.isfinite(self.colsq).all()):
            return False
        if self._upper is not None and not bool(np.isfinite(self._upper).all()):
            return False
        if self._hessian is not None and not bool(torch.isfinite(self._hessian).all()):
            return False
        sample = self.sample
        return sample is None or bool(torch.isfinite(sample).all())

    def _add_sample(self, x: torch.Tensor, offset: int) -> None:
        if self._sample_index is None:
            return
        lo = int(torch.searchsorted(self._sample_index, offset))
        hi = int(torch.searchsorted(self._sample_index, offset + x.shape[0]))
        if hi > lo:
            rows = (self._sample_index[lo:hi] - offset).to(x.device)
            self._samples.append(x.index_select(0, rows).float())

    @property
    def sample(self) -> Optional[torch.Tensor]:
        if self._sample is None and self._samples:
            self._sample = torch.cat(self._samples)
            self._samples = []
        return self._sample

    def free(self) -> None:
        self.colsq = self._hessian = self._upper = self._sample = None
        self._samples = []


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast here: a CUDA device of compute capability 8.0 or later, or a CPU with
    AVX512-BF16 or AMX (elsewhere oneDNN emulates them, ~60x slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere and later; earlier GPUs emulate bf16
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def sample_positions(total_tokens: int, budget: int, seed: int = 0) -> Optional[torch.Tensor]:
    """A sorted, seeded random subset of `budget` token positions out of `total_tokens` (all of them if fewer)."""
    if budget <= 0:
        return None
    if budget >= total_tokens:
        return torch.arange(total_tokens)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total_tokens, generator=generator)[:budget].sort().values


@torch.no_grad()
def relative_error(dense: torch.Tensor, pruned: torch.Tensor, stats: GroupStats, delta_energy: Optional[float] = None,
                   dense_energy: Optional[float] = None) -> tuple[float, str]:
    """‖WX − ŴX‖² / ‖WX‖² on the calibration inputs X: exact from the Hessian when the group kept one, else
    estimated on the sampled input rows. A method that already knows ‖WX − ŴX‖² (`delta_energy`) or ‖WX‖²
    (`dense_energy`) exactly (SparseGPT, from its factorisation) saves the GEMMs with H. Returns (value, how)."""
    if stats.hessian is not None or (delta_energy is not None and dense_energy is not None):
        H = stats.hessian
        if delta_energy is None:
            assert H is not None
            delta = dense - pruned
            delta_energy = float(((delta @ H) * delta).sum())
        if dense_energy is None:
            assert H is not None
            dense_energy = float(((dense @ H) * dense).sum())
        numerator, denominator = delta_energy, dense_energy
        how = "exact"
    elif stats.sample is not None:
        delta = dense - pruned
        rows = dense.shape[0]
        # One GEMM for WX and ΔWX; in bf16 where the hardware has it: the estimate's sampling noise dwarfs bf16
        # rounding (measured ~2e-5 relative on the ratio), and it halves the cost of this phase on CPU.
        dtype = torch.bfloat16 if native_bf16(dense.device) else torch.float32
        weights = torch.cat([dense, delta]).t().to(dtype)
        both = (stats.sample.to(dtype) @ weights).float().pow_(2)
        denominator, numerator = float(both[:, :rows].sum()), float(both[:, rows:].sum())
        how = "sampled"
    else:
        return float("nan"), "none"
    return (numerator / denominator if denominator > 0 else float("nan")), how
