"""What a recovery request must satisfy, checked before (or right after) the weights load."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from perp.config import PerpConfig, classify_model_source
from perp.recover.base import METHODS, RecoverError, Settings


def settings_for(config: PerpConfig) -> Settings:
    return Settings(rank=config.recover.rank, alpha=config.recover.alpha, seed=config.recover.seed)


def validate_request(config: PerpConfig, model: str, dense: Optional[str]) -> list[str]:
    """Everything that can be checked without loading weights; raises RecoverError / ConfigError."""
    rc = config.recover
    methods = rc.methods
    # The config validates these too; a config built around validation (model_construct, object.__setattr__)
    # must still not start training with them.
    if rc.rank <= 0:
        raise RecoverError(f"recover.rank: LoRA rank must be > 0, got {rc.rank}")
    if not rc.lr > 0 or not math.isfinite(rc.lr):
        raise RecoverError(f"recover.lr: the learning rate must be > 0, got {rc.lr}")
    if classify_model_source(model) in ("local", "alias", "gguf"):  # remote sources are checked once fetched
        from perp.models.loading import resolve_model_dir

        check_windows_fit(_model_config(resolve_model_dir(model, config.model.revision)[1]), config, model)
    if rc.mode == "layerwise":
        if dense is None:
            raise RecoverError(
                "recover.mode: layerwise reconstruction matches each pruned block to the dense block's outputs, so "
                "it needs the dense reference model: pass --dense DENSE (or use --mode end2end)"
            )
        classify_model_source(dense, "--dense")
        if not any(METHODS.get(name).in_blocks for name in methods):
            raise RecoverError(
                f"recover.method: '{rc.method}' trains nothing inside decoder blocks (the LM head is outside "
                "them); layer-wise mode needs bias, norm, lora, masklora, scalelora or full"
            )
    elif dense is not None and classify_model_source(dense, "--dense") == "local":
        from perp.models.loading import checkpoint_bytes, peek_family, resolve_model_dir

        # end to end only records the reference (evaluation's baseline): a damaged one is refused now, not there
        path = resolve_model_dir(dense, config.model.revision)[1]
        peek_family(path)
        checkpoint_bytes(path, torch.float32)  # the safetensors headers, nothing more
    return methods


def _model_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # load_model reports an unreadable model with its own error


def check_windows_fit(model_config: Any, config: PerpConfig, model: str) -> None:
    """Training and evaluation windows must fit the model's positions (else the embedding lookup fails deep in
    the first forward, after minutes of loading and evaluating)."""
    get = model_config.get if isinstance(model_config, dict) else lambda key: getattr(model_config, key, None)
    limit = get("max_position_embeddings")
    if not limit:
        return
    for what, seqlen in (("recover.seqlen", config.recover.seqlen), ("data.evaluation.seqlen",
                                                                     config.data.evaluation.seqlen)):
        if seqlen > limit:
            raise RecoverError(f"{what}: windows of {seqlen} tokens exceed the {limit} positions of '{model}'; "
                               f"use at most {limit}")


def require_biases(methods: list[str], model: Any, family: Any, source: str) -> None:
    """`bias` alone on a model without biases (LLaMA style) would train nothing: refuse before any training.
    Combined with other methods it adds nothing, which the report notes (`bias_note`)."""
    if "bias" in methods and not any(n.endswith("bias") for n, _ in family.layers(model).named_parameters()):
        if methods == ["bias"]:
            raise RecoverError(f"recover.method: 'bias' selects no trainable parameters in '{source}' "
                               "(LLaMA-style models have no biases)")
        warnings.warn(f"recover.method: '{source}' has no biases in its decoder layers; 'bias' adds nothing",
                      stacklevel=3)


def recovered_output_bytes(config: PerpConfig, model: str, preserves: bool) -> int:
    """What `run_recover` will write, from safetensors headers and a weightless model (nothing loads): the merged
    checkpoint in the dtype it loads in, the source's masks when the methods keep them, and what the methods add
    (adapters, an untied LM head)."""
    from perp.layout import MASKS_FILE
    from perp.models.loading import checkpoint_bytes, resolve_device_dtype, resolve_model_dir
    from perp.prune.run import model_skeleton

    mc = config.model
    _, path = resolve_model_dir(model, mc.revision)
    _, dtype = resolve_device_dtype(mc.device, mc.dtype)
    masks = path / MASKS_FILE
    kept_masks = masks.stat().st_size if preserves and masks.is_file() else 0
    skeleton, family, _ = model_skeleton(model, mc.revision)
    added = added_output_bytes(config, skeleton, family, dtype.itemsize, blocks_only=config.recover.mode == "layerwise")
    return checkpoint_bytes(path, dtype) + kept_masks + added


def added_output_bytes(config: PerpConfig, skeleton: Any, family: Any, itemsize: int, blocks_only: bool) -> int:
    """Bytes the methods of `config.recover` add beyond the merged checkpoint, counted on `skeleton` (a meta
    model); `blocks_only` for layer-wise training, which has no LM head in scope."""
    from perp.recover.base import Scope, model_scope

    scope = model_scope(skeleton, family)
    if blocks_only:
        scope = Scope(root=skeleton, family=family, linears=scope.linears, model=None)
    settings = settings_for(config)
    return sum(METHODS.get(name)(settings).output_bytes(scope, itemsize) for name in config.recover.methods)
