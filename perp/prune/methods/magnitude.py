"""Magnitude pruning: remove the smallest |W|, per output row or per matrix (no calibration needed)."""

from __future__ import annotations

import torch

from perp.prune.methods.base import METHODS, PruneMethod
from perp.prune.stats import GroupStats


@METHODS.register("magnitude")
class Magnitude(PruneMethod):
    name = "magnitude"

    def score(self, weight: torch.Tensor, stats: GroupStats) -> torch.Tensor:
        return weight.abs()
