"""What the sparsity-preserving low-rank adapters (MaskLoRA, ScaleLoRA) share.

Both wrap a frozen, pruned `nn.Linear` and compute its effective weight from the frozen weight and a low-rank
product B·A inside a custom autograd function. The effective weight exists only transiently: it is recomputed
in the backward pass instead of being saved, so training holds no weight-sized activation per Linear, and the
frozen weight itself never gets a gradient buffer or optimizer state. The adapters hold fp32 master copies;
the computation runs in the autocast dtype (bf16 on GPU) or, without autocast, in the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class LowRankAdapter(nn.Module):
    """A frozen base Linear plus trainable `lora_A` [r, in] and `lora_B` [out, r] (fp32)."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, dtype=torch.float32, device=device))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (callers that inspect `.weight` keep working)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _operands(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype = compute_dtype(x)
        bias = self.base.bias.to(dtype) if self.base.bias is not None else None
        # The frozen weight is passed as it is: the autograd functions cast it to x's dtype when they use it, so
        # what they save for the backward pass is a reference to the weight, never a cast copy of it.
        return x.to(dtype), self.base.weight, bias, self.lora_A.to(dtype), self.lora_B.to(dtype)

    @torch.no_grad()
    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """Write the effective weight into the base Linear (exact zeros at pruned positions) and return it."""
        weight = self.base.weight
        keep = weight != 0
        merged = self.effective_weight(torch.float32).masked_fill_(~keep, 0.0)
        weight.copy_(merged.to(weight.dtype))
        weight.masked_fill_(~keep, 0.0)  # +0.0 exactly, also where the product or the cast gave -0.0
        return self.base

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def flatten_tokens(t: torch.Tensor) -> torch.Tensor:
    """[..., features] → [tokens, features]."""
    return t.reshape(-1, t.shape[-1])
