"""OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): a sparsity per decoder layer instead of one.

Layers whose Wanda scores |W_ij|·‖X_j‖ hold more outliers are pruned less. On the dense model, over the calibration
windows:

1. per layer, the outlier ratio D_l: the share of the layer's scores (all its selected Linears together) above
   `m` × their mean;
2. D scaled to [0, 2λ], centred: density_l = D'_l − mean(D') + (1 − sparsity), so the layer sparsities average
   to the target and lie within sparsity ± 2λ (± λ when the ratios spread evenly).

Step 1 is one dense forward of the calibration set, one layer on the device at a time (the engine's pieces).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from perp.models.families import FamilyAdapter
from perp.models.placement import Visit
from perp.prune.selection import LayerPlan, decoder_layers
from perp.prune.stats import GroupStats


@torch.no_grad()
def outlier_ratios(model: nn.Module, family: FamilyAdapter, plans: Sequence[LayerPlan], inputs, m: float,
                   device: torch.device, autocast_for: Callable[[nn.Module], Optional[torch.dtype]],
                   offload: bool = True) -> dict[int, float]:
    """Layer index → share of its Wanda scores above m × their mean, on the dense model. `inputs` (the first
    layer's captured `LayerInputs`) is consumed: it ends as the last planned layer's outputs."""
    from perp.prune.engine import propagate  # the engine imports this module

    layers = decoder_layers(model, family)
    ratios: dict[int, float] = {}
    last = max((plan.index for plan in plans if plan.groups), default=-1)
    for plan in plans[:last + 1]:  # layers with nothing selected still feed the ones after them
        layer = layers[plan.index]
        visit = Visit(layer, device)
        linears = family.linears(layer)
        stats = [GroupStats(linears[group[0]].in_features, device, colsq=True) for group in plan.groups]
        handles = [linears[group[0]].register_forward_pre_hook(_adder(stat, device))
                   for group, stat in zip(plan.groups, stats)]
        try:
            propagate(layer, inputs, in_place=True, autocast_dtype=autocast_for(layer))
            if plan.groups:  # while the weights are still on the device, where the statistics are
                ratios[plan.index] = _outlier_share(linears, plan.groups, stats, m)
        finally:
            for handle in handles:
                handle.remove()
            if offload:
                visit.end(write_back=False)  # a dense, read-only pass
    return ratios


def _adder(stat: GroupStats, device: torch.device) -> Callable:
    def hook(module: nn.Module, args: tuple) -> None:
        with torch.autocast(device_type=device.type, enabled=False):
            stat.add(args[0], 0)

    return hook


def _outlier_share(linears: dict[str, nn.Linear], groups: list[list[str]], stats: list[GroupStats], m: float) -> float:
    """Two passes over the layer's Linears (mean, then count) so no concatenated score matrix is built."""
    def scores() -> Iterator[torch.Tensor]:
        for group, stat in zip(groups, stats):
            assert stat.colsq is not None
            for name in group:
                yield linears[name].weight.detach().float().abs() * stat.colsq.sqrt().unsqueeze(0)

    total = count = 0
    score_sum = 0.0
    for score in scores():
        score_sum += float(score.double().sum())
        total += score.numel()
    threshold = m * score_sum / total
    for score in scores():
        count += int((score > threshold).sum())
    return count / total


def owl_sparsities(ratios: dict[int, float], sparsity: float, lam: float) -> dict[int, float]:
    """Layer index → sparsity: outlier ratios scaled to [0, 2λ], minus their mean, as densities around 1 − sparsity.
    Equal ratios (nothing to tell the layers apart) give every layer `sparsity`."""
    values = torch.tensor([ratios[index] for index in sorted(ratios)], dtype=torch.float64)
    spread = float(values.max() - values.min()) if len(values) else 0.0
    if spread == 0.0:
        return {index: sparsity for index in ratios}
    scaled = (values - values.min()) / spread * (2 * lam)
    density = scaled - scaled.mean() + (1.0 - sparsity)
    return {index: float(1.0 - d) for index, d in zip(sorted(ratios), density)}
