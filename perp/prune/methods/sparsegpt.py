"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with lazy batched updates, in fp32 on the compute device.

For every input group the Hessian H = XᵀX is shared: the Linears that read the same input (q/k/v; gate/up) are
stacked row-wise and pruned as one matrix, since the OBS update of a row only involves H. Each Linear still
gets its own mask budget.

The algorithm is the reference's:

1. dampen H by `percdamp` × mean(diag H), U = chol(H⁻¹) upper;
2. walk the columns in blocks of `blocksize`; unstructured masks are chosen at the start of a block from
   w² / U_jj² on the weights as updated so far; N:M masks at the first column of each group of M;
3. pruning column j sends err_j = w_j / U_jj into the later columns (w_k -= err_j · U_jk), within the block
   immediately, beyond it once per block (a GEMM).

Exact-count masks replace the reference's threshold (`<=` on a sorted value, which prunes one weight more per
block and more on ties): per block, `floor(s·cols_so_far)` per row (granularity row) or `floor(s·rows·cols_so_far)`
per Linear (granularity matrix, the reference's choice) minus what earlier blocks pruned, so the totals are
exact. Columns whose input is always zero ("dead": H_jj = 0) score 0, so their weights are pruned first: they
cost nothing on the calibration inputs, and pruning them sends no update to other columns. The reference zeroes
them all instead, which can exceed the target sparsity; a dead weight the budget keeps keeps its value. Their
diagonal is set to the mean of the live ones (the reference: 1), so that masks do not change when the same data
is repeated (H scales, and so do the dampening and every score).

Within a block, the sequential column updates run in leaves of a few columns: on CPU a tight per-column loop
(two ops per column); on GPUs a batched triangular solve per leaf. For row r with pruned set m_r the leaf's
errors solve E_r A_r = m_r ⊙ w_r with A_r = diag(U) + triu(U, 1) · diag(m_r) — the same recurrence, in one call.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    from scipy.linalg.blas import strmm as _strmm
    from scipy.linalg.lapack import strtri as _strtri
except ImportError:  # pragma: no cover - scipy is a dependency; torch's GEMM and triangular solve do the same job
    _strmm = _strtri = None

from perp.errors import PruneNumericsError
from perp.prune.methods.base import METHODS, PruneMethod, PrunedLinear
from perp.prune.patterns import PruneSpec, lowest_in_matrix, lowest_k, lowest_nm, pruned_per
from perp.prune.stats import GroupStats

_LEAF = 32  # columns per leaf (unstructured)
_SOLVE_BYTES = 256 * 1024 * 1024  # bound on the per-row triangular matrices of one leaf solve


@torch.no_grad()
def inverse_cholesky_upper(H: torch.Tensor, percdamp: float,
                           label: str = "") -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Factors of the dampened Hessian H + λI, λ = percdamp · mean(diag H). H is modified in place (dampened).

    Returns (C, U, λ, retries): C upper-triangular with C Cᵀ = H + λI, and U = C⁻¹, upper-triangular with
    UᵀU = (H + λI)⁻¹ — the reference's chol(H⁻¹). If H + λI is not numerically positive definite, λ grows
    tenfold (up to 5 times).

    The reference computes chol(H), inverts, and factors the inverse again. With J the exchange matrix and
    J H J = L Lᵀ, C = J L J is upper-triangular with C Cᵀ = H, so U = C⁻¹ (a Cholesky factor is unique): one
    Cholesky and one triangular inverse. On CPU LAPACK's strtri does the inverse (2.5–3.7× faster than the
    reference's three steps at d = 576–1536).
    """
    diag = H.diagonal()
    dead = diag == 0
    live = int(diag.numel() - int(dead.sum()))
    fill = float(diag.sum()) / live if live else 1.0  # scales with H, unlike the reference's 1
    diag.masked_fill_(dead, fill if fill > 0 else 1.0)  # no boolean indexing
    damp = percdamp * float(diag.mean())
    diag.add_(damp)
    total = damp
    for retry in range(6):
        factor, info = torch.linalg.cholesky_ex(H.flip(0, 1))
        if int(info) == 0:
            upper_factor = factor.flip(0, 1)
            del factor
            inverse = _triangular_inverse(upper_factor)
            if inverse is not None and bool(torch.isfinite(inverse).all()):
                return upper_factor, inverse, total, retry
        diag.add_(9.0 * total)  # λ → 10 λ
        total *= 10.0
    raise PruneNumericsError(
        f"{label or 'a Linear group'}: the calibration Hessian is not positive definite even with dampening "
        f"{total:.3g} (prune.percdamp={percdamp}); use more or more varied calibration text"
    )


def _lapack_ok(*tensors: torch.Tensor) -> bool:
    """scipy's single-precision routines apply: fp32 tensors on the CPU."""
    return _strtri is not None and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _triangular_inverse(upper: torch.Tensor) -> Optional[torch.Tensor]:
    if _lapack_ok(upper):
        inverse, info = _strtri(upper.numpy(), lower=0, unitdiag=0, overwrite_c=0)
        return torch.from_numpy(inverse) if info == 0 else None
    eye = torch.eye(upper.shape[0], dtype=upper.dtype, device=upper.device)
    return torch.linalg.solve_triangular(upper, eye, upper=True)


def _times_upper_squared_rows(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """‖(W C)_r‖² per row r, C upper-triangular: on CPU through BLAS strmm (half the flops of a GEMM)."""
    if _lapack_ok(W, C):
        # W row-major [R, d] is column-major Wᵀ [d, R], C row-major is column-major Cᵀ (lower): (W C)ᵀ = Cᵀ Wᵀ
        product = _strmm(1.0, C.detach().numpy().T, W.detach().numpy().T, side=0, lower=1, trans_a=0, diag=0,
                         overwrite_b=0)
        return torch.from_numpy(product).pow_(2).sum(0)
    return (W @ C).pow_(2).sum(1)


def _leaf_loop(W: torch.Tensor, P: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Sequential OBS over the leaf's columns. W [c, R] (transposed weights, updated in place), P [c, R] pruned,
    U [c, c]. Returns the errors E [c, R]; W's pruned entries are left for the caller to zero."""
    scaled = P.to(W.dtype).div_(U.diagonal().unsqueeze(1))
    E = torch.empty_like(W)
    count = W.shape[0]
    for j in range(count):
        torch.mul(W[j], scaled[j], out=E[j])
        if j + 1 < count:
            W[j + 1:].addr_(U[j, j + 1:], E[j], alpha=-1.0)
    return E


def _leaf_solve(W: torch.Tensor, P: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """The same recurrence as `_leaf_loop`, as one batched triangular solve per chunk of rows."""
    count, rows = W.shape
    strict = torch.triu(U, diagonal=1)
    diag = torch.diag_embed(U.diagonal())
    E = torch.empty_like(W)
    chunk = max(1, _SOLVE_BYTES // (4 * count * count))
    for r1 in range(0, rows, chunk):
        r2 = min(rows, r1 + chunk)
        mask = P[:, r1:r2].t().to(W.dtype)  # [r, c]
        A = strict.unsqueeze(0) * mask.unsqueeze(1) + diag  # [r, c, c]: column i of triu scaled by m_r[i]
        B = (W[:, r1:r2].t() * mask).unsqueeze(1)  # [r, 1, c]
        E[:, r1:r2] = torch.linalg.solve_triangular(A, B, upper=True, left=False).squeeze(1).t()
    W.addmm_(U.t(), E, alpha=-1.0)
    return E


class _Budget:
    """Exact per-block pruning counts for one Linear: cumulative floor(s · size so far) differences."""

    def __init__(self, rows: int, sparsity: float, granularity: str) -> None:
        self.rows, self.sparsity, self.granularity = rows, sparsity, granularity

    def count(self, i1: int, i2: int) -> int:
        if self.granularity == "row":
            return pruned_per(i2, self.sparsity) - pruned_per(i1, self.sparsity)
        return pruned_per(self.rows * i2, self.sparsity) - pruned_per(self.rows * i1, self.sparsity)


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, spec: PruneSpec, row_splits: Optional[list[int]] = None,
                    solver: str = "auto", label: str = "") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune the stacked weights W [R, d] (fp32, any device) given the Hessian H [d, d] of their shared input.

    `row_splits` are the row counts of the stacked Linears (each gets its own mask budget). H is not modified.
    Returns (pruned W [R, d], pruned mask [R, d], info).
    """
    rows, cols = W.shape
    row_splits = row_splits or [rows]
    if solver == "auto":
        solver = "solve" if W.is_cuda else "loop"
    leaf_fn = _leaf_solve if solver == "solve" else _leaf_loop
    damped = H.clone()
    alive = (H.diagonal() != 0).to(torch.float32)  # dead columns score 0: pruned first, for free
    C, U, damp, retries = inverse_cholesky_upper(damped, spec.percdamp, label)
    added = damped.diagonal() - H.diagonal()  # λ on every column, the fill + λ on dead ones
    del damped
    dense_row_energy = _times_upper_squared_rows(W, C)  # ‖W_r C‖² = W_r (H + D) W_rᵀ
    del C
    row_energy = torch.zeros(rows, dtype=torch.float32, device=W.device)

    WT = W.t().clone(memory_format=torch.contiguous_format)  # [d, R], a column of W a row; never W's storage
    PT = torch.zeros_like(WT, dtype=torch.bool)
    nm = spec.nm
    blocksize = spec.blocksize
    if nm:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    budgets = [_Budget(r, spec.sparsity, spec.granularity) for r in row_splits]
    bounds = torch.tensor([0, *row_splits]).cumsum(0).tolist()

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        Wb, Pb, Ub = WT[i1:i2], PT[i1:i2], U[i1:i2, i1:i2]
        Eb = torch.empty_like(Wb)
        inv_d2 = (Ub.diagonal().pow(-2) * alive[i1:i2]).unsqueeze(1)  # score = w² / U_jj², 0 on dead columns
        if nm:
            n, m = nm
            leaves = range(0, i2 - i1, m)
        else:
            _select_block(Wb, Pb, inv_d2, budgets, bounds, i1, i2, spec.granularity)
            leaves = range(0, i2 - i1, _LEAF)
        step = m if nm else _LEAF
        for l1 in leaves:
            l2 = min(l1 + step, i2 - i1)
            if nm:
                Pb[l1:l2] = lowest_nm(Wb[l1:l2].pow(2) * inv_d2[l1:l2], n, m, dim=0)  # [m, R]
            Eb[l1:l2] = leaf_fn(Wb[l1:l2], Pb[l1:l2], Ub[l1:l2, l1:l2])
            if l2 < i2 - i1:
                Wb[l2:].addmm_(Ub[l1:l2, l2:].t(), Eb[l1:l2], alpha=-1.0)
        Wb.masked_fill_(Pb, 0.0)
        row_energy += Eb.pow(2).sum(0)
        if i2 < cols:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), Eb, alpha=-1.0)
    info = {"damp": damp, "damp_retries": retries, "row_energy": row_energy, "added_diagonal": added,
            "dense_row_energy": dense_row_energy}
    return WT.t().contiguous(), PT.t().contiguous(), info


def undamped(energy_damped: torch.Tensor, W: torch.Tensor, added_diagonal: torch.Tensor) -> float:
    """tr(W H Wᵀ) from tr(W (H + D) Wᵀ) (summed over rows), D = diag(`added_diagonal`) the dampening.

    Sums in fp64. When the difference is lost in the rounding of its terms (inputs that never fire: H ≈ 0), 0."""
    damped = float(energy_damped.double().sum())
    dampening = float((W.double().pow(2).sum(0) * added_diagonal.double()).sum())
    value = damped - dampening
    return value if value > 1e-5 * max(damped, dampening) else 0.0


def delta_energy(original: torch.Tensor, pruned: torch.Tensor, row_energy: torch.Tensor,
                 added_diagonal: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖² = tr(ΔW H ΔWᵀ) of rows pruned together, from the OBS errors instead of a GEMM with H.

    The column updates make ΔW = E·U (E the errors, one per pruned weight, zero elsewhere; U the upper Cholesky
    factor of (H + D)⁻¹), and U (H + D) Uᵀ = I, so tr(ΔW (H + D) ΔWᵀ) = ‖E‖². The dampening D is diagonal,
    hence tr(ΔW H ΔWᵀ) = ‖E‖² − Σ_j D_jj ‖ΔW_:j‖²; `row_energy` holds ‖E_r‖² per row.
    """
    return undamped(row_energy, original - pruned, added_diagonal)


def _select_block(Wb: torch.Tensor, Pb: torch.Tensor, inv_d2: torch.Tensor, budgets: list[_Budget],
                  bounds: list[int], i1: int, i2: int, granularity: str) -> None:
    """Unstructured mask of one block [c, R], chosen from w² · `inv_d2` (1 / U_jj², 0 on dead columns) with exact
    counts per row or per Linear."""
    score = Wb.pow(2) * inv_d2
    for budget, r1, r2 in zip(budgets, bounds[:-1], bounds[1:]):
        k = budget.count(i1, i2)
        if k <= 0:
            continue
        part = score[:, r1:r2]
        if granularity == "row":
            Pb[:, r1:r2] = lowest_k(part, k, dim=0)
        else:
            # per Linear: k lowest in the block, in row-major order of the Linear's weights (W[r, j])
            Pb[:, r1:r2] = lowest_in_matrix(part.t().contiguous(), k).t()


@METHODS.register("sparsegpt")
class SparseGPT(PruneMethod):
    name = "sparsegpt"
    needs_hessian = True
    solver = "auto"

    @torch.no_grad()
    def prune_group(self, weights: dict[str, torch.Tensor], stats: GroupStats,
                    label: str = "") -> dict[str, PrunedLinear]:
        assert stats.hessian is not None
        names = list(weights)
        stacked = torch.cat([weights[name] for name in names]) if len(names) > 1 else weights[names[0]]
        splits = [weights[name].shape[0] for name in names]
        pruned_w, pruned_m, info = sparsegpt_prune(stacked, stats.hessian, self.spec, splits, self.solver, label)
        if info["damp_retries"]:
            self.notes.append(f"{label}: Hessian needed {info['damp_retries']} extra dampening step(s) "
                              f"(λ = {info['damp']:.3g})")
        result, start = {}, 0
        for name, count in zip(names, splits):
            weight, mask = pruned_w[start:start + count], pruned_m[start:start + count]
            rows = slice(start, start + count)
            energy = delta_energy(weights[name], weight, info["row_energy"][rows], info["added_diagonal"])
            dense = undamped(info["dense_row_energy"][rows], weights[name], info["added_diagonal"])
            result[name] = PrunedLinear(weight, mask, energy, dense)
            start += count
        return result
