"""The method interface and its registry."""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Optional

import torch

from perp.prune.patterns import PruneSpec, select_mask, zero_pruned_
from perp.prune.stats import GroupStats
from perp.plugins import Registry

class PrunedLinear(NamedTuple):
    weight: torch.Tensor  # fp32 [out, in], pruned positions exactly +0.0
    mask: torch.Tensor  # bool [out, in], True where pruned
    # ‖(W − Ŵ)X‖² and ‖WX‖² on the calibration inputs, when the method knows them exactly (SparseGPT)
    delta_energy: Optional[float] = None
    dense_energy: Optional[float] = None


#: name → PruneMethod subclass; the names equal `perp.config.PRUNE_METHODS`.
METHODS: Registry[type["PruneMethod"]] = Registry("prune.method")


class PruneMethod:
    """Prunes the Linears of one input group.

    Subclasses set `name` and which statistics they need (`needs_colsq`, `needs_hessian`), and implement either
    `score` (mask from a per-weight importance, weights otherwise unchanged) or `prune_group` (anything else).
    """

    name: ClassVar[str] = ""
    needs_colsq: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False

    def __init__(self, spec: PruneSpec) -> None:
        self.spec = spec
        self.notes: list[str] = []  # human-readable warnings for the report (e.g. extra dampening)

    @property
    def needs_calibration(self) -> bool:
        return self.needs_colsq or self.needs_hessian

    def score(self, weight: torch.Tensor, stats: GroupStats) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def prune_group(self, weights: dict[str, torch.Tensor], stats: GroupStats,
                    label: str = "") -> dict[str, PrunedLinear]:
        """name → fp32 weight [out, in] on the compute device (the method may modify it in place).

        Returns name → `PrunedLinear` (pruned weight, bool mask True where pruned; pruned positions hold exactly
        +0.0).
        """
        result = {}
        for name, weight in weights.items():
            pruned = select_mask(self.score(weight, stats), self.spec)
            result[name] = PrunedLinear(zero_pruned_(weight, pruned), pruned)
        return result


def create_method(name: str, spec: PruneSpec) -> PruneMethod:
    return METHODS.get(name)(spec)
