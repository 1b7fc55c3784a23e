"""Layer-wise recovery fused with pruning: prune block i, reconstruct block i, move on.

The pruning engine (`perp.prune.engine`) calls `FusedReconstruction` for every layer it prunes, on the device,
after the layer's masks are applied and before its outputs feed the next layer. The targets are the dense
layer's outputs on the same inputs (the engine computes them before pruning), the training data the calibration
windows. One pass over the model prunes and recovers it, one block on the device at a time, with no stored
pruned-only checkpoint and no second, dense copy of the weights: the mode for models far larger than the device.

The output directory holds both stages' results: the merged checkpoint (sparse), `masks.safetensors`,
`prune_report.json` (pruning errors are measured before reconstruction), `recover_report.json` and the unmerged
`adapter.safetensors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from perp.config import PerpConfig
from perp.data import TokenSet, evaluation_set
from perp.errors import ConfigError
from perp.io.atomic import dumps_json
from perp.layout import ADAPTER_FILE, RECOVER_REPORT
from perp.models.families import count_parameters
from perp.prune.engine import LayerInputs, capture_layer_inputs
from perp.recover.base import METHODS, Settings
from perp.recover.checks import added_output_bytes, require_biases, settings_for, validate_request
from perp.recover.data import WindowStream
from perp.recover.layerwise import BlockData, BlockTrainer, Rows, _autocast_dtype, _layered_ppl
from perp.recover.memory import PeakMemory
from perp.recover.report import check_outcome, emit, report_header, training_report

FusedProgress = Callable[[str, int, int, str], None]  # (stage, done, total, status), as `run_recover`'s


class FusedReconstruction:
    """The engine's per-layer hook (`perp.prune.engine.LayerReconstruction`) plus what `run_prune` calls around
    the engine: `prepare` once the model is loaded, `finish` once every layer is done, `write` into the output."""

    def __init__(self, config: PerpConfig, progress: Optional[FusedProgress] = None) -> None:
        self.config = config
        self.methods = config.recover.methods
        self.preserves = all(METHODS.get(name).preserves_sparsity for name in self.methods)
        self.settings: Settings = settings_for(config)
        self.progress = progress
        self.report: dict[str, Any] = {}
        self.adapter: dict[str, torch.Tensor] = {}
        # Set by `prepare`, once the model is loaded (before the engine calls this hook):
        self.loaded: Any = None
        self.calib: Optional[TokenSet] = None
        self.total_params = 0
        self.eval_set: Optional[TokenSet] = None
        self.ppl_before: Optional[dict[str, Any]] = None
        self.call: Optional[LayerInputs] = None
        self.plan: Any = None
        self.trainer: Optional[BlockTrainer] = None

    @staticmethod
    def compute_dtype(device: torch.device, model_dtype: torch.dtype) -> Optional[torch.dtype]:
        """The engine's calibration precision in a fused run: the training's (`BlockTrainer`), so that targets,
        training and the next layer's inputs are computed alike (None: the weights' dtype)."""
        return _autocast_dtype(device, model_dtype)

    def output_bytes(self, skeleton: nn.Module, family: Any, itemsize: int) -> int:
        """What the recovery adds to the pruned output (its adapter), counted on the weightless `skeleton`."""
        return added_output_bytes(self.config, skeleton, family, itemsize, blocks_only=True)

    def prepare(self, loaded: Any, calib: TokenSet, blocks: int) -> None:
        """Dense perplexity (the 'before'), the blocks' call arguments for one window, the training plan."""
        rc = self.config.recover
        model, family, device = loaded.model, loaded.family, loaded.device
        self.loaded, self.calib = loaded, calib
        require_biases(self.methods, model, family, loaded.source)
        self.total_params = count_parameters(model)
        self.eval_set = evaluation_set(self.config.data.evaluation, loaded.tokenizer)
        self.ppl_before = _layered_ppl(model, family, self.eval_set, self.config.evaluate.batch_size, device,
                                       self.progress, "ppl_before")
        # Call arguments (causal mask, rotary tables, positions) with batch size one, which expand to any batch:
        # the engine's own are shaped for its micro-batches.
        self.call = capture_layer_inputs(model, family, calib.ids[:1], device, batch_size=1)
        stream = WindowStream(calib, rc.batch_size, rc.seed)
        self.plan = stream.plan(rc.steps * rc.grad_accum)
        stream.warn_if_repeating(rc.steps * rc.grad_accum)
        self.trainer = BlockTrainer(self.config, self.methods, self.settings, self.preserves, family, device,
                                    loaded.dtype, stream, self.progress, blocks)
        model.requires_grad_(False)
        torch.manual_seed(rc.seed)
        emit(self.progress, "train", 0, self.trainer.total_steps)

    def __call__(self, index: int, layer: nn.Module, inputs: LayerInputs, targets: list[torch.Tensor]) -> None:
        # The block trains on the engine's own micro-batches, neither copied nor concatenated: windows are
        # gathered from them by index, the MSE is measured one micro-batch at a time (`Rows`).
        assert self.call is not None and self.trainer is not None
        data = BlockData(self.call, hidden=inputs.hidden)
        dense_outputs = Rows(targets)
        targets.clear()  # the engine's list: the dense outputs are ours now, released when the block is done
        self.trainer.train(index, layer, data, dense_outputs)

    def finish(self, peak_memory_bytes: int, sparsity: dict[str, Any]) -> dict[str, Any]:
        assert self.trainer is not None and self.calib is not None
        loaded, config, trainer = self.loaded, self.config, self.trainer
        seconds = trainer.seconds  # the blocks' training; the whole job's phases are in prune_report's timings
        model, family = loaded.model, loaded.family
        ppl_after = _layered_ppl(model, family, self.eval_set, config.evaluate.batch_size, loaded.device,
                                 self.progress, "ppl_after")
        meter = PeakMemory(loaded.device)  # kind only: the peak is the whole fused job's, from the engine
        common = training_report(trainer.trainable, self.total_params, trainer.loss_curve, self.ppl_before,
                                 ppl_after, seconds, trainer.tokens_per_block, meter, peak_memory_bytes, self.calib,
                                 config, self.plan)
        common["data"] = {**self.calib.describe(), "text_field": config.data.calibration.text_field, **self.plan,
                          "windows_from": "the calibration set (fused with pruning)"}
        common["schedule"]["seqlen"] = self.calib.seqlen
        common["peak_memory_above_start_bytes"] = None
        check_outcome(common, compare=False)
        self.report = {
            **report_header(config, loaded.source, loaded, self.methods, self.preserves, dense=loaded.source),
            "fused_with_pruning": True,
            "ppl_before_is": "the dense model (pruning and recovery ran as one pass)",
            **common,
            **trainer.report(),
            "sparsity_after": sparsity,
            "masks_held": bool(self.preserves),
            "tied_embeddings_action": ("tied, unchanged" if family.ties_embeddings(model) else "not tied")
                                      + " (layer-wise mode does not retrain the LM head)",
            "adapter_file": ADAPTER_FILE if "full" not in self.methods else None,
        }
        self.adapter = trainer.adapter
        return self.report

    def write(self, staging: Path) -> None:
        rc = self.config.recover
        if self.adapter:
            from safetensors.torch import save_file

            save_file(self.adapter, str(staging / ADAPTER_FILE),
                      metadata={"method": rc.method, "mode": "layerwise-fused", "rank": str(rc.rank),
                                "alpha": str(rc.alpha)})
        (staging / RECOVER_REPORT).write_text(dumps_json(self.report) + "\n")


