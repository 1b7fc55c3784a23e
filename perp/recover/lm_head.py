"""`lm_head`: a standard LoRA (peft) on the LM head, merged normally after training.

The LM head is not pruned, so its merge may be dense. When the head shares its weight with the input
embeddings, merging into the shared tensor would silently change the embeddings too; the head is therefore
untied first (it gets its own copy of the weight, the checkpoint records `tie_word_embeddings: false`) and the
report says so. Layer-wise mode has no LM head in scope: the method contributes nothing there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from perp.models.families import FamilyAdapter
from perp.recover.base import RecoverError, RecoverMethod, Scope, lowrank_bytes, register
from perp.recover.lora import peft_lora, unwrap_peft

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@register("lm_head")
class LMHead(RecoverMethod):
    stage = 0
    in_blocks = False

    def attach(self, scope: Scope) -> dict[str, nn.Parameter]:
        self.action = "not applicable (layer-wise: the LM head is outside the decoder blocks)"
        model, family = scope.model, scope.family
        if model is None:
            return {}
        path = family.lm_head_path
        head = family.lm_head(model)
        if not isinstance(head, nn.Linear):
            raise RecoverError(f"lm_head: the LM head of this model is a {type(head).__name__}, not a Linear")
        if family.ties_embeddings(model):
            untie_lm_head(model, family)
            self.action = ("untied: the LM head got its own copy of the tied embedding weight before LoRA, so "
                           "the merge changes only the head; the checkpoint stores both (tie_word_embeddings=false)")
        else:
            self.action = "not tied: merged into the LM head only"
        layer = peft_lora(family.lm_head(model), self.settings)
        scope.replace(path, layer)
        return {f"{path}.lora_A": layer.lora_A["default"].get_parameter("weight"),
                f"{path}.lora_B": layer.lora_B["default"].get_parameter("weight")}

    @torch.no_grad()
    def merge(self, scope: Scope) -> None:
        if scope.is_block:
            return
        unwrap_peft(scope, [scope.family.lm_head_path])

    def describe(self, scope: Scope) -> dict[str, Any]:
        return {"tied_embeddings_action": self.action}

    def output_bytes(self, scope: Scope, itemsize: int) -> int:
        if scope.model is None:
            return 0
        head = scope.family.lm_head(scope.model)
        untied_copy = head.weight.numel() * itemsize if scope.family.ties_embeddings(scope.model) else 0
        return lowrank_bytes([head], self.settings.rank) + untied_copy


@torch.no_grad()
def untie_lm_head(model: PreTrainedModel, family: FamilyAdapter) -> None:
    """Give the LM head its own weight tensor and record in the config that the embeddings are no longer tied."""
    head = family.lm_head(model)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, _text_config(model.config))}.values():
        config.tie_word_embeddings = False
    if family.ties_embeddings(model):  # pragma: no cover - a transformers change would break the untie
        raise RecoverError("lm_head: could not untie the LM head from the input embeddings")


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config
