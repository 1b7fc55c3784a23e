"""Which Linears to prune, and every check that must fail before the first layer is touched.

The candidates are the `nn.Linear` modules inside the decoder layers, as the family adapter lists them; the LM
head and the embeddings are never candidates. `include` / `exclude` are shell-style globs (`fnmatch`, case
sensitive) on the full module name, e.g. `model.layers.0.self_attn.q_proj`; `*` also matches dots, so
`*.mlp.*` selects every MLP Linear and `model.layers.0.*` the first layer. Exclusion wins over inclusion.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any, Optional, Sequence

import torch
from torch import nn

from perp.errors import ConfigError, DataSourceError, UnsupportedArchitectureError
from perp.models.families import FamilyAdapter
from perp.prune.patterns import PruneSpec, pruned_per


@dataclass
class LayerPlan:
    """One decoder layer: its selected Linears, grouped by shared input (q/k/v; gate/up)."""

    index: int
    prefix: str  # e.g. "model.layers.3"
    groups: list[list[str]] = field(default_factory=list)  # names relative to the layer, selected ones only
    sparsity: Optional[float] = None  # this layer's own sparsity (OWL); None: the spec's

    def spec(self, spec: PruneSpec) -> PruneSpec:
        """`spec` with this layer's sparsity, if it has one."""
        return spec if self.sparsity is None else replace(spec, sparsity=self.sparsity)

    @property
    def names(self) -> list[str]:
        return [name for group in self.groups for name in group]

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"


def matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in include) and not any(fnmatchcase(name, p) for p in exclude)


def decoder_layers(model: nn.Module, family: FamilyAdapter) -> nn.ModuleList:
    """The decoder layers, or a clear error when the model has none where its family keeps them."""
    try:
        layers = family.layers(model)
    except AttributeError:
        layers = None
    if layers is None or not isinstance(layers, (nn.ModuleList, list, tuple)) or len(layers) == 0:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UnsupportedArchitectureError(
            f"model ({model_type}) has no recognised decoder layers at '{family.layers_path}' "
            f"(family '{family.name}'); nothing can be pruned"
        )
    return layers


def plan_pruning(model: nn.Module, family: FamilyAdapter, include: Sequence[str], exclude: Sequence[str],
                 spec: PruneSpec) -> list[LayerPlan]:
    """Select the Linears to prune and validate the pattern against every one of them. Touches no weight."""
    layers = decoder_layers(model, family)
    check_weights_are_linears(layers, family)
    plans, example = [], None
    for index, layer in enumerate(layers):
        prefix = family.layer_prefix(index)
        plan = LayerPlan(index=index, prefix=prefix)
        for group in family.linear_groups(layer):
            selected = [name for name in group if matches(f"{prefix}.{name}", include, exclude)]
            example = example or f"{prefix}.{group[0]}"
            if selected:
                plan.groups.append(selected)
        plans.append(plan)
    if not any(plan.groups for plan in plans):
        raise ConfigError(
            f"prune.include {list(include)} / prune.exclude {list(exclude)} select no decoder Linear "
            f"(names look like '{example or family.layer_prefix(0) + '.<linear>'}'; "
            "LM head and embeddings are never pruned)"
        )
    linears = {}
    for plan, layer in zip(plans, layers):
        present = family.linears(layer)
        for name in plan.names:
            linears[plan.full_name(name)] = present[name]
    check_pattern(linears, spec)
    return plans


def check_weights_are_linears(layers: nn.ModuleList, family: FamilyAdapter) -> None:
    """Every weight matrix of the decoder layers must sit in an nn.Linear: any other would stay dense while the
    report's sparsity, taken over the Linears, said the model was pruned."""
    for index, layer in enumerate(layers):
        outside = family.weights_outside_linears(layer)
        if outside:
            names = ", ".join(f"{family.layer_prefix(index)}.{name}" for name in outside[:3])
            more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
            raise UnsupportedArchitectureError(
                f"decoder layer {index} holds weight matrices outside nn.Linear ({names}{more}); perp prunes "
                "nn.Linear weights only, so these would stay dense (fused mixture-of-experts weights are not "
                "supported yet)"
            )


def planned_counts(model: nn.Module, family: FamilyAdapter, plans: Sequence[LayerPlan],
                   spec: PruneSpec) -> tuple[int, int]:
    """(weights the plan prunes, weights of the planned Linears), from the shapes alone (a meta model will do).

    The first is exact: what every method prunes in each selected Linear (`PruneSpec.pruned_count`: the per-row or
    per-matrix floor counts, or M - N of every group of M). So the planned sparsity, the first over the second, is
    what a correct run achieves to the weight, whatever per-row rounding does to the nominal `prune.sparsity`.
    """
    layers = decoder_layers(model, family)
    pruned = total = 0
    for plan in plans:
        present = family.linears(layers[plan.index])
        layer_spec = plan.spec(spec)
        for name in plan.names:
            rows, cols = present[name].weight.shape
            pruned += layer_spec.pruned_count(rows, cols)
            total += rows * cols
    return pruned, total


def check_pattern(linears: dict[str, nn.Linear], spec: PruneSpec) -> None:
    """N:M needs in_features divisible by M; unstructured sparsity must prune at least one weight per unit."""
    for name, linear in linears.items():
        rows, cols = linear.weight.shape
        if spec.nm:
            n, m = spec.nm
            if cols % m:
                raise ConfigError(
                    f"prune.pattern: {n}:{m} needs every input dimension divisible by {m}, but {name} has "
                    f"{cols} inputs (exclude it with prune.exclude, or choose another M)"
                )
        elif spec.granularity == "row":
            if pruned_per(cols, spec.sparsity) == 0:
                raise ConfigError(
                    f"prune.sparsity: {spec.sparsity:g} prunes no weight of {name}: per row of {cols} inputs that is "
                    f"floor({spec.sparsity:g} × {cols}) = 0 (raise it to at least {1 / cols:.4g}, or use "
                    "prune.granularity=matrix)"
                )
        elif pruned_per(rows * cols, spec.sparsity) == 0:
            raise ConfigError(
                f"prune.sparsity: {spec.sparsity:g} prunes no weight of {name} ({rows}×{cols}): "
                f"floor({spec.sparsity:g} × {rows * cols}) = 0 (raise it to at least {1 / (rows * cols):.3g})"
            )


def check_calibration(ids: Any, model: nn.Module, family: FamilyAdapter) -> None:
    """Token ids must be a non-empty [windows, seqlen] tensor inside the model's vocabulary."""
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise DataSourceError(f"calibration tokens must be [windows, seqlen] with both > 0, got {list(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise DataSourceError(f"calibration tokens must be integer token ids (int64 or int32), got {ids.dtype}")
    vocab = family.embeddings(model)[0].weight.shape[0]
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise DataSourceError(
            f"calibration token ids span [{low}, {high}] but the model's vocabulary has {vocab} entries; "
            "the calibration set was tokenized for another model"
        )
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions and ids.shape[1] > max_positions:
        raise DataSourceError(
            f"calibration windows of {ids.shape[1]} tokens exceed the model's {max_positions} positions; "
            "use a smaller data.calibration.seqlen"
        )
