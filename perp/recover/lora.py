"""`lora`: plain LoRA (peft) on the pruned decoder Linears — a baseline only.

Its merge W + s·B·A is dense, so the recovered model is no longer sparse; the report says `dense_result: true`.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from perp.recover.base import RecoverMethod, Scope, Settings, register


def peft_lora(base: nn.Linear, settings: Settings) -> PeftLoraLinear:
    """A peft LoRA layer (Kaiming-uniform A, B = 0, no dropout) around a frozen Linear, with fp32 adapters."""
    # peft annotates lora_alpha as int but only divides by it (scaling = alpha / rank): a float alpha is kept exact
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,  # type: ignore[arg-type]
                        lora_dropout=0.0, bias="none")
    layer = PeftLoraLinear(base, "default", config=config, r=settings.rank,
                           lora_alpha=settings.alpha)  # type: ignore[arg-type]
    for module in (layer.lora_A["default"], layer.lora_B["default"]):
        module.to(device=base.weight.device, dtype=torch.float32)
        module.weight.requires_grad_(True)
    return layer


@torch.no_grad()
def unwrap_peft(scope: Scope, names: list[str]) -> None:
    """Merge each peft LoRA layer at `names` into its base Linear and put the base Linear back."""
    for name in names:
        module = scope.root.get_submodule(name)
        if isinstance(module, PeftLoraLinear):
            base = module.get_base_layer()
            weight = base.get_parameter("weight")
            delta = module.get_delta_weight("default").to(torch.float32)
            weight.copy_((weight.to(torch.float32) + delta).to(weight.dtype))
            scope.replace(name, base)


@register("lora")
class LoRA(RecoverMethod):
    stage = 0
    lowrank_on_linears = True
    preserves_sparsity = False

    def attach(self, scope: Scope) -> dict[str, nn.Parameter]:
        selected = {}
        for name, linear in list(scope.linears.items()):
            layer = peft_lora(linear, self.settings)
            scope.replace(name, layer)
            selected[f"{name}.lora_A"] = layer.lora_A["default"].get_parameter("weight")
            selected[f"{name}.lora_B"] = layer.lora_B["default"].get_parameter("weight")
        return selected

    @torch.no_grad()
    def merge(self, scope: Scope) -> None:
        unwrap_peft(scope, list(scope.linears))

    def describe(self, scope: Scope) -> dict[str, Any]:
        return {"dense_result_reason": "plain LoRA merges W + s·B·A densely: the pruning sparsity is lost"}
