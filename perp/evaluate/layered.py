"""Perplexity with one decoder layer on the device at a time, for models larger than the device.

The same protocol and numbers as `perplexity` (exp of the mean next-token NLL over the windows), computed the
way the pruning engine walks a model: the inputs of decoder layer 0 are captured for every window, each layer in
turn visits the device and transforms them in place, then the tail (final norm, OPT's projection, LM head) scores
them. Peak device memory is one layer, the tail, and the hidden states of every window.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from perp.data.windows import TokenSet
from perp.evaluate.perplexity import PerplexityResult, ppl_from_nll
from perp.models.families import FamilyAdapter
from perp.models.placement import visiting
from perp.prune.engine import capture_layer_inputs, propagate


def _tail(model: nn.Module, family: FamilyAdapter) -> list[nn.Module]:
    """What runs after the last decoder layer, in order. OPT may lack the final norm and may project out."""
    decoder = family.layers_path.rsplit(".", 1)[0]
    project_out = getattr(model.get_submodule(decoder), "project_out", None)
    modules = [family.final_norm(model), project_out, family.lm_head(model)]
    return [module for module in modules if module is not None]


#: fp32 logits scored at once by the LM head. A 128k vocabulary at 8 windows × 2048 tokens would otherwise make
#: 2^31 logits (8.4 GB in fp32, and as much again for the log-softmax) in one kernel.
HEAD_CHUNK_LOGITS = 1 << 26


def _head_nll_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of [T, H] hidden states, the LM head applied to chunks of tokens (fp64 on the host)."""
    vocab = cast(torch.Tensor, head.weight).shape[0] if hasattr(head, "weight") else head(hidden[:1]).shape[-1]
    rows = max(1, HEAD_CHUNK_LOGITS // vocab)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, hidden.shape[0], rows):
        logits = head(hidden[start:start + rows]).float()
        total += F.cross_entropy(logits, labels[start:start + rows], ignore_index=-100,
                                 reduction="sum").double().cpu()
    return total


@torch.no_grad()
def layered_perplexity(model: nn.Module, family: FamilyAdapter, windows: TokenSet, device: torch.device | str,
                       batch_size: int = 4, progress: Optional[Callable[[int, int], None]] = None) -> PerplexityResult:
    """exp(mean NLL) over every window; `progress(done_layers, total_layers)` after each layer."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    layers = family.layers(model)
    inputs = capture_layer_inputs(model, family, windows.ids, device, batch_size)
    for index, layer in enumerate(layers):
        with visiting(layer, device, write_back=False):  # read only: nothing is copied back
            propagate(layer, inputs, in_place=True)
        if progress is not None:
            progress(index + 1, len(layers))
    tail = _tail(model, family)
    nll_sum = torch.zeros((), dtype=torch.float64)
    try:
        with visiting(tail, device, write_back=False):
            start = 0
            for hidden in inputs.hidden:
                count = hidden.shape[0]
                ids = windows.ids[start:start + count].to(device)
                start += count
                for module in tail[:-1]:
                    hidden = module(hidden)
                labels = torch.full_like(ids, -100)
                labels[:, :-1] = ids[:, 1:]
                nll_sum += _head_nll_sum(tail[-1], hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1))
    finally:
        model.train(was_training)
    tokens = windows.num_windows * (windows.seqlen - 1)
    mean_nll = float(nll_sum) / tokens
    return PerplexityResult(ppl=ppl_from_nll(mean_nll), nll=mean_nll, tokens=tokens, windows=windows.num_windows,
                            seqlen=windows.seqlen, seconds=time.perf_counter() - started, data_hash=windows.hash)
