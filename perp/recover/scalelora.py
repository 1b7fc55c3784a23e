"""`scalelora`: W ⊙ (B·A) on every pruned decoder Linear, A and B initialised to 1/√r so that B·A = 1.

The update is multiplicative, so pruned positions (W = 0) stay zero by construction, and training starts from
the pruned model (exactly when r is a power of 4, to the last bit of float32 otherwise). No alpha scaling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from perp.recover.base import RecoverMethod, Scope, register
from perp.recover.lowrank import LowRankAdapter, flatten_tokens
from perp.recover.masklora import attach_adapters, merge_adapters


class _ScaledLoRAFunction(torch.autograd.Function):
    """y = x·(W ⊙ B·A)ᵀ + b, saving only x (and references to W, A, B) for the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b):
        out = F.linear(x, weight.to(x.dtype) * (lora_b @ lora_a), bias)
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        weight = weight.to(x.dtype)
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ (weight * (lora_b @ lora_a))
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # dL/d(B·A) = dL/dW_eff ⊙ W, zero at pruned positions by construction.
            grad_scale = (flatten_tokens(grad_out).t() @ flatten_tokens(x)).mul_(weight)
            if ctx.needs_input_grad[3]:
                grad_a = lora_b.t() @ grad_scale
            if ctx.needs_input_grad[4]:
                grad_b = grad_scale @ lora_a.t()
        if ctx.needs_input_grad[2]:
            grad_bias = flatten_tokens(grad_out).sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b


class ScaleLoRALinear(LowRankAdapter):
    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__(base, rank)
        with torch.no_grad():
            self.lora_A.fill_(1.0 / math.sqrt(rank))
            self.lora_B.fill_(1.0 / math.sqrt(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_, weight, bias, lora_a, lora_b = self._operands(x)
        return _ScaledLoRAFunction.apply(x_, weight, bias, lora_a, lora_b)

    @torch.no_grad()
    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.base.weight.to(dtype) * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))


@register("scalelora")
class ScaleLoRA(RecoverMethod):
    stage = 0
    lowrank_on_linears = True

    def attach(self, scope: Scope) -> dict[str, nn.Parameter]:
        return attach_adapters(scope, lambda linear: ScaleLoRALinear(linear, self.settings.rank))

    @torch.no_grad()
    def merge(self, scope: Scope) -> None:
        merge_adapters(scope, ScaleLoRALinear)
