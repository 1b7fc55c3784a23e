"""The files a stage's output directory holds, by name: one place for the contract between the stages.

    calibration/   calibration.safetensors + calibration.json                                (perp calibrate)
    pruned/        HF checkpoint + masks.safetensors + prune_report.json                       (perp prune)
    recovered/     HF checkpoint + masks.safetensors + recover_report.json + adapter.safetensors (perp recover)
    metrics.json   beside or inside the evaluated model                                       (perp evaluate)

Every output directory also holds `.perp-complete` (`perp.io.atomic`), written last.
"""

from typing import Any

Ref = dict[str, Any]  # a stage output: {"uri": str, "sha256": str, ...} (perp.pipeline.reference)

PRUNE_REPORT = "prune_report.json"
RECOVER_REPORT = "recover_report.json"
MASKS_FILE = "masks.safetensors"
ADAPTER_FILE = "adapter.safetensors"
METRICS_FILE = "metrics.json"
CALIBRATION_TOKENS = "calibration.safetensors"
CALIBRATION_META = "calibration.json"
