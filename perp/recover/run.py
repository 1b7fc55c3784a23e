"""`run_recover`: load a pruned model, retrain the selected parameters, merge, verify the masks, write outputs.

Outputs (written atomically: the directory appears complete or not at all):

- the merged Hugging Face checkpoint and tokenizer, sparse wherever the method keeps sparsity;
- `adapter.safetensors`: the unmerged trainable tensors (LoRA factors, norms, biases) for audit;
- `masks.safetensors` copied from the pruned checkpoint when it has one and the result is still sparse;
- `recover_report.json`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import peft
import torch
import transformers

from perp import __version__
from perp.config import PerpConfig, classify_model_source, dump_params, recorded_model_source
from perp.data import evaluation_set
from perp.evaluate.perplexity import perplexity
from perp.io.atomic import atomic_directory, check_output_directory
from perp.layout import ADAPTER_FILE, MASKS_FILE, PRUNE_REPORT, RECOVER_REPORT
from perp.models import load_model
from perp.models.families import count_parameters
from perp.recover.base import METHODS, DataRepeatWarning, RecoverError, Settings, model_scope
from perp.recover.data import WindowStream, training_source, training_windows
from perp.recover.masks import capture_masks, check_source_masks, mask_violations, require_pruned
from perp.recover.memory import PeakMemory
from perp.recover.selection import attach, require_trainable
from perp.recover.train import MAX_GRAD_NORM, linear_schedule, train_end2end

#: progress(stage, done, total, status): stages are "load", "ppl_before", "train", "merge", "ppl_after", "save".
Progress = Callable[[str, int, int, str], None]

REPORT_FILE = RECOVER_REPORT


def settings_for(config: PerpConfig) -> Settings:
    return Settings(rank=config.recover.rank, alpha=config.recover.alpha, seed=config.recover.seed)


def validate_request(config: PerpConfig, model: str, dense: Optional[str]) -> list[str]:
    """Everything that can be checked without loading weights; raises RecoverError / ConfigError."""
    rc = config.recover
    methods = rc.methods
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


def _emit(progress: Optional[Progress], stage: str, done: int = 0, total: int = 0, status: str = "") -> None:
    if progress is not None:
        progress(stage, done, total, status)


def _ppl(model, windows, batch_size: int, progress: Optional[Progress], stage: str) -> dict[str, Any]:
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        _emit(progress, stage, done[0], windows.num_windows)

    _emit(progress, stage, 0, windows.num_windows)
    return perplexity(model, windows, batch_size, progress=advance).as_dict()


def run_recover(config: PerpConfig, model: str, out_dir: Path, dense: Optional[str] = None,
                progress: Optional[Progress] = None) -> dict[str, Any]:
    """Recover the pruned `model` per `config.recover`; write the outputs into `out_dir`; return the report."""
    started = time.perf_counter()
    rc = config.recover
    out_dir = check_output_directory(out_dir, inputs=[model] + ([dense] if dense else []), kind="recover")
    methods = validate_request(config, model, dense)
    preserves = all(METHODS.get(name).preserves_sparsity for name in methods)
    settings = settings_for(config)

    _emit(progress, "load")
    if rc.mode == "layerwise":
        from perp.recover.layerwise import run_layerwise

        outcome = run_layerwise(config, model, dense, methods, settings, preserves, progress)
    else:
        outcome = _run_end2end(config, model, methods, settings, preserves, progress)
    loaded = outcome["loaded"]
    check_outcome(outcome["report"])

    report: dict[str, Any] = {**report_header(config, model, loaded, methods, preserves, dense),
                              **outcome["report"], **source_pruning(loaded.path)}
    report["wall_seconds"] = round(time.perf_counter() - started, 3)

    _emit(progress, "save")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, kind="recover") as staging:
        loaded.model.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        adapter = outcome["adapter"]
        if adapter:
            from safetensors.torch import save_file

            save_file(adapter, str(staging / ADAPTER_FILE),
                      metadata={"method": rc.method, "mode": rc.mode, "rank": str(rc.rank), "alpha": str(rc.alpha)})
            report["adapter_file"] = ADAPTER_FILE
        else:
            report["adapter_file"] = None  # `full`: the trained weights are the checkpoint itself
        source_masks = Path(loaded.path) / MASKS_FILE
        if preserves and Path(loaded.path).is_dir() and source_masks.is_file():
            shutil.copy2(source_masks, staging / MASKS_FILE)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    _emit(progress, "done")
    return report


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
    for name in (PRUNE_REPORT, REPORT_FILE):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            source = json.loads(path.read_text())
        except ValueError:
            return {}
        if name == REPORT_FILE:
            return {"pruning": source["pruning"]} if isinstance(source.get("pruning"), dict) else {}
        return {"pruning": {
            "source": str(model_dir.resolve()),
            **{key: source.get(key) for key in ("method", "pattern", "granularity", "target_sparsity",
                                                "planned_sparsity", "planned_pruned_weights", "achieved_sparsity")},
            "calibration_sha256": (source.get("calibration") or {}).get("sha256"),
            "base_model": source.get("base_model"),
        }}
    return {}


def require_biases(methods: list[str], model: Any, family: Any, source: str) -> None:
    """`bias` alone on a model without biases (LLaMA style) would train nothing: refuse before any training.
    Combined with other methods it adds nothing, which the report notes (`bias_note`)."""
    if "bias" in methods and not any(n.endswith("bias") for n, _ in family.layers(model).named_parameters()):
        if methods == ["bias"]:
            raise RecoverError(f"recover.method: 'bias' selects no trainable parameters in '{source}' "
                               "(LLaMA-style models have no biases)")
        warnings.warn(f"recover.method: '{source}' has no biases in its decoder layers; 'bias' adds nothing",
                      stacklevel=3)


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


def _run_end2end(config: PerpConfig, model: str, methods: list[str], settings: Settings, preserves: bool,
                 progress: Optional[Progress]) -> dict[str, Any]:
    rc = config.recover
    loaded = load_model(model, config.model.device, config.model.dtype, config.model.revision)
    net, family, device = loaded.model, loaded.family, loaded.device
    check_windows_fit(net.config, config, model)
    sparsity_before = require_pruned(net, family, model, methods) if preserves else family.decoder_sparsity(net)
    if preserves:
        check_source_masks(loaded.path, net, family, model)
    require_biases(methods, net, family, model)
    total_params = count_parameters(net)
    train_set = training_windows(config, loaded.tokenizer)
    eval_set = evaluation_set(config.data.evaluation, loaded.tokenizer)

    ppl_before = _ppl(net, eval_set, config.evaluate.batch_size, progress, "ppl_before")

    scope = model_scope(net, family)
    masks = capture_masks(scope.linears) if preserves else {}
    attachment = attach(scope, methods, settings)
    require_trainable(attachment, rc.method, "the model")
    stream = WindowStream(train_set, rc.batch_size, rc.seed)
    batches_needed = rc.steps * rc.grad_accum
    plan = stream.plan(batches_needed)
    batches = stream.batches(batches_needed)

    def on_step(step: int, loss: float) -> None:
        _emit(progress, "train", step, rc.steps, f"loss {loss:.4f}")

    _emit(progress, "train", 0, rc.steps)
    torch.manual_seed(rc.seed)
    meter = PeakMemory(device)
    meter.start()
    result = train_end2end(net, attachment, batches, rc, device, loaded.dtype, on_step)
    peak = meter.stop()

    _emit(progress, "merge")
    adapter = attachment.state_dict() if "full" not in methods else {}
    notes = attachment.describe()
    attachment.merge()
    violations = mask_violations(((n, m.weight) for n, m in family.named_decoder_linears(net)), masks)
    if violations:  # pragma: no cover - a bug, never a user error
        raise RuntimeError(f"pruning masks violated after merge: {violations}")
    ppl_after = _ppl(net, eval_set, config.evaluate.batch_size, progress, "ppl_after")
    net.eval()

    report = {
        **_common_report(attachment.trainable_params, total_params, result.loss_curve, ppl_before, ppl_after,
                         result.seconds, result.tokens, meter, peak, train_set, config, plan),
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "sparsity_before": sparsity_before,
        "sparsity_after": family.decoder_sparsity(net),
        "masks_held": bool(preserves),
        "masked_linears": len(masks),
        "tied_embeddings_action": notes.pop("tied_embeddings_action", _tie_note(loaded)),
        **notes,
    }
    return {"loaded": loaded, "report": report, "adapter": adapter}


def _tie_note(loaded) -> str:
    tied = loaded.family.ties_embeddings(loaded.model)
    return "tied, unchanged (the LM head was not retrained)" if tied else "not tied (the LM head was not retrained)"


def _common_report(trainable: int, total: int, loss_curve, ppl_before, ppl_after, seconds: float, tokens: int,
                   meter: PeakMemory, peak: int, train_set, config: PerpConfig, plan: dict[str, Any]
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


__all__ = ["ADAPTER_FILE", "REPORT_FILE", "DataRepeatWarning", "RecoverError", "run_recover", "validate_request"]
