"""The next-token loss of end-to-end recovery, without materialising every token's logits at once.

The model's own loss builds the fp32 logits of the whole micro-batch, keeps them (and their log-softmax) for the
backward pass, and then their gradient: at a 128k vocabulary that is 4.2 GB per copy for 8 × 1024 tokens, more
than the trainable parameters and their optimizer state of most PERP methods. Here the decoder runs once, and the
LM head and cross-entropy run over chunks of tokens under activation checkpointing, so at most one chunk's logits
exist at a time (recomputed in the backward pass: one more LM-head forward per step, ~2% of a step for an 8B
model, 5% for SmolLM2). Micro-batches whose fp32 logits take at most `chunk_above_bytes` (1 GiB) take the model's
own loss unchanged.

Only for architectures whose logits are exactly `lm_head(decoder(ids).last_hidden_state)`; any other (logit
soft-capping or scaling, router auxiliary losses) takes the model's own loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Chunk the loss when a micro-batch's fp32 logits would take more than this ...
CHUNK_ABOVE_BYTES = 1024 * 1024 * 1024
#: ... into chunks of tokens whose fp32 logits take at most this.
CHUNK_BYTES = 256 * 1024 * 1024

_PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "opt")


def chunkable(model: PreTrainedModel) -> bool:
    """Whether the model's logits are plainly its LM head applied to its decoder's last hidden state."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "output_router_logits", False):
        return False
    get_decoder = getattr(model, "get_decoder", None)
    return callable(get_decoder) and model.get_output_embeddings() is not None


def causal_lm_loss(model: PreTrainedModel, ids: torch.Tensor, chunk_above_bytes: int = CHUNK_ABOVE_BYTES,
                   chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Mean next-token cross-entropy of token ids [batch, seqlen] (no padding), as `model(labels=ids).loss`."""
    vocab = model.config.vocab_size
    if not chunkable(model) or ids.numel() * vocab * 4 <= chunk_above_bytes:
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    head = model.get_output_embeddings()
    rows = max(1, chunk_bytes // (4 * vocab))
    total: Optional[torch.Tensor] = None
    for start in range(0, targets.numel(), rows):
        part = checkpoint(_summed_cross_entropy, head, states[start:start + rows], targets[start:start + rows],
                          use_reentrant=False)
        total = part if total is None else total + part
    assert total is not None
    return total / targets.numel()


def _summed_cross_entropy(head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(states).float()  # the model's own loss upcasts the same way
    return F.cross_entropy(logits, targets, reduction="sum")
