"""`run_recover`: load a pruned model, retrain the selected parameters, merge, verify the masks, write outputs.

Outputs (written atomically: the directory appears complete or not at all):

- the merged Hugging Face checkpoint and tokenizer, sparse wherever the method keeps sparsity;
- `adapter.safetensors`: the unmerged trainable tensors (LoRA factors, norms, biases) for audit;
- `masks.safetensors` copied from the pruned checkpoint when it has one and the result is still sparse;
- `recover_report.json`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from perp.config import PerpConfig
from perp.data import evaluation_set
from perp.evaluate.perplexity import perplexity
from perp.io.atomic import atomic_directory, check_output_directory, dumps_json, require_free_space
from perp.layout import ADAPTER_FILE, MASKS_FILE, RECOVER_REPORT
from perp.models import load_model
from perp.models.families import count_parameters
from perp.recover.base import METHODS, DataRepeatWarning, RecoverError, Settings, model_scope
from perp.recover.checks import (check_windows_fit, recovered_output_bytes, require_biases, settings_for,
                                 validate_request)
from perp.recover.data import WindowStream, training_windows
from perp.recover.masks import capture_masks, check_source_masks, mask_violations, require_pruned
from perp.recover.memory import PeakMemory
from perp.recover.report import Progress, check_outcome, emit, report_header, source_pruning, training_report
from perp.recover.selection import attach, require_trainable
from perp.recover.train import train_end2end

REPORT_FILE = RECOVER_REPORT


def _ppl(model, windows, batch_size: int, progress: Optional[Progress], stage: str) -> dict[str, Any]:
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        emit(progress, stage, done[0], windows.num_windows)

    emit(progress, stage, 0, windows.num_windows)
    return perplexity(model, windows, batch_size, progress=advance).as_dict()


def run_recover(config: PerpConfig, model: str, out_dir: Path, dense: Optional[str] = None,
                progress: Optional[Progress] = None) -> dict[str, Any]:
    """Recover the pruned `model` per `config.recover`; write the outputs into `out_dir`; return the report."""
    started = time.perf_counter()
    rc = config.recover
    methods = validate_request(config, model, dense)
    out_dir = check_output_directory(out_dir, inputs=[model] + ([dense] if dense else []), kind="recover")
    preserves = all(METHODS.get(name).preserves_sparsity for name in methods)
    require_free_space(out_dir, recovered_output_bytes(config, model, preserves), "--out",
                       "the recovered checkpoint with its adapter")
    settings = settings_for(config)

    emit(progress, "load")
    if rc.mode == "layerwise":
        from perp.recover.layerwise import run_layerwise

        assert dense is not None  # validate_request refuses layerwise without --dense
        outcome = run_layerwise(config, model, dense, methods, settings, preserves, progress)
    else:
        outcome = _run_end2end(config, model, methods, settings, preserves, progress)
    loaded = outcome["loaded"]
    check_outcome(outcome["report"])

    report: dict[str, Any] = {**report_header(config, model, loaded, methods, preserves, dense),
                              **outcome["report"], **source_pruning(loaded.path)}
    report["wall_seconds"] = round(time.perf_counter() - started, 3)

    emit(progress, "save")
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
        (staging / REPORT_FILE).write_text(dumps_json(report) + "\n")
    emit(progress, "done")
    return report


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
        emit(progress, "train", step, rc.steps, f"loss {loss:.4f}")

    emit(progress, "train", 0, rc.steps)
    torch.manual_seed(rc.seed)
    meter = PeakMemory(device)
    meter.start()
    result = train_end2end(net, attachment, batches, rc, device, loaded.dtype, on_step)
    peak = meter.stop()

    emit(progress, "merge")
    adapter = attachment.state_dict() if "full" not in methods else {}
    notes = attachment.describe()
    attachment.merge()
    violations = mask_violations(((n, m.weight) for n, m in family.named_decoder_linears(net)), masks)
    if violations:  # pragma: no cover - a bug, never a user error
        raise RuntimeError(f"pruning masks violated after merge: {violations}")
    ppl_after = _ppl(net, eval_set, config.evaluate.batch_size, progress, "ppl_after")
    net.eval()

    report = {
        **training_report(attachment.trainable_params, total_params, result.loss_curve, ppl_before, ppl_after,
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


__all__ = ["ADAPTER_FILE", "REPORT_FILE", "DataRepeatWarning", "RecoverError", "run_recover", "validate_request"]