def check_fused_request(config: PerpConfig) -> None:
    """What fused mode adds to `validate_request` (layer-wise) and the pruning checks."""
    if config.prune.sequential == "linear":
        raise ConfigError("prune.sequential: recovery fused with pruning trains each pruned layer on the inputs "
                          "that 'linear' mode overwrites while pruning; use 'layer' or 'auto'")
    dense = [name for name in config.recover.methods if not METHODS.get(name).preserves_sparsity]
    if dense:
        raise ConfigError(f"recover.method: '{'+'.join(dense)}' merges into dense weights, which would undo the "
                          "pruning of a fused run (and leave masks that no longer hold); use masklora, scalelora, "
                          "norm, bias or full, or prune first and recover the pruned checkpoint")


def fused_config(config: PerpConfig) -> PerpConfig:
    """`config` as a fused run reads it: layer-wise, training windows = the calibration windows (so
    `recover.seqlen` is the calibration window length)."""
    recover = config.recover.model_copy(update={"mode": "layerwise", "seqlen": config.data.calibration.seqlen})
    return config.model_copy(update={"recover": recover})


def run_fused(config: PerpConfig, out_dir: str | Path, calib: Optional[TokenSet] = None,
              progress: Optional[FusedProgress] = None) -> dict[str, Any]:
    """Prune `config.model.name` with `config.prune` and reconstruct each block right after it is pruned with
    `config.recover` (layer-wise); write one output directory atomically. Returns {"prune": ..., "recover": ...}."""
    from perp.prune.run import run_prune

    config = fused_config(config)
    validate_request(config, config.model.name, config.model.name)
    check_fused_request(config)
    reconstruction = FusedReconstruction(config, progress)

    def layers_done(done: int, total: int, message: str = "") -> None:
        if progress is not None:
            progress("prune", done, total, message)

    prune_report = run_prune(config, out_dir, calib=calib, progress=layers_done, reconstruction=reconstruction)
    return {"prune": prune_report, "recover": reconstruction.report}


__all__ = ["FusedReconstruction", "check_fused_request", "fused_config", "run_fused"]
