"""The pieces every recovery method shares: the scope it works on, its settings, and the registry.

A recovery method (`bias`, `norm`, `lm_head`, `lora`, `masklora`, `scalelora`, `full`) selects or adds the
parameters that retrain, and folds them back into plain weights afterwards. It works on a `Scope`: the whole
model (end-to-end mode) or one decoder block (layer-wise mode). Methods combine (`norm+bias+masklora`); each
one only marks its own parameters trainable, after the orchestrator has frozen everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Optional

import torch
from torch import nn

from perp.errors import PerpError
from perp.models.families import FamilyAdapter, is_norm
from perp.plugins import Registry

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class RecoverError(PerpError):
    """A recovery request that cannot run (unpruned model, missing dense reference, nothing to train...)."""


class DataRepeatWarning(UserWarning):
    """More training windows are needed than the data supplies, so windows are reused."""


@dataclass
class Settings:
    """The method knobs of `recover.*` that the methods read."""

    rank: int = 16
    alpha: float = 32.0
    seed: int = 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class Scope:
    """What a method may touch.

    `root` is the module whose `named_parameters()` names the trainable parameters; `linears` are the decoder
    Linears (the pruned ones), by name relative to `root`. `model` is the whole model in end-to-end mode and
    None in layer-wise mode, where only one decoder block is in scope (no LM head, no final norm).
    """

    root: nn.Module
    family: FamilyAdapter
    linears: dict[str, nn.Linear]
    model: Optional[PreTrainedModel] = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def is_block(self) -> bool:
        return self.model is None

    def norms(self) -> dict[str, nn.Module]:
        return {name: module for name, module in self.root.named_modules() if is_norm(module)}

    def replace(self, name: str, module: nn.Module) -> None:
        """Swap the submodule at dotted `name` (relative to root)."""
        parent_name, _, child = name.rpartition(".")
        parent = self.root.get_submodule(parent_name) if parent_name else self.root
        setattr(parent, child, module)


def model_scope(model: PreTrainedModel, family: FamilyAdapter) -> Scope:
    return Scope(root=model, family=family, linears=dict(family.named_decoder_linears(model)), model=model)


def block_scope(layer: nn.Module, family: FamilyAdapter) -> Scope:
    return Scope(root=layer, family=family, linears=family.linears(layer), model=None)


class RecoverMethod:
    """One way of choosing what retrains. Subclasses register under their config name.

    `stage` orders attachment: methods that add modules (stage 0) run before methods that only flip
    `requires_grad` on existing parameters (stage 1), so that wrapping a module never loses a selection.
    """

    name: ClassVar[str]
    stage: ClassVar[int] = 1
    preserves_sparsity: ClassVar[bool] = True
    #: False when the method has nothing to train inside a decoder block (the LM head lives outside them).
    in_blocks: ClassVar[bool] = True
    #: True when the method adds a low-rank adapter (saved in the adapter file) to every decoder Linear.
    lowrank_on_linears: ClassVar[bool] = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def attach(self, scope: Scope) -> dict[str, nn.Parameter]:
        """Make this method's parameters trainable (adding adapters where needed); return them by name."""
        raise NotImplementedError

    def after_step(self, scope: Scope) -> None:
        """Called after every optimizer step (e.g. `full` re-imposes the masks)."""

    @torch.no_grad()
    def merge(self, scope: Scope) -> None:
        """Fold adapters into plain weights and restore the original module types."""

    def describe(self, scope: Scope) -> dict[str, Any]:
        return {}

    def output_bytes(self, scope: Scope, itemsize: int) -> int:
        """Bytes this method adds to the recovered output beyond the merged checkpoint (adapter tensors, an untied
        LM head), from shapes alone: `scope` may hold a weightless (meta) model; `itemsize` is the element size of
        the saved weights. Parameters a method only selects (norms, biases) are a rounding error: 0."""
        return lowrank_bytes(scope.linears.values(), self.settings.rank) if self.lowrank_on_linears else 0


def lowrank_bytes(linears: Iterable[nn.Linear], rank: int) -> int:
    """The fp32 A [rank, in] and B [out, rank] of a low-rank adapter on each Linear."""
    return 4 * rank * sum(linear.in_features + linear.out_features for linear in linears)


METHODS: Registry[type[RecoverMethod]] = Registry("recover.method")


def register(name: str):
    """Class decorator: register a method under `name` (the name in `perp.config.RECOVER_METHODS`)."""

    def decorator(cls: type[RecoverMethod]) -> type[RecoverMethod]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator
