"""The mask stage: magnitude, Wanda and SparseGPT pruning, unstructured or N:M, one decoder layer at a time.

- `run_prune(config, out_dir, calib=None, progress=None)`: load, validate, calibrate, prune, write the checkpoint,
  `masks.safetensors` and `prune_report.json` atomically. Used by the CLI, `perp run`, Prefect and DVC.
- `prune_model(model, family, method, plans, ids, options)`: the engine, in memory; `EngineOptions.sequential`
  chooses the reference two-pass mode (`layer`) or the one-pass true-sequential mode (`linear`).
- `capture_layer_inputs`, `run_layer`, `propagate`, `LayerInputs`: the layer-by-layer data flow, reusable by
  layer-wise recovery.
- `load_masks(dir)`: the kept-masks (True = kept) by full Linear name.
"""

from perp.prune.engine import (SEQUENTIAL_MODES, EngineOptions, EngineResult, LayerInputs, capture_layer_inputs,
                               default_batch_size, propagate, prune_model, run_layer)
from perp.prune.masks import MASKS_FILE, PackedMask, load_masks, load_packed_masks, save_masks
from perp.prune.methods import METHODS, PruneMethod, create_method
from perp.prune.patterns import PruneSpec, select_mask
from perp.prune.run import REPORT_FILE, run_prune
from perp.prune.selection import LayerPlan, check_calibration, plan_pruning, planned_counts

__all__ = [
    "EngineOptions", "EngineResult", "LayerInputs", "LayerPlan", "MASKS_FILE", "METHODS", "PackedMask",
    "PruneMethod", "PruneSpec", "REPORT_FILE", "SEQUENTIAL_MODES", "capture_layer_inputs", "check_calibration",
    "create_method", "default_batch_size", "load_masks", "load_packed_masks", "plan_pruning", "planned_counts",
    "propagate", "prune_model", "run_layer", "run_prune", "save_masks", "select_mask",
]
