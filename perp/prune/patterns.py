"""Mask selection: which weights a score prunes, with exact counts.

All functions take a score (lower = less important) and return a bool tensor that is True where a weight is
*pruned*. Counts are exact, never threshold-based, so ties cannot prune more than asked:

- per row: `floor(sparsity * in_features)` lowest scores in every output row (the Wanda reference);
- per matrix: `floor(sparsity * numel)` lowest scores in the whole matrix (the PERP reference);
- N:M: the `M - N` lowest scores in every group of `M` consecutive inputs of a row, so `N` of each `M` survive.

Ties are broken by position (as a stable sort would), so the same scores always give the same mask on every
device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch

Granularity = Literal["row", "matrix"]


@dataclass(frozen=True)
class PruneSpec:
    """What to prune in every selected Linear: the method-independent part of `PruneConfig`."""

    sparsity: float
    nm: Optional[tuple[int, int]] = None  # (N kept, M group size); None = unstructured
    granularity: Granularity = "row"
    blocksize: int = 128
    percdamp: float = 0.01

    @classmethod
    def from_config(cls, prune: object) -> "PruneSpec":
        return cls(sparsity=float(prune.sparsity), nm=prune.nm, granularity=prune.granularity,  # type: ignore[attr-defined]
                   blocksize=int(prune.blocksize), percdamp=float(prune.percdamp))  # type: ignore[attr-defined]

    @property
    def target_sparsity(self) -> float:
        return (self.nm[1] - self.nm[0]) / self.nm[1] if self.nm else self.sparsity

    @property
    def pattern(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else "unstructured"

    def pruned_count(self, rows: int, cols: int) -> int:
        """How many weights of a [rows, cols] matrix this spec prunes (what `select_mask` guarantees)."""
        if self.nm:
            n, m = self.nm
            return rows * (cols // m) * (m - n)
        if self.granularity == "row":
            return rows * pruned_per(cols, self.sparsity)
        return pruned_per(rows * cols, self.sparsity)


def pruned_per(count: int, sparsity: float) -> int:
    """floor(sparsity * count), robust to binary rounding (0.3 * 10 is 2.9999999999999996 in floats)."""
    return int(math.floor(sparsity * count + 1e-9))


def lowest_k(score: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """True at the `k` lowest entries along `dim` (ties: the first positions win, as with a stable sort).

    On CPU a selection (introselect) rather than a sort: O(n) per row, several times faster than sorting.
    """
    size = score.shape[dim]
    if k <= 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if k >= size:
        return torch.ones(score.shape, dtype=torch.bool, device=score.device)
    if score.device.type != "cpu" and score.numel() > 0:
        # On GPUs a sort is fast and exactly stable.
        order = torch.sort(score, dim=dim, stable=True).indices.narrow(dim, 0, k)
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter_(dim, order, True)
    kth = _kth_smallest(score, k, dim)
    pruned = score <= kth
    excess = pruned.sum(dim, keepdim=True) - k
    if bool(excess.any()):  # equal values straddle the boundary: keep the first ones (by position) pruned
        ties = score == kth
        pruned &= ~(ties & (ties.cumsum(dim) > ties.sum(dim, keepdim=True) - excess))
    return pruned


def _kth_smallest(score: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The k-th smallest value along `dim` (keepdim). numpy's introselect is ~3x faster than torch.kthvalue."""
    if score.dtype in (torch.float32, torch.float64) and not score.requires_grad:
        rows = score.detach().movedim(dim, -1).numpy()  # selection along a contiguous axis is faster
        part = np.partition(rows, k - 1, axis=-1)
        return torch.from_numpy(np.ascontiguousarray(part[..., k - 1:k])).movedim(-1, dim)
    return torch.kthvalue(score, k, dim=dim, keepdim=True).values


def _rank_small_groups(score: torch.Tensor) -> torch.Tensor:
    """Rank (0 = lowest) of each entry within its group along the last dim; ties by position. For small M."""
    m = score.shape[-1]
    rank = torch.zeros(score.shape, dtype=torch.uint8, device=score.device)
    for j in range(m):
        other = score[..., j:j + 1]
        rank += other < score
        if j + 1 < m:
            rank[..., j + 1:] += other == score[..., j + 1:]
    return rank


def lowest_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the `k` lowest scores of every row of a [rows, cols] score."""
    return lowest_k(score, k, dim=-1)


def lowest_in_matrix(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the `k` lowest scores of the whole matrix."""
    return lowest_k(score.reshape(-1), k).view(score.shape)


def lowest_nm(score: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Keep the `n` highest of every `m` consecutive scores along `dim` of a 2-D score (prune `m - n`)."""
    if dim in (0, -2):
        return lowest_nm(score.t(), n, m).t()
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M needs the input dimension ({cols}) to be divisible by M={m}")
    grouped = score.reshape(rows, cols // m, m)
    if score.is_cuda:
        pruned = _lowest_in_groups_sorted(grouped, m - n)
    elif m <= 16:
        pruned = _rank_small_groups(grouped) < (m - n)
    else:
        pruned = lowest_k(grouped, m - n, dim=-1)
    return pruned.reshape(rows, cols)


def _lowest_in_groups_sorted(grouped: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` lowest of each group along the last dim, ties by position, as `_rank_small_groups(g) < k`, in
    three kernels: on a GPU the rank loop's ~4·M small kernels per call dominate SparseGPT's N:M leaves."""
    order = torch.argsort(grouped, dim=-1, stable=True)
    pruned = torch.zeros(grouped.shape, dtype=torch.bool, device=grouped.device)
    return pruned.scatter_(-1, order[..., :k], True)


def select_mask(score: torch.Tensor, spec: PruneSpec) -> torch.Tensor:
    """The pruned positions of one matrix under `spec` (True = pruned)."""
    if spec.nm:
        return lowest_nm(score, *spec.nm)
    if spec.granularity == "row":
        return lowest_per_row(score, pruned_per(score.shape[1], spec.sparsity))
    return lowest_in_matrix(score, pruned_per(score.numel(), spec.sparsity))


def zero_pruned_(weight: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Write +0.0 at pruned positions (never -0.0: `w * 0` keeps the sign bit of negative weights)."""
    return weight.masked_fill_(pruned, 0.0)
