"""Perplexity with the WikiText-2 protocol: exp of the mean next-token NLL over non-overlapping windows.

A diverged model's perplexity is `inf` (its mean NLL overflows exp) or `nan` (its logits are not numbers), never
an exception: those are results a promotion gate must see and refuse. Windows longer than the model's positions
are refused up front (`check_positions`): the embedding lookup would fail (OPT) or silently score positions the
model never learned (RoPE).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from perp.data.windows import TokenSet
from perp.errors import ConfigError
from perp.runtime import reuse_freed_memory


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean next-token NLL
    tokens: int  # tokens scored (windows × (seqlen - 1))
    windows: int
    seqlen: int
    seconds: float
    data_hash: str

    def as_dict(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "windows": self.windows,
                "seqlen": self.seqlen, "seconds": round(self.seconds, 3), "data_sha256": self.data_hash}


def ppl_from_nll(mean_nll: float) -> float:
    """exp(mean NLL): `inf` when it overflows a float (a diverged model), `nan` for a NaN NLL."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def read_model_config(path: str | Path) -> Any:
    """A model directory's configuration without its weights: transformers' config (defaults filled in), else the
    raw config.json, else {} (whoever loads the model reports an unreadable one)."""
    path = Path(path)
    if not path.is_dir():
        return {}
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError):  # an unknown model_type or a malformed file: read the plain JSON
        pass
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def config_value(model_config: Any, key: str) -> Any:
    """`key` of a transformers config or of a config.json dict (None when absent)."""
    if isinstance(model_config, dict):
        return model_config.get(key)
    return getattr(model_config, key, None)


def max_positions(model_config: Any) -> Optional[int]:
    """The longest window the model has positions for (`max_position_embeddings`), or None when unknown."""
    value = config_value(model_config, "max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_positions(model_config: Any, seqlen: int, key: str, model: str) -> None:
    """Refuse windows of `seqlen` tokens when the model has fewer positions. `key` names the setting, `model`
    the model in the message (e.g. "'tiny-opt'")."""
    limit = max_positions(model_config)
    if limit is not None and seqlen > limit:
        raise ConfigError(f"{key}: perplexity windows of {seqlen} tokens exceed the {limit} positions of {model}; "
                          f"use at most {limit}")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def window_nll_sum(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL for a [B, L] batch of windows, computed in fp32 whatever the model's dtype.

    The targets are shifted into a label tensor (the last position ignored) instead of slicing the logits, so the
    [B, L, V] logits are read in place: `logits[:, :-1].reshape(...)` would copy all of them first.
    """
    logits = model(input_ids=batch, use_cache=False).logits
    labels = torch.full_like(batch, -100)
    labels[:, :-1] = batch[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: TokenSet, batch_size: int = 4,
               progress: Optional[Callable[[int], None]] = None) -> PerplexityResult:
    """exp(mean NLL) over every window; NLL sums accumulate in fp64 so the order of batches does not matter."""
    check_positions(getattr(model, "config", None), windows.seqlen, "seqlen", "the model")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    nll_sum = torch.zeros((), dtype=torch.float64)
    ids = windows.ids
    try:
        with reuse_freed_memory(device.type == "cpu"):  # logits alone are ~800 MB per batch of 4 × 1024 (fp32)
            for start in range(0, windows.num_windows, batch_size):
                batch = ids[start:start + batch_size].to(device)
                nll_sum += window_nll_sum(model, batch).double().cpu()
                if progress is not None:
                    progress(int(batch.shape[0]))
    finally:
        model.train(was_training)  # also when a batch fails: a training caller gets its model back as it was
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tokens = windows.num_windows * (windows.seqlen - 1)
    mean_nll = float(nll_sum) / tokens
    return PerplexityResult(ppl=ppl_from_nll(mean_nll), nll=mean_nll, tokens=tokens, windows=windows.num_windows,
                            seqlen=windows.seqlen, seconds=time.perf_counter() - started, data_hash=windows.hash)
