"""`bias`: retrain every bias in scope (Linear and norm biases). LLaMA-style models have none."""

from __future__ import annotations

from torch import nn

from perp.recover.base import RecoverMethod, Scope, register


@register("bias")
class Bias(RecoverMethod):
    def attach(self, scope: Scope) -> dict[str, nn.Parameter]:
        selected = {}
        for name, param in scope.root.named_parameters():
            if name.rpartition(".")[2] == "bias" and param.dtype.is_floating_point:
                param.requires_grad_(True)
                selected[name] = param
        return selected
