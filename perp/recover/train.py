"""The end-to-end training loop: next-token loss over seeded windows, AdamW with linear warmup and decay.

Only the attached parameters train; they are fp32 masters while the forward runs in bf16 autocast on GPU.
Gradient accumulation and (optional) gradient checkpointing; on CPU a fixed seed gives identical runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from perp.config import RecoverConfig
from perp.recover.base import RecoverError
from perp.recover.loss import causal_lm_loss
from perp.recover.selection import Attachment, autocast_context
from perp.runtime import reuse_freed_memory

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Gradient-norm clip, as the Hugging Face Trainer that the PERP reference trains with.
MAX_GRAD_NORM = 1.0

StepCallback = Callable[[int, float], None]


@dataclass
class TrainResult:
    loss_curve: list[list[float]] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    optimizer_state_bytes: int = 0


def linear_schedule(steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """Multiplier for step s (0-based): linear warmup over the first `warmup_fraction` of the steps (the first
    step already at 1/warmup), then linear decay that reaches 1/(decay steps) on the last step."""
    warmup = int(round(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def build_optimizer(attachment: Attachment, config: RecoverConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only; weight decay on matrices, none on norms and biases."""
    params = attachment.unique_params()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


MicroBatchLoss = Callable[[], tuple[torch.Tensor, int]]  # () → (loss of one micro-batch, tokens in it)


def optimize(attachment: Attachment, config: RecoverConfig, micro_batch_loss: MicroBatchLoss,
             device: torch.device, model_dtype: torch.dtype, on_step: Optional[StepCallback] = None,
             step_offset: int = 0) -> TrainResult:
    """`config.steps` AdamW steps over the attached parameters, each accumulating `config.grad_accum`
    micro-batches; gradient clipping, the warmup/decay schedule and the methods' after-step hooks (masks)."""
    with reuse_freed_memory(device.type == "cpu"):
        return _optimize(attachment, config, micro_batch_loss, device, model_dtype, on_step, step_offset)


def _optimize(attachment: Attachment, config: RecoverConfig, micro_batch_loss: MicroBatchLoss,
              device: torch.device, model_dtype: torch.dtype, on_step: Optional[StepCallback],
              step_offset: int) -> TrainResult:
    params = attachment.unique_params()
    optimizer = build_optimizer(attachment, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(config.steps, config.warmup_fraction))
    scaler = torch.amp.GradScaler(device.type) if device.type == "cuda" and model_dtype == torch.float16 else None
    result = TrainResult()
    started = time.perf_counter()
    try:
        for step in range(config.steps):
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(config.grad_accum):
                loss, tokens = micro_batch_loss()
                loss = loss.float() / config.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += float(loss.detach())
                result.tokens += tokens
            if not math.isfinite(step_loss):
                raise RecoverError(f"training diverged at step {step + 1} (loss {step_loss}); lower recover.lr")
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            attachment.after_step()
            result.loss_curve.append([step_offset + step + 1, step_loss])
            result.steps = step + 1
            if on_step is not None:
                on_step(step_offset + step + 1, step_loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        result.seconds = time.perf_counter() - started
        result.optimizer_state_bytes = optimizer_state_bytes(optimizer)
        optimizer.zero_grad(set_to_none=True)
    return result


def train_end2end(model: PreTrainedModel, attachment: Attachment, batches: Iterator[torch.Tensor],
                  config: RecoverConfig, device: torch.device, model_dtype: torch.dtype,
                  on_step: Optional[StepCallback] = None) -> TrainResult:
    """Next-token loss of the whole model on `batches` of token ids [batch_size, seqlen]."""

    def micro_batch_loss() -> tuple[torch.Tensor, int]:
        ids = next(batches).to(device, non_blocking=True)
        with autocast_context(device, model_dtype):
            loss = causal_lm_loss(model, ids)
        return loss, ids.numel()

    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        _checkpointing(model, True)
    model.train()
    try:
        return optimize(attachment, config, micro_batch_loss, device, model_dtype, on_step)
    finally:
        if config.gradient_checkpointing:
            _checkpointing(model, False)
        model.config.use_cache = use_cache
        model.train(was_training)


def _checkpointing(model: PreTrainedModel, enable: bool) -> None:
    """Non-reentrant activation checkpointing of the decoder layers (transformers ≥ 5 names it
    `activation_checkpointing_*`, older versions `gradient_checkpointing_*`)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
