"""Layer-wise reconstruction: each pruned decoder block is trained to reproduce the dense block's outputs.

For block i, with X_i the hidden states entering it (from the already reconstructed blocks before it):

1. the dense block i runs on X_i, giving the targets Y_i (computed on the fly from the dense weights);
2. the selected parameters of the pruned block i train to minimise MSE(block_i(X_i), Y_i);
3. the block is merged (masks verified), and X_{i+1} = block_i(X_i) feeds the next block.

Only one block (dense or pruned) is on the device at a time, for training and for the perplexity before and
after; both models stay on the CPU otherwise, so this is the mode that scales past the device's memory. The LM
head and the final norm are outside every block and do not train here. Blocks run in eval mode (no dropout): the
targets are deterministic, so is the regression.

The data flow is the pruning engine's (`perp.prune.engine`): `capture_layer_inputs` for the inputs of block 0,
`run_layer` for one block on a batch, `propagate` for a block over every window.
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from perp.config import PerpConfig
from perp.data import evaluation_set
from perp.evaluate.layered import layered_perplexity
from perp.models import load_model
from perp.models.families import count_parameters
from perp.models.placement import visiting
from perp.prune.engine import LayerInputs, capture_layer_inputs, propagate, run_layer
from perp.recover.base import RecoverError, Settings, block_scope
from perp.recover.checks import check_windows_fit, require_biases
from perp.recover.data import WindowStream, training_windows
from perp.recover.masks import capture_masks, check_source_masks, mask_violations, require_pruned
from perp.recover.memory import PeakMemory
from perp.recover.report import emit, training_report
from perp.recover.selection import attach, autocast_context, require_trainable
from perp.recover.train import optimize
from perp.runtime import reuse_freed_memory

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def check_same_architecture(pruned: PreTrainedModel, dense: PreTrainedModel, family, model: str,
                            dense_name: str) -> None:
    a, b = pruned.config, dense.config
    layers_a = family.num_layers(pruned)
    layers_b = family.num_layers(dense) if a.model_type == b.model_type else None
    if a.model_type != b.model_type or layers_a != layers_b:
        raise RecoverError(
            f"--dense '{dense_name}' ({b.model_type}, {b.num_hidden_layers} layers) is not the dense version "
            f"of '{model}' ({a.model_type}, {layers_a} layers)"
        )
    for (name, linear), (_, other) in zip(family.named_decoder_linears(pruned), family.named_decoder_linears(dense)):
        if linear.weight.shape != other.weight.shape:
            raise RecoverError(f"--dense '{dense_name}': {name} is {tuple(other.weight.shape)} there but "
                               f"{tuple(linear.weight.shape)} in '{model}'; not the same architecture")


class Rows:
    """Windows [n, L, d] held as the micro-batches [b_i, L, d] they were computed in, never as one tensor.

    A calibration set's hidden states are the largest tensors of a layer-wise run (4 GiB a layer for 128 × 2048
    tokens of a 70B model in bf16): concatenating them, or keeping two versions alive while one replaces the other,
    would double that. Everything here works one micro-batch at a time: `split` serves micro-batches of any size
    (views within a part, a micro-batch-sized copy across parts), `take` gathers windows by index (window → part,
    row), `regroup` re-cuts the parts in place, releasing each old part as soon as it is consumed.
    """

    def __init__(self, parts: Union["Rows", torch.Tensor, Sequence[torch.Tensor]]) -> None:
        if isinstance(parts, Rows):
            parts = parts.parts
        elif torch.is_tensor(parts):
            parts = [parts]
        self.parts: list[torch.Tensor] = [p for p in parts if p.shape[0]]

    def __len__(self) -> int:
        return sum(p.shape[0] for p in self.parts)

    @property
    def starts(self) -> list[int]:
        """Index of each part's first window."""
        starts, offset = [], 0
        for part in self.parts:
            starts.append(offset)
            offset += part.shape[0]
        return starts

    def aligned(self, size: int) -> bool:
        """Whether the parts already are `size` windows each (the last one at most `size`)."""
        return all(p.shape[0] == size for p in self.parts[:-1]) and (not self.parts or self.parts[-1].shape[0] <= size)

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive micro-batches of `size` windows (the last one shorter), as `torch.cat(parts).split(size)`
        would give them, but built one at a time."""
        return _cut(iter(self.parts), size)

    def regroup(self, size: int) -> None:
        """Re-cut the parts into micro-batches of `size` windows, in place; each old part is released once
        consumed, so at most about one micro-batch is held twice."""
        if self.aligned(size):
            return
        old, self.parts = self.parts, []
        old.reverse()

        def drain() -> Iterator[torch.Tensor]:  # hands the old parts over, keeping no reference to them
            while old:
                yield old.pop()

        self.parts.extend(_cut(drain(), size))

    def take(self, indices: Sequence[int]) -> torch.Tensor:
        """The windows at `indices`, in that order: `torch.cat(parts)[indices]` without the concatenation."""
        starts, n = self.starts, len(self)
        rows = []
        for index in indices:
            index = int(index)
            if not -n <= index < n:
                raise IndexError(f"window {index} out of range for {n} windows")
            index %= n
            part = bisect.bisect_right(starts, index) - 1
            rows.append(self.parts[part][index - starts[part]])
        return torch.stack(rows)


def _cut(parts: Iterator[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """The windows of `parts` in micro-batches of `size`: a view where one lies within a part, else a copy."""
    pending: list[torch.Tensor] = []
    have = 0
    for part in parts:
        while part.shape[0]:
            piece, part = part[:size - have], part[size - have:]
            pending.append(piece)
            have += piece.shape[0]
            if have == size:
                batch, pending, have = (pending[0] if len(pending) == 1 else torch.cat(pending)), [], 0
                yield batch
                del batch
        del part
    if pending:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


class BlockData:
    """Hidden states entering the current block for every window, [n, L, d] as `Rows` of micro-batches, and the
    block's call arguments.

    The inputs of block 0 are captured one window at a time, so every captured argument (causal mask, rotary
    tables, positions) has batch size one and broadcasts (or expands) to any batch of windows.
    """

    def __init__(self, captured: LayerInputs, hidden: Union[Rows, torch.Tensor, Sequence[torch.Tensor], None] = None
                 ) -> None:
        """`captured` with batch-one call arguments; `hidden` [n, L, d], one tensor or its micro-batches (default:
        `captured`'s own). The micro-batches are used as they are: never copied, never concatenated."""
        self.hidden = Rows(captured.hidden if hidden is None else hidden)
        self.args = captured.args[0]
        self.kwargs = captured.kwargs[0]

    def call_kwargs(self, batch: int) -> dict[str, Any]:
        return {key: _expand(value, batch) for key, value in self.kwargs.items()}

    def micro_batch(self, hidden: torch.Tensor) -> LayerInputs:
        """One micro-batch as the engine's inputs."""
        return LayerInputs([hidden], [self.args], [self.call_kwargs(hidden.shape[0])])

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return run_layer(layer, hidden, self.call_kwargs(hidden.shape[0]), self.args)

    @torch.no_grad()
    def advance(self, layer: nn.Module, batch_size: int, autocast_dtype: Optional[torch.dtype]) -> None:
        """Replace the inputs by `layer`'s outputs on them (the next block's inputs), one micro-batch of
        `batch_size` windows at a time: each input micro-batch is released as its output replaces it."""
        self.hidden.regroup(batch_size)
        parts = self.hidden.parts  # the engine's in-place propagation replaces this very list's entries
        inputs = LayerInputs(parts, [self.args] * len(parts), [self.call_kwargs(p.shape[0]) for p in parts])
        propagate(layer, inputs, in_place=True, autocast_dtype=autocast_dtype)


def _expand(value: Any, batch: int) -> Any:
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == 1 and batch > 1:
        return value.expand(batch, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_expand(v, batch) for v in value)
    return value


def _batch_outputs(layer: nn.Module, data: BlockData, batch_size: int,
                   autocast_dtype: Optional[torch.dtype]) -> Iterator[torch.Tensor]:
    """The block's outputs, one micro-batch of `batch_size` windows at a time (the engine's `propagate`)."""
    for hidden in data.hidden.split(batch_size):
        yield propagate(layer, data.micro_batch(hidden), in_place=False, autocast_dtype=autocast_dtype).hidden[0]


@torch.no_grad()
def outputs(layer: nn.Module, data: BlockData, batch_size: int, autocast_dtype: Optional[torch.dtype]) -> Rows:
    """The block's outputs for every window, as `Rows` of micro-batches of `batch_size` windows."""
    return Rows(list(_batch_outputs(layer, data, batch_size, autocast_dtype)))


@torch.no_grad()
def block_mse(layer: nn.Module, data: BlockData, targets: Union[Rows, torch.Tensor, Sequence[torch.Tensor]],
              batch_size: int, autocast_dtype: Optional[torch.dtype]) -> float:
    """MSE of the block's outputs to `targets` over every window, as `F.mse_loss(outputs, targets)` in fp32.

    Computed one micro-batch at a time: each micro-batch's sum of squared differences in fp32 (the size of one
    micro-batch), accumulated in fp64 and divided by the element count at the end. Nothing the size of the
    calibration set is created.
    """
    targets = Rows(targets)
    if len(targets) != len(data.hidden):
        raise ValueError(f"{len(targets)} target windows for {len(data.hidden)} input windows")
    total: Optional[torch.Tensor] = None
    count = 0
    target_batches = targets.split(batch_size)
    for out in _batch_outputs(layer, data, batch_size, autocast_dtype):  # not zip(): it holds the last pair
        target = next(target_batches)
        if out.shape != target.shape:
            raise ValueError(f"block outputs {tuple(out.shape)} but targets {tuple(target.shape)}")
        diff = out.to(torch.float32, copy=True)  # a copy: `out` may share memory with the block's inputs
        del out
        diff.sub_(target).square_()
        part = diff.sum(dtype=torch.float32).double()
        total = part if total is None else total + part
        count += diff.numel()
        del diff, target  # released before the next micro-batch runs
    if total is None:
        raise ValueError("no windows to measure the block MSE on")
    return float(total) / count


def _layered_ppl(net: nn.Module, family, eval_set, batch_size: int, device: torch.device, progress,
                 stage: str) -> dict[str, Any]:
    """Perplexity with one block on the device at a time, like the training: the model never has to fit."""
    emit(progress, stage, 0, family.num_layers(net))
    result = layered_perplexity(net, family, eval_set, device, batch_size,
                                progress=lambda done, total: emit(progress, stage, done, total))
    return result.as_dict()


class BlockTrainer:
    """Retrains pruned decoder blocks one at a time to reproduce the dense blocks' outputs (MSE).

    `train` attaches the selected parameters to one block (already on the device), optimises them for
    `recover.steps` steps over seeded batches of windows, merges them, and verifies the masks bit for bit. It is
    shared by layer-wise recovery of a pruned checkpoint (`run_layerwise`) and by recovery fused with pruning
    (`perp.recover.fused`), which differ only in where the block inputs and the dense targets come from.
    """

    def __init__(self, config: PerpConfig, methods: list[str], settings: Settings, preserves: bool, family,
                 device: torch.device, model_dtype: torch.dtype, stream: WindowStream, progress,
                 total_blocks: int) -> None:
        self.config, self.methods, self.settings, self.preserves = config, methods, settings, preserves
        self.family, self.device, self.model_dtype, self.stream = family, device, model_dtype, stream
        self.progress, self.total_steps = progress, config.recover.steps * total_blocks
        self.autocast_dtype = _autocast_dtype(device, model_dtype)
        self.batches_needed = config.recover.steps * config.recover.grad_accum
        self.loss_curve: list[list[float]] = []
        self.blocks: list[dict[str, Any]] = []
        self.adapter: dict[str, torch.Tensor] = {}
        self.notes: dict[str, Any] = {}
        self.trainable = 0
        self.tokens_per_block = 0
        self.seconds = 0.0
        self.trained = 0

    def train(self, index: int, layer: nn.Module, data: BlockData,
              targets: Union[Rows, torch.Tensor, Sequence[torch.Tensor]]) -> None:
        """`targets`: the dense block's outputs on `data`'s windows (`Rows`, micro-batches or one tensor)."""
        targets = Rows(targets)

        started = time.perf_counter()
        rc, device = self.config.recover, self.device
        layer.eval()
        scope = block_scope(layer, self.family)
        masks = capture_masks(scope.linears) if self.preserves else {}
        mse_before = block_mse(layer, data, targets, rc.batch_size, self.autocast_dtype)
        block_settings = Settings(rank=self.settings.rank, alpha=self.settings.alpha, seed=self.settings.seed + index)
        attachment = attach(scope, self.methods, block_settings)
        require_trainable(attachment, rc.method, f"decoder block {index}")
        indices = self.stream.index_batches(self.batches_needed)

        def micro_batch_loss() -> tuple[torch.Tensor, int]:
            pick = next(indices)
            x, y = data.hidden.take(pick).to(device), targets.take(pick).to(device)
            with autocast_context(device, self.model_dtype):
                out = data.run(layer, x)
            return F.mse_loss(out.float(), y.float()), x.shape[0] * x.shape[1]

        def on_step(global_step: int, loss: float) -> None:
            emit(self.progress, "train", global_step, self.total_steps, f"block {index} mse {loss:.4g}")

        result = optimize(attachment, rc, micro_batch_loss, device, self.model_dtype, on_step,
                          self.trained * rc.steps)
        self.loss_curve.extend(result.loss_curve)
        self.tokens_per_block = result.tokens
        if "full" not in self.methods:
            self.adapter.update(attachment.state_dict(f"{self.family.layer_prefix(index)}."))
        self.notes.update(attachment.describe())
        attachment.merge()
        violations = mask_violations(((n, m.weight) for n, m in self.family.linears(layer).items()), masks)
        if violations:  # pragma: no cover - a bug, never a user error
            raise RuntimeError(f"pruning masks violated after merging block {index}: {violations}")
        mse_after = block_mse(layer, data, targets, rc.batch_size, self.autocast_dtype)
        self.trainable += attachment.trainable_params
        self.trained += 1
        self.seconds += time.perf_counter() - started
        self.blocks.append({"block": index, "mse_before": mse_before, "mse_after": mse_after,
                            "trainable_params": attachment.trainable_params})

    def report(self) -> dict[str, Any]:
        """Training figures: `block_tokens_total` counts every block's training tokens (blocks × tokens per
        block). The report's `tokens` count each token once per pass through the model, as end-to-end training
        does, so that tokens/s compares between the modes."""
        return {"blocks": self.blocks, "block_tokens_total": self.tokens_per_block * self.trained,
                "training_seconds": round(self.seconds, 3),
                **{k: v for k, v in self.notes.items() if k != "tied_embeddings_action"}}


def run_layerwise(config: PerpConfig, model: str, dense: str, methods: list[str], settings: Settings,
                  preserves: bool, progress) -> dict[str, Any]:
    rc = config.recover
    mc = config.model
    loaded = load_model(model, mc.device, mc.dtype, mc.revision, load_to_device=False)
    net, family, device = loaded.model, loaded.family, loaded.device
    check_windows_fit(net.config, config, model)
    require_biases(methods, net, family, model)
    sparsity_before = require_pruned(net, family, model, methods) if preserves else family.decoder_sparsity(net)
    if preserves:
        check_source_masks(loaded.path, net, family, model)
    dense_loaded = load_model(dense, mc.device, mc.dtype, mc.revision, load_to_device=False)
    dense_net = dense_loaded.model
    check_same_architecture(net, dense_net, family, model, dense)
    require_dense(dense_net, family, dense)
    net.requires_grad_(False)  # each block's `attach` selects its own trainable parameters
    dense_net.requires_grad_(False)
    total_params = count_parameters(net)
    train_set = training_windows(config, loaded.tokenizer)
    eval_set = evaluation_set(config.data.evaluation, loaded.tokenizer)
    ppl_before = _layered_ppl(net, family, eval_set, config.evaluate.batch_size, device, progress, "ppl_before")

    n_layers = family.num_layers(net)
    stream = WindowStream(train_set, rc.batch_size, rc.seed)
    plan = stream.plan(rc.steps * rc.grad_accum)
    stream.warn_if_repeating(rc.steps * rc.grad_accum)  # once: every block uses the same plan
    trainer = BlockTrainer(config, methods, settings, preserves, family, device, loaded.dtype, stream, progress,
                           n_layers)
    emit(progress, "train", 0, trainer.total_steps)

    torch.manual_seed(rc.seed)
    meter = PeakMemory(device)
    meter.start()
    started = time.perf_counter()
    # Hidden states are kept in the model's dtype: blocks run on them directly (LayerNorm on CPU refuses fp32
    # inputs with bf16 weights), and their outputs are cast back to it anyway.
    data = BlockData(capture_layer_inputs(net, family, train_set.ids, device, batch_size=1, dtype=loaded.dtype))
    # The windows were captured one by one; the blocks run on micro-batches of `batch_size` of them, re-cut in
    # place (never one concatenated copy of the whole set next to the captured one).
    data.hidden.regroup(rc.batch_size)
    with reuse_freed_memory(device.type == "cpu"):  # once for all blocks (each optimize() nests)
        for index in range(n_layers):
            layer, dense_layer = family.layers(net)[index], family.layers(dense_net)[index]
            with visiting(dense_layer, device, write_back=False):  # read only: nothing to copy back
                targets = outputs(dense_layer, data, rc.batch_size, trainer.autocast_dtype)
            del dense_layer
            home = next(layer.parameters()).device
            layer.to(device)
            trainer.train(index, layer, data, targets)
            del targets  # free before the block's outputs are computed
            data.advance(layer, rc.batch_size, trainer.autocast_dtype)  # feed block i+1, in place
            layer.to(home)
    seconds = time.perf_counter() - started
    peak = meter.stop()
    dense_sha256 = dense_loaded.content_hash
    del data, dense_net, dense_loaded  # free the captured states and the dense model before ppl_after

    ppl_after = _layered_ppl(net, family, eval_set, config.evaluate.batch_size, device, progress, "ppl_after")
    report = {
        **training_report(trainer.trainable, total_params, trainer.loss_curve, ppl_before, ppl_after, seconds,
                          trainer.tokens_per_block, meter, peak, train_set, config, plan),
        **trainer.report(),
        "sparsity_before": sparsity_before,
        "sparsity_after": family.decoder_sparsity(net),
        "masks_held": bool(preserves),
        "tied_embeddings_action": ("tied, unchanged" if family.ties_embeddings(net) else "not tied")
                                  + " (layer-wise mode does not retrain the LM head)",
        "dense_sha256": dense_sha256,
    }
    return {"loaded": loaded, "report": report, "adapter": trainer.adapter}


#: A dense reference may hold exact zeros of its own: dequantized GGUF Q4_0 weights are ~12% zeros, Q5_0 ~6%.
#: Pruned models are far sparser (50% and up); this bound catches them without refusing quantized originals.
DENSE_MAX_SPARSITY = 0.2


def require_dense(dense_net: nn.Module, family, dense_name: str) -> None:
    """A pruned model passed as the dense reference would make every target equal the pruned outputs, and the
    training would silently do nothing."""
    sparsity = family.decoder_sparsity(dense_net)["sparsity"]
    if sparsity >= DENSE_MAX_SPARSITY:
        raise RecoverError(f"--dense '{dense_name}' has {sparsity:.2%} zero weights in its decoder Linears: it looks "
                           "pruned, not dense; pass the model it was pruned from")


def _autocast_dtype(device: torch.device, model_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The engine's `autocast_dtype` for the same policy as `autocast_context` (None: no autocast)."""
    if device.type == "cuda":
        return torch.float16 if model_dtype == torch.float16 else torch.bfloat16
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else None
