"""Wanda (Sun et al., 2023): score |W_ij| · ‖X_j‖₂, compared per output row (reference) or per matrix (PERP).

‖X_j‖₂ is the norm of input feature j over every calibration token, collected once per input group.
"""

from __future__ import annotations

import torch

from perp.prune.methods.base import METHODS, PruneMethod
from perp.prune.stats import GroupStats


@METHODS.register("wanda")
class Wanda(PruneMethod):
    name = "wanda"
    needs_colsq = True

    def score(self, weight: torch.Tensor, stats: GroupStats) -> torch.Tensor:
        assert stats.colsq is not None
        return weight.abs() * stats.colsq.sqrt().unsqueeze(0)
