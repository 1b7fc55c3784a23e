"""`full`: retrain every weight, with the pruning masks held (the baseline PERP compares against).

Pruned positions get zero gradients (so AdamW never builds state for them) and are re-zeroed after every
optimizer step, which keeps them exactly +0.0 whatever the optimizer does (weight decay included).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from perp.recover.base import RecoverMethod, Scope, register
from perp.recover.masks import device_masks


@register("full")
class Full(RecoverMethod):
    def attach(self, scope: Scope) -> dict[str, nn.Parameter]:
        self.masks = device_masks(scope.linears)
        selected = {}
        seen: set[int] = set()
        for name, param in scope.root.named_parameters():
            if id(param) in seen or not param.dtype.is_floating_point:
                continue  # tied tensors (embeddings = LM head) train once, under their first name
            seen.add(id(param))
            param.requires_grad_(True)
            selected[name] = param
        self._hooks = [scope.linears[name].weight.register_hook(_masked_grad(mask))
                       for name, mask in self.masks.items()]
        return selected

    def describe(self, scope: Scope) -> dict[str, Any]:
        if scope.model is None:  # layer-wise: one block, no LM head in scope
            return {}
        if scope.family.ties_embeddings(scope.model):
            return {"tied_embeddings_action": "tied, retrained: full fine-tuning trains the shared embedding / LM "
                                              "head matrix, so both change together"}
        return {"tied_embeddings_action": "not tied; full fine-tuning retrained the LM head and the embeddings"}

    @torch.no_grad()
    def after_step(self, scope: Scope) -> None:
        for name, mask in self.masks.items():
            scope.linears[name].weight.mul_(mask)  # a bool mul is much faster than masked_fill on CPU

    @torch.no_grad()
    def merge(self, scope: Scope) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name, mask in self.masks.items():
            scope.linears[name].weight.masked_fill_(~mask, 0.0)  # exactly +0.0, sign bit included


def _masked_grad(mask: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.mul(mask)

    return hook
