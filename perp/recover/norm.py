"""`norm`: retrain the LayerNorm/RMSNorm weights and biases (in layer-wise mode, those of the block)."""

from __future__ import annotations

from torch import nn

from perp.recover.base import RecoverMethod, Scope, register


@register("norm")
class Norm(RecoverMethod):
    def attach(self, scope: Scope) -> dict[str, nn.Parameter]:
        selected = {}
        for module_name, module in scope.norms().items():
            for param_name, param in module.named_parameters(recurse=False):
                param.requires_grad_(True)
                selected[f"{module_name}.{param_name}" if module_name else param_name] = param
        return selected
