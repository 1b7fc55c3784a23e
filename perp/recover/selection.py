"""Attach a combination of recovery methods to a scope, and fold them back afterwards.

Everything in scope is frozen first (`requires_grad=False`: no weight-gradient matmuls, no optimizer state),
then each method marks or adds its own parameters. The trainable parameters are kept as fp32 master copies;
merging casts them back to the model's dtype and returns plain `nn.Linear` modules everywhere.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from perp.models.families import is_norm
from perp.recover.base import METHODS, RecoverError, RecoverMethod, Scope, Settings


@dataclass
class Attachment:
    scope: Scope
    methods: list[RecoverMethod]
    params: dict[str, nn.Parameter]  # name (relative to the scope root) → trainable parameter
    model_dtypes: dict[int, torch.dtype] = field(default_factory=dict)  # id → dtype, for existing parameters
    companions: list[tuple[nn.Parameter, torch.dtype]] = field(default_factory=list)  # frozen, upcast alongside

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.unique_params())

    def unique_params(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for param in self.params.values():
            seen.setdefault(id(param), param)
        return list(seen.values())

    def after_step(self) -> None:
        for method in self.methods:
            method.after_step(self.scope)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The unmerged trainable tensors (adapters in fp32, selected model parameters as trained), on CPU."""
        return {f"{prefix}{name}": param.detach().to("cpu").clone().contiguous() for name, param in self.params.items()}

    @torch.no_grad()
    def merge(self) -> None:
        """Cast selected model parameters back to their dtype, then fold adapters in (reverse attach order)."""
        for param in self.unique_params():
            dtype = self.model_dtypes.get(id(param))
            if dtype is not None and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for param, dtype in self.companions:
            param.data = param.data.to(dtype)
        self.companions = []
        for method in reversed(self.methods):
            method.merge(self.scope)
        for param in self.scope.root.parameters():
            param.requires_grad_(False)

    def describe(self) -> dict[str, Any]:
        notes: dict[str, Any] = {}
        for method in self.methods:
            notes.update(method.describe(self.scope))
        return notes


def attach(scope: Scope, method_names: list[str], settings: Settings) -> Attachment:
    """Freeze the scope, then let each method select its parameters (adapters first, deterministic init)."""
    for param in scope.root.parameters():
        param.requires_grad_(False)
    methods = sorted((METHODS.get(name)(settings) for name in method_names), key=lambda m: m.stage)
    params: dict[str, nn.Parameter] = {}
    existing = {id(p) for p in scope.root.parameters()}
    devices = sorted({p.device for p in scope.root.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        for method in methods:
            params.update(method.attach(scope))
    selected = {id(p) for p in params.values()}
    stray = [name for name, p in scope.root.named_parameters() if p.requires_grad and id(p) not in selected]
    if stray:  # pragma: no cover - guards against a method (or peft) leaving extra parameters trainable
        raise RuntimeError(f"parameters trainable but not selected: {stray[:5]}")
    for param in params.values():
        param.requires_grad_(True)
    model_dtypes = {}
    for param in {id(p): p for p in params.values()}.values():
        if id(param) in existing:
            model_dtypes[id(param)] = param.dtype
        if param.dtype != torch.float32:
            param.data = param.data.float()  # fp32 master copy; the forward runs in the autocast dtype
    companions = _upcast_norm_companions(scope.root, {id(p) for p in params.values()})
    return Attachment(scope=scope, methods=methods, params=params, model_dtypes=model_dtypes, companions=companions)


def _upcast_norm_companions(root: nn.Module, trainable: set[int]) -> list[tuple[nn.Parameter, torch.dtype]]:
    """A norm whose bias trains (fp32 master) but whose weight does not (bf16) has mixed parameter dtypes, which
    CPU LayerNorm refuses: its frozen parameters are upcast for the training too (a norm is tiny), and cast back
    at the merge. Linears need nothing: autocast casts their operands."""
    companions = []
    for module in root.modules():
        if not is_norm(module):
            continue
        own = [p for p in module.parameters(recurse=False)]
        if not any(id(p) in trainable for p in own):
            continue
        for param in own:
            if id(param) not in trainable and param.dtype.is_floating_point and param.dtype != torch.float32:
                companions.append((param, param.dtype))
                param.data = param.data.float()
    return companions


def require_trainable(attachment: Attachment, method: str, where: str) -> None:
    if attachment.trainable_params == 0:
        hint = " (LLaMA-style models have no biases)" if "bias" in method.split("+") else ""
        raise RecoverError(f"recover.method: '{method}' selects no trainable parameters in {where}{hint}")


def autocast_context(device: torch.device, model_dtype: torch.dtype):
    """bf16 autocast on GPU (or the model's half dtype); none for an fp32 model on CPU."""
    if device.type == "cuda":
        dtype = torch.float16 if model_dtype == torch.float16 else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)
    if model_dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=model_dtype)
    return nullcontext()
