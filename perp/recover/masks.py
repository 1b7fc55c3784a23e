"""Pruning masks: read from the weights, held during training, verified bit for bit afterwards.

A mask is True where a weight is kept and False where it was pruned. Recovery reads it from the pruned
checkpoint itself (`weight != 0`), so it needs no side file and always matches the weights it protects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from perp.models.families import FamilyAdapter
from perp.prune.masks import PackedMask, pack_mask
from perp.recover.base import RecoverError

#: Below this fraction of exact zeros in the decoder Linears a model counts as never pruned. Dense checkpoints
#: dequantized from GGUF carry a few exact zeros (SmolLM2's Q4_1 weights: 0.03%), so "any zero" is not enough.
MIN_PRUNED_SPARSITY = 0.01


@torch.no_grad()
def device_masks(linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """name → bool mask (True = kept), on the weights' device, for every Linear with at least one pruned weight.
    For methods that apply the masks every step (`full`)."""
    masks = {}
    for name, linear in linears.items():
        keep = linear.weight != 0
        if not bool(keep.all()):
            masks[name] = keep
    return masks


@torch.no_grad()
def capture_masks(linears: dict[str, nn.Linear]) -> dict[str, PackedMask]:
    """name → kept-mask, bit-packed on the CPU, for every Linear with at least one pruned weight: what the merge
    is verified against. Packed, the masks of a whole model cost 1/16 of its bf16 weights and no device memory."""
    return {name: pack_mask(keep) for name, keep in ((name, linear.weight != 0) for name, linear in linears.items())
            if not bool(keep.all())}


@torch.no_grad()
def mask_violations(weights: Iterable[tuple[str, torch.Tensor]], masks: dict[str, PackedMask]) -> dict[str, int]:
    """name → number of pruned positions that are not exactly +0.0 (sign bit included)."""
    violations = {}
    for name, weight in weights:
        if name not in masks:
            continue
        pruned = ~masks[name].unpack().to(weight.device)
        values = weight[pruned]
        bad = int((values != 0).sum()) + int(torch.signbit(values).sum())
        if bad:
            violations[name] = bad
    return violations


def require_pruned(model: nn.Module, family: FamilyAdapter, source: str, methods: list[str]) -> dict[str, float]:
    """Sparsity-preserving recovery of a model that was never pruned is a mistake; say so before training."""
    sparsity = family.decoder_sparsity(model)
    if sparsity["sparsity"] < MIN_PRUNED_SPARSITY:
        raise RecoverError(
            f"model '{source}' has {sparsity['sparsity']:.2%} zero weights in its decoder Linears: it was never "
            f"pruned, so there is no sparsity for '{'+'.join(methods)}' to preserve (prune it first with "
            "`perp prune`, or use --method lora for a dense LoRA baseline)"
        )
    return sparsity


@torch.no_grad()
def check_source_masks(model_dir: Path, model: nn.Module, family: FamilyAdapter, source: str) -> bool:
    """A pruned checkpoint's `masks.safetensors` travels with the recovered model, so it must describe these
    weights: every position it marks pruned is zero here. Returns whether there is such a file."""
    from perp.prune.masks import MASKS_FILE, load_packed_masks

    path = Path(model_dir) / MASKS_FILE
    if not path.is_file():
        return False
    masks = load_packed_masks(path)
    linears = dict(family.named_decoder_linears(model))
    unknown = sorted(set(masks) - set(linears))
    if unknown:
        raise RecoverError(f"{path} names Linears '{source}' does not have ({', '.join(unknown[:3])}...): it belongs "
                           "to another model; remove it or prune again")
    for name, packed in masks.items():
        weight = linears[name].weight
        if tuple(weight.shape) != packed.shape:
            raise RecoverError(f"{path}: {name} is {packed.shape} there but {tuple(weight.shape)} in '{source}'")
        stray = int(torch.count_nonzero(weight[~packed.unpack().to(weight.device)]))
        if stray:
            raise RecoverError(f"{path} does not match the weights of '{source}': {stray} positions of {name} it marks "
                               "pruned are non-zero (masks of another pruning run?); remove it or prune again")
    return True
