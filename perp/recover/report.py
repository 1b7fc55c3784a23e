"""recover_report.json: what every report starts with, the training figures every mode reports, and the
verdict on the outcome (a diverged run writes nothing; a worse one is flagged)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import peft
import torch
import transformers

from perp import __version__
from perp.config import PerpConfig, dump_params, recorded_model_source
from perp.data import TokenSet
from perp.layout import PRUNE_REPORT, RECOVER_REPORT
from perp.recover.base import RecoverError
from perp.recover.data import training_source
from perp.recover.memory import PeakMemory
from perp.recover.train import MAX_GRAD_NORM, linear_schedule

#: progress(stage, done, total, status): stages are "load", "ppl_before", "train", "merge", "ppl_after", "save".
Progress = Callable[[str, int, int, str], None]


def emit(progress: Optional[Progress], stage: str, done: int = 0, total: int = 0, status: str = "") -> None:
    if progress is not None:
        progress(stage, done, total, status)


class RecoveryRegressionWarning(UserWarning):
    """Recovery finished but the held-out perplexity is worse than before it."""


def check_outcome(report: dict[str, Any], compare: bool = True) -> None:
    """A non-finite held-out perplexity after training means the run diverged: refuse to write its model. A
    finite but worse one is kept (a short or badly tuned run), with a warning and a flag in the report. `compare`
    False: 'before' is not the same model untrained (fused mode: the dense model), so only divergence counts."""
    before, after = report.get("ppl_before"), report.get("ppl_after")
    if after is None:
        return
    if not math.isfinite(after):
        raise RecoverError(f"training diverged: held-out perplexity after recovery is {after} (before: {before}); "
                           "nothing was written; lower recover.lr")
    if not compare:
        return
    report["worse_than_before"] = bool(before is not None and math.isfinite(before) and after > before)
    if report["worse_than_before"]:
        warnings.warn(RecoveryRegressionWarning(
            f"recovery made the held-out perplexity worse: {before:.4g} -> {after:.4g}; check recover.lr and steps"),
            stacklevel=3)


def source_pruning(model_dir: Path) -> dict[str, Any]:
    """What the pruned input's own report says about its pruning (target and planned sparsity, method,
    calibration), so the recovered model carries it: evaluation gates the recovered model against its own
    pruning plan, not against whatever params.yaml says now. A recovered input passes its record on."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return {}
    for name in (PRUNE_REPORT, RECOVER_REPORT):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            source = json.loads(path.read_text())
        except ValueError:
            return {}
        if name == RECOVER_REPORT:
            return {"pruning": source["pruning"]} if isinstance(source.get("pruning"), dict) else {}
        return {"pruning": {
            "source": str(model_dir.resolve()),
            **{key: source.get(key) for key in ("method", "pattern", "granularity", "target_sparsity",
                                                "planned_sparsity", "planned_pruned_weights", "achieved_sparsity")},
            "calibration_sha256": (source.get("calibration") or {}).get("sha256"),
            "base_model": source.get("base_model"),
        }}
    return {}


def report_header(config: PerpConfig, model: str, loaded: Any, methods: list[str], preserves: bool,
                  dense: Optional[str]) -> dict[str, Any]:
    """What every recover_report.json starts with: the request, the model's identity, the environment."""
    return {
        "method": config.recover.method,
        "methods": methods,
        "mode": config.recover.mode,
        "model": recorded_model_source(model),
        "model_sha256": loaded.content_hash,
        "dense": recorded_model_source(dense) if dense else None,
        "family": loaded.family.name,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "dense_result": not preserves,
        "config": dump_params(config),
        "versions": {"perp": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "threads": torch.get_num_threads(),
    }


def training_report(trainable: int, total: int, loss_curve, ppl_before, ppl_after, seconds: float, tokens: int,
                   meter: PeakMemory, peak: int, train_set: TokenSet, config: PerpConfig, plan: dict[str, Any]
                   ) -> dict[str, Any]:
    rc = config.recover
    source = training_source(config)
    peak_kind, baseline = meter.kind, meter.baseline
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total if total else 0.0,
        "loss_curve": loss_curve,
        "ppl_before": ppl_before["ppl"],
        "ppl_after": ppl_after["ppl"],
        "eval": {"source": config.data.evaluation.source, "windows": ppl_after["windows"],
                 "seqlen": ppl_after["seqlen"], "data_sha256": ppl_after["data_sha256"],
                 "before": ppl_before, "after": ppl_after},
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "peak_memory_above_start_bytes": max(0, peak - baseline),
        "data_sha256": train_set.hash,
        "data": {**train_set.describe(), "text_field": source.text_field, **plan},
        "schedule": {"optimizer": "AdamW", "lr": rc.lr, "weight_decay": rc.weight_decay,
                     "warmup_steps": sum(1 for s in range(rc.steps) if s < round(rc.warmup_fraction * rc.steps)),
                     "decay": "linear", "max_grad_norm": MAX_GRAD_NORM, "steps": rc.steps,
                     "batch_size": rc.batch_size, "grad_accum": rc.grad_accum, "seqlen": rc.seqlen,
                     "gradient_checkpointing": rc.gradient_checkpointing,
                     "first_lr_factor": linear_schedule(rc.steps, rc.warmup_fraction)(0)},
    }
