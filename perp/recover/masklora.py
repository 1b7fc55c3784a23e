"""`masklora`: W + s·(B·A ⊙ M) on every pruned decoder Linear, with M the pruning mask and s = alpha/r.

Standard LoRA initialisation (A Kaiming-uniform, B = 0), so training starts from the pruned model exactly. The
update is masked before it is added, so pruned positions stay exactly zero during training and after merging.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from perp.recover.base import RecoverMethod, Scope, register
from perp.recover.lowrank import LowRankAdapter, flatten_tokens


def keep_mask(weight: torch.Tensor) -> torch.Tensor:
    """1.0 where the weight is kept, 0.0 where it was pruned, in the weight's dtype.

    `|W|.sign()` is several times faster on CPU than `masked_fill`/`where` with a bool mask, and is recomputed
    from the frozen weight whenever it is needed instead of being stored (it would cost a weight-sized buffer).
    """
    return weight.abs().sign_()


def effective_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
    """W + s·(B·A ⊙ M), as a new tensor.

    Computed as (W + s·B·A) ⊙ M, which is the same since W is zero where M is: one fused addmm and one masking
    pass over the weight instead of three passes (half the time on CPU, bit-identical).
    """
    keep = keep_mask(weight) if keep is None else keep
    return torch.addmm(weight, lora_b, lora_a, alpha=scaling).mul_(keep)


class _MaskedLoRAFunction(torch.autograd.Function):
    """y = x·(W + s·(B·A ⊙ M))ᵀ + b, saving only x (and references to W, A, B) for the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        out = F.linear(x, effective_weight(weight.to(x.dtype), lora_a, lora_b, scaling), bias)
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        weight = weight.to(x.dtype)
        scaling = ctx.scaling
        keep = keep_mask(weight)
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ effective_weight(weight, lora_a, lora_b, scaling, keep)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # dL/d(B·A) = s · (dL/dW_eff ⊙ M): the update only sees gradients at kept positions.
            grad_delta = (flatten_tokens(grad_out).t() @ flatten_tokens(x)).mul_(keep)
            if ctx.needs_input_grad[3]:
                grad_a = (lora_b.t() @ grad_delta).mul_(scaling)
            if ctx.needs_input_grad[4]:
                grad_b = (grad_delta @ lora_a.t()).mul_(scaling)
        if ctx.needs_input_grad[2]:
            grad_bias = flatten_tokens(grad_out).sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None


class MaskLoRALinear(LowRankAdapter):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base, rank)
        self.scaling = alpha / rank
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the LoRA (and nn.Linear) default
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_, weight, bias, lora_a, lora_b = self._operands(x)
        return _MaskedLoRAFunction.apply(x_, weight, bias, lora_a, lora_b, self.scaling)

    @torch.no_grad()
    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return effective_weight(self.base.weight.to(dtype), self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling)


@register("masklora")
class MaskLoRA(RecoverMethod):
    stage = 0
    lowrank_on_linears = True
    adapter_class = MaskLoRALinear

    def attach(self, scope: Scope) -> dict[str, nn.Parameter]:
        return attach_adapters(scope, lambda linear: MaskLoRALinear(linear, self.settings.rank, self.settings.alpha))

    @torch.no_grad()
    def merge(self, scope: Scope) -> None:
        merge_adapters(scope, self.adapter_class)


def attach_adapters(scope: Scope, build) -> dict[str, nn.Parameter]:
    """Wrap each decoder Linear in scope; return the adapters' parameters by name relative to the scope root."""
    selected = {}
    for name, linear in list(scope.linears.items()):
        adapter = build(linear)
        scope.replace(name, adapter)
        selected[f"{name}.lora_A"] = adapter.lora_A
        selected[f"{name}.lora_B"] = adapter.lora_B
    return selected


@torch.no_grad()
def merge_adapters(scope: Scope, adapter_class: type[LowRankAdapter]) -> None:
    for name in list(scope.linears):
        module = scope.root.get_submodule(name)
        if isinstance(module, adapter_class):
            scope.replace(name, module.merged())
